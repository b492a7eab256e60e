#include "attention/dense_attention.h"

#include <omp.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "attention/online_softmax.h"

namespace veloxquant {
namespace {

constexpr int kBlock = 64;
constexpr int kRowTile = 8;

// Rows [r0, r1) of one KV head over keys [begin, end): partial (m, l, acc[d]) per row. Each
// block of keys and values is read once for all rows (the GQA group and the queries).
void attend_range(const float* const* q, const int* limits, int rows, const float* keys,
                  const float* values, int d, int begin, int end, float scale, float* const* part) {
    float logits[kBlock], weights[kRowTile][kBlock];
    for (int t0 = begin; t0 < end; t0 += kBlock) {
        const int n = std::min(kBlock, end - t0);
        for (int r = 0; r < rows; ++r) {
            for (int t = 0; t < n; ++t) {
                const float* k = keys + static_cast<std::size_t>(t0 + t) * d;
                float s = 0.0f;
#pragma omp simd reduction(+ : s)
                for (int j = 0; j < d; ++j) s += q[r][j] * k[j];
                logits[t] =
                    t0 + t < limits[r] ? s * scale : -std::numeric_limits<float>::infinity();
            }
            float* p = part[r];
            const float rescale = online_softmax_block(logits, n, p[0], p[1], weights[r]);
            if (rescale != 1.0f)
                for (int j = 0; j < d; ++j) p[2 + j] *= rescale;
        }
        for (int t = 0; t < n; ++t) {
            const float* v = values + static_cast<std::size_t>(t0 + t) * d;
            for (int r = 0; r < rows; ++r) {
                const float w = weights[r][t];
                if (w == 0.0f) continue;
                float* acc = part[r] + 2;
#pragma omp simd
                for (int j = 0; j < d; ++j) acc[j] += w * v[j];
            }
        }
    }
}

}  // namespace

void dense_attention(const float* queries, int num_q_heads, int n_queries, const float* keys,
                     const float* values, int num_kv_heads, int n_keys, int d, float* out,
                     float scale, bool causal) {
    const int group = num_q_heads / num_kv_heads;
    const int rows = group * n_queries;  // per KV head
    const int tiles = (rows + kRowTile - 1) / kRowTile;
    // Split keys into chunks when there are too few row tiles to keep every thread busy.
    const int threads = omp_get_max_threads();
    const int items = num_kv_heads * tiles;
    int chunks = 1;
    if (items < 4 * threads)
        chunks = std::max(1, std::min((n_keys + 255) / 256, (4 * threads + items - 1) / items));
    const int chunk_len = (n_keys + chunks - 1) / chunks;
    const std::size_t stride = static_cast<std::size_t>(d) + 2;
    std::vector<float> part(static_cast<std::size_t>(num_kv_heads) * rows * chunks * stride);
    auto slot = [&](int h, int r, int c) {
        return &part[((static_cast<std::size_t>(h) * rows + r) * chunks + c) * stride];
    };
    auto query = [&](int h, int r) {
        return queries +
               ((static_cast<std::size_t>(h) * group + r / n_queries) * n_queries + r % n_queries) *
                   d;
    };
    auto limit_of = [&](int r) { return causal ? n_keys - n_queries + r % n_queries + 1 : n_keys; };
#pragma omp parallel for schedule(dynamic) collapse(3)
    for (int h = 0; h < num_kv_heads; ++h) {
        for (int tile = 0; tile < tiles; ++tile) {
            for (int c = 0; c < chunks; ++c) {
                const int r0 = tile * kRowTile, r1 = std::min(rows, r0 + kRowTile);
                const float* q[kRowTile];
                float* p[kRowTile];
                int limits[kRowTile];
                int end = 0;
                for (int r = r0; r < r1; ++r) {
                    q[r - r0] = query(h, r);
                    p[r - r0] = slot(h, r, c);
                    p[r - r0][0] = -std::numeric_limits<float>::infinity();
                    p[r - r0][1] = 0.0f;
                    std::fill(p[r - r0] + 2, p[r - r0] + stride, 0.0f);
                    limits[r - r0] = limit_of(r);
                    end = std::max(end, limits[r - r0]);
                }
                const int begin = c * chunk_len;
                end = std::min(end, begin + chunk_len);
                const std::size_t kv = static_cast<std::size_t>(h) * n_keys * d;
                if (begin < end)
                    attend_range(q, limits, r1 - r0, keys + kv, values + kv, d, begin, end, scale,
                                 p);
            }
        }
    }
#pragma omp parallel for schedule(static)
    for (int hr = 0; hr < num_kv_heads * rows; ++hr) {
        const int h = hr / rows, r = hr % rows;
        float* o = out + (query(h, r) - queries);
        float m = -std::numeric_limits<float>::infinity();
        for (int c = 0; c < chunks; ++c) m = std::max(m, slot(h, r, c)[0]);
        std::fill(o, o + d, 0.0f);
        if (m == -std::numeric_limits<float>::infinity()) continue;
        float l = 0.0f;
        for (int c = 0; c < chunks; ++c) {
            const float* p = slot(h, r, c);
            if (p[1] == 0.0f) continue;
            const float w = std::exp(p[0] - m);
            l += w * p[1];
            for (int j = 0; j < d; ++j) o[j] += w * p[2 + j];
        }
        for (int j = 0; j < d; ++j) o[j] /= l;
    }
}

}  // namespace veloxquant
