#include "methods/value_codec.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <stdexcept>

#include "core/bitpack.h"
#include "core/cpu_isa.h"
#include "core/half.h"
#include "core/x86_intrinsics.h"
#include "methods/value_sum.h"

namespace veloxquant {
namespace {

// Writes scale * centroid(code) for one token, one byte (PerByte coordinates) at a time.
template <int PerByte>
VQ_ALWAYS_INLINE void unpack_scaled(const float* lut, const uint8_t* code, std::size_t code_bytes,
                                    float scale, float* out) {
    for (std::size_t byte = 0; byte < code_bytes; ++byte) {
        const float* row = lut + code[byte] * PerByte;
        float* o = out + byte * PerByte;
#pragma omp simd
        for (int k = 0; k < PerByte; ++k) o[k] = scale * row[k];
    }
}

// ValueCodec::accumulate's inputs, for the per-ISA kernels below.
struct AccumulateArgs : ValueSumArgs {
    const float* half;      // bits 16: the fp16 -> float table
    const float* byte_lut;  // bits 1, 2, 4, 8 at dims divisible by 8 (see byte_lut_), or null
};

// Writes the value of token t (rotated domain, times its scale) to value.
VQ_ALWAYS_INLINE void unpack_value(const AccumulateArgs& a, int t, float* value) {
    const uint8_t* code = a.codes + t * a.code_bytes;
    if (a.bits == 16) {
        const uint16_t* h = reinterpret_cast<const uint16_t*>(code);
        for (int j = 0; j < a.dim; ++j) value[j] = a.half[h[j]];
        return;
    }
    switch (a.byte_lut == nullptr ? 0 : a.bits) {
        case 1:
            return unpack_scaled<8>(a.byte_lut, code, a.code_bytes, a.scalars[t], value);
        case 2:
            return unpack_scaled<4>(a.byte_lut, code, a.code_bytes, a.scalars[t], value);
        case 4:
            return unpack_scaled<2>(a.byte_lut, code, a.code_bytes, a.scalars[t], value);
        case 8:
            return unpack_scaled<1>(a.byte_lut, code, a.code_bytes, a.scalars[t], value);
        default:
            for (int j = 0; j < a.dim; ++j)
                value[j] = a.scalars[t] * a.centroids[read_packed(code, j, a.bits)];
    }
}

// acc[k] += w[i] * values[i * dim + k] for k < Chunk over the block's tokens i in order,
// skipping zero weights: the Chunk accumulators stay in registers over the whole block.
template <int Chunk>
VQ_ALWAYS_INLINE void add_chunk(float* acc, const float* w, const float* values, int count,
                                int dim) {
    float sum[Chunk];
    for (int k = 0; k < Chunk; ++k) sum[k] = acc[k];
    for (int i = 0; i < count; ++i) {
        if (w[i] == 0.0f) continue;
#pragma omp simd
        for (int k = 0; k < Chunk; ++k) sum[k] += w[i] * values[i * dim + k];
    }
    for (int k = 0; k < Chunk; ++k) acc[k] = sum[k];
}

// Blocks of kBlock tokens: each token with a nonzero weight in some row is unpacked once into
// its value (rotated domain, times its scale), then every row adds the block's values, a chunk
// of coordinates (MaxChunk = 128 where 32 registers hold them, else 64; then 16, then 1) at a time,
// so that its accumulators are loaded and stored once per block rather than once per token. Per
// coordinate the adds run in token order, as one token at a time would run them. Inlined into each
// ISA's entry point, so the multiply-adds take that ISA's vectors (AVX-512: 16 floats, a quarter of
// the instructions of the baseline's SSE2). unpack(live, count, values) writes the values of tokens
// live[0..count) to values[i * dim].
template <int MaxChunk, typename Unpack>
VQ_ALWAYS_INLINE void accumulate_tokens(const AccumulateArgs& a, const Unpack& unpack) {
    constexpr int kBlock = 16;
    float values[kBlock * Rotation::kMaxDim];
    float w[kBlock];
    int live[kBlock];
    for (int t0 = 0; t0 < a.n; t0 += kBlock) {
        const int end = std::min(a.n, t0 + kBlock);
        int count = 0;
        for (int t = t0; t < end; ++t) {
            bool any = false;
            for (int r = 0; r < a.rows && !any; ++r)
                any = a.weights[r * a.weight_stride + t] != 0.0f;
            if (any) live[count++] = t;
        }
        unpack(live, count, values);
        for (int r = 0; r < a.rows; ++r) {
            for (int i = 0; i < count; ++i) w[i] = a.weights[r * a.weight_stride + live[i]];
            float* acc = a.acc[r];
            int j = 0;
            if (MaxChunk == 128)
                for (; j + 128 <= a.dim; j += 128)
                    add_chunk<128>(acc + j, w, values + j, count, a.dim);
            for (; j + 64 <= a.dim; j += 64) add_chunk<64>(acc + j, w, values + j, count, a.dim);
            for (; j + 16 <= a.dim; j += 16) add_chunk<16>(acc + j, w, values + j, count, a.dim);
            for (; j < a.dim; ++j) add_chunk<1>(acc + j, w, values + j, count, a.dim);
        }
    }
}

struct UnpackValue {
    const AccumulateArgs& a;
    VQ_ALWAYS_INLINE void operator()(const int* live, int count, float* values) const {
        for (int i = 0; i < count; ++i) unpack_value(a, live[i], values + i * a.dim);
    }
};

using AccumulateFn = void (*)(const AccumulateArgs&);

void accumulate_generic(const AccumulateArgs& a) {
    accumulate_tokens<64>(a, UnpackValue{a});
}

#ifdef VQ_X86_KERNELS
VQ_TARGET_AVX2 void accumulate_avx2(const AccumulateArgs& a) {
    accumulate_tokens<64>(a, UnpackValue{a});
}

// fp16 values at dims divisible by 16, on AVX-512: 16 halves per vcvtph2ps (exact, as the table).
struct UnpackHalves {
    const AccumulateArgs& a;

