// KVCache's fp16 / bf16 entry points: every cache encodes and attends in float32, so these widen
// the inputs (exactly: each fp16 and bf16 value is a float), call the float32 method, and round
// the outputs back. The float32 method checks the arguments and gives its own errors; here null
// pointers pass through as null and negative counts convert nothing, so that it sees them.
#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/half.h"
#include "veloxquant/cache.h"

namespace veloxquant {

namespace {

void check_format(HalfFormat format) {
    if (format != HalfFormat::kFloat16 && format != HalfFormat::kBFloat16)
        throw std::invalid_argument("unknown HalfFormat " +
                                    std::to_string(static_cast<int>(format)) +
                                    " (kFloat16 or kBFloat16)");
}

// Elements of [a][b][c] with negative extents counted as none.
std::size_t elements(int a, int b, int c) {
    return static_cast<std::size_t>(std::max(a, 0)) * static_cast<std::size_t>(std::max(b, 0)) *
           static_cast<std::size_t>(std::max(c, 0));
}

std::vector<float> widen(const uint16_t* x, std::size_t n, HalfFormat format) {
    std::vector<float> out;
    if (x == nullptr) return out;
    out.resize(n);
    if (format == HalfFormat::kFloat16) {
        const float* table = half_table();
        for (std::size_t i = 0; i < n; ++i) out[i] = table[x[i]];
    } else {
        for (std::size_t i = 0; i < n; ++i) out[i] = bf16_to_float(x[i]);
    }
    return out;
}

void narrow(const float* x, std::size_t n, HalfFormat format, uint16_t* out) {
    if (format == HalfFormat::kFloat16)
        for (std::size_t i = 0; i < n; ++i) out[i] = float_to_half(x[i]);
    else
        for (std::size_t i = 0; i < n; ++i) out[i] = float_to_bf16(x[i]);
}

// The float32 buffer standing for a caller's 16-bit one: null where the caller passed null, a
// one-element stand-in where there is nothing to convert (so that the float32 method's count
// checks, not its null checks, refuse the call).
float* buffer(std::vector<float>& v, const void* given) {
    if (given == nullptr) return nullptr;
    if (v.empty()) v.resize(1);
    return v.data();
}

}  // namespace

void KVCache::append_half(const uint16_t* keys, const uint16_t* values, int n_tokens,
                          HalfFormat format) {
    check_format(format);
    const std::size_t n = elements(num_heads(), n_tokens, head_dim());
    std::vector<float> k = widen(keys, n, format), v = widen(values, n, format);
    append(buffer(k, keys), buffer(v, values), n_tokens);
}

void KVCache::attend_half(const uint16_t* queries, int num_q_heads, int n_queries, uint16_t* out,
                          float scale, bool causal, HalfFormat format) const {
    check_format(format);
    const std::size_t n = elements(num_q_heads, n_queries, head_dim());
    std::vector<float> q = widen(queries, n, format), o(out == nullptr ? 0 : n);
    attend(buffer(q, queries), num_q_heads, n_queries, buffer(o, out), scale, causal);
    narrow(o.data(), n, format, out);
}

void KVCache::dequantize_half(int start, int n_tokens, uint16_t* keys_out, uint16_t* values_out,
                              HalfFormat format) const {
    check_format(format);
    // A range past the tokens is refused by dequantize: it needs no buffer of its length.
    const std::size_t n = elements(num_heads(), std::min(n_tokens, size()), head_dim());
    std::vector<float> k(keys_out == nullptr ? 0 : n), v(values_out == nullptr ? 0 : n);
    dequantize(start, n_tokens, buffer(k, keys_out), buffer(v, values_out));
    if (n_tokens <= 0) return;
    narrow(k.data(), n, format, keys_out);
    narrow(v.data(), n, format, values_out);
}

}  // namespace veloxquant
