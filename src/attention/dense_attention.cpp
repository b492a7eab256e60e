#include "attention/dense_attention.h"

#include <algorithm>
#include <limits>
#include <vector>

#include <omp.h>

#include "attention/online_softmax.h"

namespace veloxquant {
namespace {

constexpr int kBlock = 64;

// One query row over keys [begin, end): partial (m, l, acc[d]).
void attend_range(const float* q, const float* keys, const float* values, int d, int begin,
                  int end, float scale, float& m, float& l, float* acc) {
    float logits[kBlock], weights[kBlock];
    for (int t0 = begin; t0 < end; t0 += kBlock) {
        const int n = std::min(kBlock, end - t0);
        for (int t = 0; t < n; ++t) {
            const float* k = keys + static_cast<std::size_t>(t0 + t) * d;
            float s = 0.0f;
#pragma omp simd reduction(+ : s)
            for (int j = 0; j < d; ++j) s += q[j] * k[j];
            logits[t] = s * scale;
        }
        const float r = online_softmax_block(logits, n, m, l, weights);
        if (r != 1.0f)
            for (int j = 0; j < d; ++j) acc[j] *= r;
        for (int t = 0; t < n; ++t) {
            const float w = weights[t];
            const float* v = values + static_cast<std::size_t>(t0 + t) * d;
#pragma omp simd
            for (int j = 0; j < d; ++j) acc[j] += w * v[j];
        }
    }
}

}  // namespace

void dense_attention(const float* queries, int num_q_heads, int n_queries, const float* keys,
                     const float* values, int num_kv_heads, int n_keys, int d, float* out,
                     float scale, bool causal) {
    const int group = num_q_heads / num_kv_heads;
    const int rows = num_q_heads * n_queries;
    // Split keys into chunks when there are too few rows to keep every thread busy.
    const int threads = omp_get_max_threads();
    int chunks = 1;
    if (rows < 2 * threads) chunks = std::max(1, std::min((n_keys + 255) / 256, 4 * threads / std::max(rows, 1)));
    const int chunk_len = (n_keys + chunks - 1) / chunks;
    std::vector<float> part(static_cast<std::size_t>(rows) * chunks * (d + 2));
#pragma omp parallel for schedule(dynamic) collapse(2)
    for (int r = 0; r < rows; ++r) {
        for (int c = 0; c < chunks; ++c) {
            const int qh = r / n_queries, i = r % n_queries, h = qh / group;
            const float* q = queries + static_cast<std::size_t>(r) * d;
            int limit = n_keys;
            if (causal) limit = std::min(n_keys, n_keys - n_queries + i + 1);
            const int begin = c * chunk_len, end = std::min(limit, begin + chunk_len);
            float* p = &part[(static_cast<std::size_t>(r) * chunks + c) * (d + 2)];
            float& m = p[0];
            float& l = p[1];
            m = -std::numeric_limits<float>::infinity();
            l = 0.0f;
            std::fill(p + 2, p + 2 + d, 0.0f);
            const std::size_t kv = static_cast<std::size_t>(h) * n_keys * d;
            if (begin < end) attend_range(q, keys + kv, values + kv, d, begin, end, scale, m, l, p + 2);
        }
    }
#pragma omp parallel for schedule(static)
    for (int r = 0; r < rows; ++r) {
        float m = -std::numeric_limits<float>::infinity();
        for (int c = 0; c < chunks; ++c) m = std::max(m, part[(static_cast<std::size_t>(r) * chunks + c) * (d + 2)]);
        float* o = out + static_cast<std::size_t>(r) * d;
        std::fill(o, o + d, 0.0f);
        if (m == -std::numeric_limits<float>::infinity()) continue;
        float l = 0.0f;
        for (int c = 0; c < chunks; ++c) {
            const float* p = &part[(static_cast<std::size_t>(r) * chunks + c) * (d + 2)];
            if (p[1] == 0.0f) continue;
            const float w = std::exp(p[0] - m);
            l += w * p[1];
            for (int j = 0; j < d; ++j) o[j] += w * p[2 + j];
        }
        for (int j = 0; j < d; ++j) o[j] /= l;
    }
}

}  // namespace veloxquant