    VQ_TARGET_AVX512 void operator()(const int* live, int count, float* values) const {
        for (int i = 0; i < count; ++i) {
            const uint16_t* h = reinterpret_cast<const uint16_t*>(a.codes + live[i] * a.code_bytes);
            for (int j = 0; j < a.dim; j += 16)
                _mm512_storeu_ps(
                    values + i * a.dim + j,
                    _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + j))));
        }
    }
};

VQ_TARGET_AVX512 void accumulate_avx512(const AccumulateArgs& a) {
    if (a.bits == 16 && a.dim % 16 == 0) return accumulate_tokens<128>(a, UnpackHalves{a});
    accumulate_tokens<128>(a, UnpackValue{a});
}
#endif

AccumulateFn accumulate_kernel() {
    return VQ_KERNEL_FOR_ISA(accumulate_generic, accumulate_avx2, accumulate_avx512);
}

}  // namespace

ValueCodec::ValueCodec(int dim, int bits, bool use_hadamard, uint64_t seed)
    : dim_(dim), bits_(bits) {
    if (!((bits >= 1 && bits <= 8) || bits == 16))
        throw std::invalid_argument("value_bits must be in 1..8 or 16 (fp16), got " +
                                    std::to_string(bits));
    if (bits != 16) {
        rotation_ = Rotation(dim, use_hadamard, seed);
        codebook_ = &rotated_coordinate_codebook(dim, bits);
        if (8 % bits == 0 && dim % 8 == 0) {
            const int per_byte = 8 / bits;
            byte_lut_.resize(256 * static_cast<std::size_t>(per_byte));
            for (int b = 0; b < 256; ++b)
                for (int k = 0; k < per_byte; ++k)
                    byte_lut_[b * per_byte + k] =
                        codebook_->centroids[(b >> (k * bits)) & ((1 << bits) - 1)];
        }
    }
}

std::size_t ValueCodec::code_bytes() const {
    return bits_ == 16 ? 2u * static_cast<std::size_t>(dim_) : packed_bytes(dim_, bits_);
}

