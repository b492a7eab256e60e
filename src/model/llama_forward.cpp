// The forward pass of LlamaModel (conventions in llama_model.h).
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "model/dequant.h"
#include "model/llama_model.h"

namespace veloxquant {
namespace {

// Token loops run in parallel only when a chunk has enough tokens to pay for the fork.
constexpr int kParallelTokens = 8;

// y[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w, with the sum of squares in double as ggml's
// ggml_compute_forward_rms_norm_f32 does.
void rms_norm(const float* x, const float* w, int n, int dim, float eps, float* y) {
#pragma omp parallel for schedule(static) if (n >= kParallelTokens)
    for (int t = 0; t < n; ++t) {
        const float* xt = x + static_cast<std::size_t>(t) * dim;
        float* yt = y + static_cast<std::size_t>(t) * dim;
        double ss = 0.0;
        for (int i = 0; i < dim; ++i) ss += static_cast<double>(xt[i]) * xt[i];
        const float scale = static_cast<float>(1.0 / std::sqrt(ss / dim + eps));
        for (int i = 0; i < dim; ++i) yt[i] = xt[i] * scale * w[i];
    }
}

// [n][heads * d] (token-major, as the projections write) -> [heads][n][d] (KVCache layout).
void to_heads(const float* src, int n, int heads, int d, float* dst) {
    for (int h = 0; h < heads; ++h)
        for (int t = 0; t < n; ++t)
            std::copy_n(src + (static_cast<std::size_t>(t) * heads + h) * d, d,
                        dst + (static_cast<std::size_t>(h) * n + t) * d);
}

// [heads][n][d] -> [n][heads * d].
void from_heads(const float* src, int n, int heads, int d, float* dst) {
    for (int h = 0; h < heads; ++h)
        for (int t = 0; t < n; ++t)
            std::copy_n(src + (static_cast<std::size_t>(h) * n + t) * d, d,
                        dst + (static_cast<std::size_t>(t) * heads + h) * d);
}

// gate = silu(gate) * up, silu(g) = g / (1 + e^-g).
void swiglu(float* gate, const float* up, int n, int dim) {
#pragma omp parallel for schedule(static) if (n >= kParallelTokens)
    for (int t = 0; t < n; ++t) {
        float* g = gate + static_cast<std::size_t>(t) * dim;
        const float* u = up + static_cast<std::size_t>(t) * dim;
        for (int i = 0; i < dim; ++i) g[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
    }
}

void add(float* x, const float* y, std::size_t n) {
    for (std::size_t i = 0; i < n; ++i) x[i] += y[i];
}

}  // namespace

void LlamaModel::embed(const int32_t* tokens, int n, float* x) const {
    for (int t = 0; t < n; ++t) {
        dequantize_row(tok_embd_.type, tok_embd_.data + tokens[t] * tok_embd_.row_bytes,
                       x + static_cast<std::size_t>(t) * hp_.n_embd, hp_.n_embd);
    }
}

// cos and sin of (pos0 + t) * theta_i for the chunk, in double before rounding.
void LlamaModel::rope_table(int n, int pos0) const {
    const int half = hp_.rope_dim / 2;
    scratch_.rope_cs.resize(static_cast<std::size_t>(n) * half * 2);
    float* cs = scratch_.rope_cs.data();
    for (int t = 0; t < n; ++t) {
        for (int i = 0; i < half; ++i, cs += 2) {
            const double angle = static_cast<double>(pos0 + t) * inv_freq_[i];
            cs[0] = static_cast<float>(std::cos(angle));
            cs[1] = static_cast<float>(std::sin(angle));
        }
    }
}

// Rotates the pairs (v[2i], v[2i+1]), i < rope_dim / 2, of every head of n token-major rows.
void LlamaModel::rope(float* v, int n, int n_heads) const {
    const int half = hp_.rope_dim / 2, d = hp_.head_dim;
    for (int t = 0; t < n; ++t) {
        const float* cs = scratch_.rope_cs.data() + static_cast<std::size_t>(t) * half * 2;
        for (int h = 0; h < n_heads; ++h) {
            float* x = v + (static_cast<std::size_t>(t) * n_heads + h) * d;
            for (int i = 0; i < half; ++i) {
                const float c = cs[2 * i], s = cs[2 * i + 1];
                const float x0 = x[2 * i], x1 = x[2 * i + 1];
                x[2 * i] = x0 * c - x1 * s;
                x[2 * i + 1] = x0 * s + x1 * c;
            }
        }
    }
}

void LlamaModel::run_chunk(const int32_t* tokens, int n, int pos0,
                           std::vector<std::unique_ptr<KVCache>>& caches) const {
    const int E = hp_.n_embd, H = hp_.n_head, Hkv = hp_.n_head_kv, D = hp_.head_dim;
    const int Q = H * D, KV = Hkv * D, F = hp_.n_ff;
    const std::size_t rows = static_cast<std::size_t>(n);
    Scratch& s = scratch_;
    s.x.resize(rows * E), s.xn.resize(rows * E), s.tmp.resize(rows * E);
    s.q.resize(rows * Q), s.qh.resize(rows * Q), s.att.resize(rows * Q);
    s.k.resize(rows * KV), s.kh.resize(rows * KV), s.v.resize(rows * KV), s.vh.resize(rows * KV);
    s.gate.resize(rows * F), s.up.resize(rows * F);
    const float scale = 1.0f / std::sqrt(static_cast<float>(D));

    embed(tokens, n, s.x.data());
    rope_table(n, pos0);
    for (int l = 0; l < hp_.n_layer; ++l) {
        const Layer& L = layers_[l];
        // Attention block.
        rms_norm(s.x.data(), L.attn_norm.data(), n, E, hp_.rms_eps, s.xn.data());
        const MatmulOut qkv[3] = {
            {&L.wq, s.q.data(), Q}, {&L.wk, s.k.data(), KV}, {&L.wv, s.v.data(), KV}};
        matmul(qkv, 3, s.xn.data(), E, n);
        rope(s.q.data(), n, H);
        rope(s.k.data(), n, Hkv);
        to_heads(s.q.data(), n, H, D, s.qh.data());
        to_heads(s.k.data(), n, Hkv, D, s.kh.data());
        to_heads(s.v.data(), n, Hkv, D, s.vh.data());
        caches[l]->append(s.kh.data(), s.vh.data(), n);
        caches[l]->attend(s.qh.data(), H, n, s.att.data(), scale, /*causal=*/true);
        from_heads(s.att.data(), n, H, D, s.q.data());
        matmul(L.wo, s.q.data(), n, s.tmp.data());
        add(s.x.data(), s.tmp.data(), rows * E);
        // Feed-forward block.
        rms_norm(s.x.data(), L.ffn_norm.data(), n, E, hp_.rms_eps, s.xn.data());
        const MatmulOut gate_up[2] = {{&L.w_gate, s.gate.data(), F}, {&L.w_up, s.up.data(), F}};
        matmul(gate_up, 2, s.xn.data(), E, n);
        swiglu(s.gate.data(), s.up.data(), n, F);
        matmul(L.w_down, s.gate.data(), n, s.tmp.data());
        add(s.x.data(), s.tmp.data(), rows * E);
    }
    rms_norm(s.x.data(), output_norm_.data(), n, E, hp_.rms_eps, s.xn.data());
}

void LlamaModel::forward(const int32_t* tokens, int n,
                         std::vector<std::unique_ptr<KVCache>>& caches, float* logits,
                         bool all_logits) const {
    if (n < 1) throw std::invalid_argument("forward: n must be >= 1");
    if (tokens == nullptr || logits == nullptr)
        throw std::invalid_argument("forward: null tokens or logits");
    for (int t = 0; t < n; ++t) {
        if (tokens[t] < 0 || tokens[t] >= hp_.n_vocab) {
            throw std::invalid_argument("forward: token " + std::to_string(tokens[t]) + " at " +
                                        std::to_string(t) + " is outside the vocabulary [0, " +
                                        std::to_string(hp_.n_vocab) + ")");
        }
    }
    if (caches.size() != static_cast<std::size_t>(hp_.n_layer)) {
        throw std::invalid_argument("forward: " + std::to_string(caches.size()) + " caches for " +
                                    std::to_string(hp_.n_layer) + " layers");
    }
    for (std::size_t l = 0; l < caches.size(); ++l) {
        const KVCache* c = caches[l].get();
        if (c == nullptr)
            throw std::invalid_argument("forward: cache " + std::to_string(l) + " is null");
        if (c->num_heads() != hp_.n_head_kv || c->head_dim() != hp_.head_dim) {
            throw std::invalid_argument(
                "forward: cache " + std::to_string(l) + " has " + std::to_string(c->num_heads()) +
                " heads of " + std::to_string(c->head_dim()) + ", the model needs " +
                std::to_string(hp_.n_head_kv) + " of " + std::to_string(hp_.head_dim));
        }
        if (c->size() != caches[0]->size())
            throw std::invalid_argument("forward: the caches hold different numbers of tokens");
        if (static_cast<long long>(c->size()) + n > c->max_seq_len()) {
            throw std::length_error("forward: " + std::to_string(n) + " more tokens exceed cache " +
                                    std::to_string(l) + "'s capacity of " +
                                    std::to_string(c->max_seq_len()) + " (holding " +
                                    std::to_string(c->size()) + ")");
        }
    }

    const std::lock_guard<std::mutex> lock(mutex_);
    const int start = caches[0]->size();
    const std::size_t V = static_cast<std::size_t>(hp_.n_vocab);
    try {
        for (int c0 = 0; c0 < n; c0 += kChunk) {
            const int m = std::min(kChunk, n - c0);
            run_chunk(tokens + c0, m, start + c0, caches);
            if (all_logits) {
                matmul(output_, scratch_.xn.data(), m, logits + c0 * V);
            } else if (c0 + m == n) {
                matmul(output_, scratch_.xn.data() + static_cast<std::size_t>(m - 1) * hp_.n_embd,
                       1, logits);
            }
        }
    } catch (...) {
        for (auto& c : caches)
            if (c->size() > start) c->trim(c->size() - start);
        throw;
    }
}

}  // namespace veloxquant