void ValueCodec::encode(const float* values, int n, uint8_t* codes, float* scalars,
                        std::size_t scalar_stride) const {
    (void)scalar_stride;
    const std::size_t cb = code_bytes();
    if (bits_ == 16) {
        for (int t = 0; t < n; ++t) {
            uint16_t* out = reinterpret_cast<uint16_t*>(codes + t * cb);
            for (int j = 0; j < dim_; ++j)
                out[j] = float_to_half(values[static_cast<std::size_t>(t) * dim_ + j]);
        }
        return;
    }
    std::vector<float> u(dim_);
    std::vector<uint8_t> idx(dim_);
    for (int t = 0; t < n; ++t) {
        const float* v = values + static_cast<std::size_t>(t) * dim_;
        double norm2 = 0.0;
        for (int j = 0; j < dim_; ++j) norm2 += static_cast<double>(v[j]) * v[j];
        const double norm = std::sqrt(norm2);
        float scale = 0.0f;
        // A norm under 1 / FLT_MAX (every coordinate subnormal) is stored as v = 0: its
        // reciprocal overflows to inf, and inf * 0 would make the codes and the scale NaN.
        const float inv = norm > 0.0 ? static_cast<float>(1.0 / norm) : 0.0f;
        if (norm > 0.0 && inv <= FLT_MAX) {
            rotation_.forward(v, u.data());
            // Least-squares scale for the chosen levels: ||v|| <u, c> / ||c||^2, which keeps
            // the reconstruction's error orthogonal to it (no shrinkage bias).
            double uc = 0.0, cc = 0.0;
            for (int j = 0; j < dim_; ++j) {
                idx[j] = codebook_->quantize(u[j] * inv);
                const double c = codebook_->centroids[idx[j]];
                uc += u[j] * inv * c;
                cc += c * c;
            }
            scale = cc > 0.0 ? static_cast<float>(norm * uc / cc) : 0.0f;
        } else {
            std::fill(idx.begin(), idx.end(), 0);
        }
        pack_bits(idx.data(), dim_, bits_, codes + t * cb);
        scalars[t] = scale;
    }
}

void ValueCodec::decode(const uint8_t* codes, const float* scalars, std::size_t scalar_stride,
                        int n, float* values) const {
    (void)scalar_stride;
    const std::size_t cb = code_bytes();
    for (int t = 0; t < n; ++t) {
        float* out = values + static_cast<std::size_t>(t) * dim_;
        const uint8_t* code = codes + t * cb;
        if (bits_ == 16) {
            const uint16_t* h = reinterpret_cast<const uint16_t*>(code);
            for (int j = 0; j < dim_; ++j) out[j] = half_to_float(h[j]);
            continue;
        }
        for (int j = 0; j < dim_; ++j)
            out[j] = scalars[t] * codebook_->centroids[read_packed(code, j, bits_)];
        rotation_.inverse(out, out);
    }
}

void ValueCodec::accumulate(const float* weights, std::size_t weight_stride, int rows,
                            const uint8_t* codes, const float* scalars, int n,
                            float* const* acc) const {
    AccumulateArgs a;
    a.weights = weights, a.weight_stride = weight_stride, a.rows = rows;
    a.codes = codes, a.scalars = scalars, a.n = n, a.acc = acc;
    a.dim = dim_, a.bits = bits_, a.code_bytes = code_bytes();
    a.half = bits_ == 16 ? half_table() : nullptr;
    a.centroids = bits_ == 16 ? nullptr : codebook_->centroids.data();
    a.byte_lut = byte_lut_.empty() ? nullptr : byte_lut_.data();
    // Bits 1, 2 and 4 on AVX2 and AVX-512 (methods/value_sum.h), the rest here.
    if (bits_ != 16 && sum_packed_values(a)) return;
    accumulate_kernel()(a);
}

void ValueCodec::finalize(const float* acc, float* out) const {
    if (bits_ == 16) {
        std::memcpy(out, acc, sizeof(float) * dim_);
        return;
    }
    rotation_.inverse(acc, out);
}

std::size_t ValueCodec::parameter_bytes() const {
    return rotation_.parameter_bytes() +
           (codebook_ ? codebook_->centroids.size() * sizeof(float) : 0);
}

void ValueCodec::check_codes(const uint8_t* codes, int n) const {
    if (bits_ == 16 && !halves_finite(codes, static_cast<std::size_t>(n) * dim_))
        throw std::runtime_error("corrupted fp16 values: an infinity or NaN");
}

}  // namespace veloxquant
