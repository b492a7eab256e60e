#include "attention/paged_attention.h"

#include <algorithm>
#include <limits>
#include <vector>

#include <omp.h>

#include "attention/online_softmax.h"
#include "cache/outlier_store.h"
#include "cache/paged_store.h"
#include "methods/key_codec.h"
#include "methods/value_codec.h"

namespace veloxquant {
namespace {

constexpr int kRowTile = 8;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Plan {
    int group, rows, tiles, page_slots, chunk_pages, chunks, slots;  // slots = chunks + outliers
    std::size_t stride;                                             // floats per partial
};

float* partial(std::vector<float>& parts, const Plan& plan, int h, int row, int slot) {
    return &parts[((static_cast<std::size_t>(h) * plan.rows + row) * plan.slots + slot) * plan.stride];
}

// Position of query `i` (the n queries are the last n positions when causal).
int visible_limit(const PagedAttentionArgs& a, int i) {
    return a.causal ? std::min(a.size, a.size - a.n_queries + i + 1) : a.size;
}

// Sliding window relative to the query's own position (the last position when not causal).
bool in_window(const PagedAttentionArgs& a, int t, int limit) {
    return a.window <= 0 || t < a.sinks || t >= limit - a.window;
}

// Logit masking for one page: -inf where the token is beyond the query, outside the window,
// or held in the outlier side store.
void mask_logits(const PagedAttentionArgs& a, int h, int t0, int n, int limit, float* logits) {
    for (int t = 0; t < n; ++t)
        if (t0 + t >= limit || !in_window(a, t0 + t, limit)) logits[t] = kNegInf;
    if (a.outliers != nullptr) {
        const auto& pos = a.outliers->positions(h);
        for (auto it = std::lower_bound(pos.begin(), pos.end(), t0); it != pos.end() && *it < t0 + n; ++it)
            logits[*it - t0] = kNegInf;
    }
}

void scale_acc(float* acc, int d, float r) {
    if (r != 1.0f)
        for (int j = 0; j < d; ++j) acc[j] *= r;
}

// One work item: KV head h, rows [r0, r1) of that head, pages of chunk c. Per page, every
// row's logits and softmax weights come first; then the values are read once for all rows.
void run_pages(const PagedAttentionArgs& a, const Plan& plan, std::vector<float>& parts, int h,
               int r0, int r1, int c) {
    const PagedStore& store = *a.store;
    const KeyCodec& kc = *(*a.key_codecs)[h];
    const ValueCodec& vc = *(*a.value_codecs)[h];
    const int d = a.head_dim, P = store.tokens_per_page();
    const int nr = r1 - r0;
    int max_limit = 0;
    for (int r = r0; r < r1; ++r) max_limit = std::max(max_limit, visible_limit(a, r % a.n_queries));
    const int p_begin = c * plan.chunk_pages;
    const int p_end = std::min({plan.page_slots, p_begin + plan.chunk_pages, (max_limit + P - 1) / P});

    auto query = [&](int r) {
        const int qh = h * plan.group + r / a.n_queries;
        return a.queries + (static_cast<std::size_t>(qh) * a.n_queries + r % a.n_queries) * d;
    };
    std::vector<float> states, kbuf, vbuf;
    if (a.fused) {
        states.resize(static_cast<std::size_t>(nr) * kc.query_state_size());
        for (int r = r0; r < r1; ++r)
            kc.prepare_query(query(r), &states[static_cast<std::size_t>(r - r0) * kc.query_state_size()]);
    } else {
        kbuf.resize(static_cast<std::size_t>(P) * d);
        vbuf.resize(static_cast<std::size_t>(P) * d);
    }
    std::vector<float> logits(P), weights(static_cast<std::size_t>(nr) * P);
    std::vector<float*> acc(nr);
    for (int r = r0; r < r1; ++r) acc[r - r0] = partial(parts, plan, h, r, c) + 2;
    for (int p = p_begin; p < p_end; ++p) {
        if (!store.held(p)) continue;
        const int t0 = p * P, n = std::min(P, a.size - t0);
        if (!a.fused) {
            kc.decode_at(store.key_codes(p, h), store.key_scalars(p, h), P, n, t0, kbuf.data());
            vc.decode(store.value_codes(p, h), store.value_scalars(p, h), P, n, vbuf.data());
        }
        for (int r = r0; r < r1; ++r) {
            float* w = &weights[static_cast<std::size_t>(r - r0) * P];
            const int limit = visible_limit(a, r % a.n_queries);
            if (t0 >= limit) {
                std::fill(w, w + n, 0.0f);
                continue;
            }
            if (a.fused) {
                kc.score_at(&states[static_cast<std::size_t>(r - r0) * kc.query_state_size()],
                            store.key_codes(p, h), store.key_scalars(p, h), P, n, t0, logits.data());
            } else {
                const float* q = query(r);
                for (int t = 0; t < n; ++t) {
                    const float* k = &kbuf[static_cast<std::size_t>(t) * d];
                    float s = 0.0f;
#pragma omp simd reduction(+ : s)
                    for (int j = 0; j < d; ++j) s += q[j] * k[j];
                    logits[t] = s;
                }
            }
            for (int t = 0; t < n; ++t) logits[t] *= a.scale;
            mask_logits(a, h, t0, n, limit, logits.data());
            float* part = acc[r - r0] - 2;
            scale_acc(acc[r - r0], d, online_softmax_block(logits.data(), n, part[0], part[1], w));
        }
        if (a.fused) {
            vc.accumulate(weights.data(), P, nr, store.value_codes(p, h), store.value_scalars(p, h), n, acc.data());
        } else {
            for (int t = 0; t < n; ++t) {
                const float* v = &vbuf[static_cast<std::size_t>(t) * d];
                for (int r = 0; r < nr; ++r) {
                    const float wt = weights[static_cast<std::size_t>(r) * P + t];
                    if (wt == 0.0f) continue;
#pragma omp simd
                    for (int j = 0; j < d; ++j) acc[r][j] += wt * v[j];
                }
            }
        }
    }
}

// The outlier side store of head h, exact dot products, accumulated in the value space.
void run_outliers(const PagedAttentionArgs& a, const Plan& plan, std::vector<float>& parts, int h,
                  int r0, int r1) {
    const OutlierStore& os = *a.outliers;
    const int d = a.head_dim, n = os.count(h);
    if (n == 0) return;
    std::vector<float> keys(static_cast<std::size_t>(n) * d), values(static_cast<std::size_t>(n) * d);
    for (int e = 0; e < n; ++e) {
        os.key(h, e, &keys[static_cast<std::size_t>(e) * d]);
        os.value(h, e, &values[static_cast<std::size_t>(e) * d]);
    }
    const auto& pos = os.positions(h);
    std::vector<float> logits(n), weights(n);
    for (int r = r0; r < r1; ++r) {
        const int i = r % a.n_queries;
        const int qh = h * plan.group + r / a.n_queries;
        const float* q = a.queries + (static_cast<std::size_t>(qh) * a.n_queries + i) * d;
        const int limit = visible_limit(a, i);
        for (int e = 0; e < n; ++e) {
            if (pos[e] >= limit || !in_window(a, pos[e], limit)) {
                logits[e] = kNegInf;
                continue;
            }
            float s = 0.0f;
            for (int j = 0; j < d; ++j) s += q[j] * keys[static_cast<std::size_t>(e) * d + j];
            logits[e] = s * a.scale;
        }
        float* part = partial(parts, plan, h, r, plan.chunks);
        const float rescale = online_softmax_block(logits.data(), n, part[0], part[1], weights.data());
        scale_acc(part + 2, d, rescale);
        for (int e = 0; e < n; ++e)
            for (int j = 0; j < d; ++j) part[2 + j] += weights[e] * values[static_cast<std::size_t>(e) * d + j];
    }
}

}  // namespace

void paged_attention(const PagedAttentionArgs& a) {
    const int d = a.head_dim;
    Plan plan;
    plan.group = a.num_q_heads / a.num_heads;
    plan.rows = plan.group * a.n_queries;
    plan.tiles = (plan.rows + kRowTile - 1) / kRowTile;
    plan.page_slots = a.store->page_slots();
    const int threads = omp_get_max_threads();
    const int items = a.num_heads * plan.tiles;
    plan.chunks = 1;
    if (items < 4 * threads && plan.page_slots > 1)
        plan.chunks = std::min(plan.page_slots, (4 * threads + items - 1) / items);
    plan.chunk_pages = std::max(1, (plan.page_slots + plan.chunks - 1) / plan.chunks);
    plan.chunks = plan.page_slots == 0 ? 1 : (plan.page_slots + plan.chunk_pages - 1) / plan.chunk_pages;
    const bool has_outliers = a.outliers != nullptr && a.outliers->total() > 0;
    plan.slots = plan.chunks + (has_outliers ? 1 : 0);
    plan.stride = static_cast<std::size_t>(d) + 2;

    std::vector<float> parts(static_cast<std::size_t>(a.num_heads) * plan.rows * plan.slots * plan.stride, 0.0f);
    for (std::size_t i = 0; i < parts.size(); i += plan.stride) parts[i] = kNegInf;

    const int total = a.num_heads * plan.tiles * plan.slots;
#pragma omp parallel for schedule(dynamic)
    for (int w = 0; w < total; ++w) {
        const int slot = w % plan.slots;
        const int tile = (w / plan.slots) % plan.tiles;
        const int h = w / (plan.slots * plan.tiles);
        const int r0 = tile * kRowTile, r1 = std::min(plan.rows, r0 + kRowTile);
        if (slot < plan.chunks) run_pages(a, plan, parts, h, r0, r1, slot);
        else run_outliers(a, plan, parts, h, r0, r1);
    }

#pragma omp parallel
    {
        std::vector<float> coded(d), plain(d), mapped(d);
#pragma omp for schedule(static)
        for (int hr = 0; hr < a.num_heads * plan.rows; ++hr) {
            const int h = hr / plan.rows, r = hr % plan.rows;
            const int qh = h * plan.group + r / a.n_queries;
            float* o = a.out + (static_cast<std::size_t>(qh) * a.n_queries + r % a.n_queries) * d;
            float m = kNegInf;
            for (int s = 0; s < plan.slots; ++s) m = std::max(m, partial(parts, plan, h, r, s)[0]);
            std::fill(o, o + d, 0.0f);
            if (m == kNegInf) continue;
            std::fill(coded.begin(), coded.end(), 0.0f);
            std::fill(plain.begin(), plain.end(), 0.0f);
            float l = 0.0f;
            for (int s = 0; s < plan.slots; ++s) {
                const float* p = partial(parts, plan, h, r, s);
                if (p[1] == 0.0f) continue;
                const float w = std::exp(p[0] - m);
                l += w * p[1];
                // Fused page partials live in the value codec's domain; outliers in plain space.
                float* dst = (a.fused && s < plan.chunks) ? coded.data() : plain.data();
                for (int j = 0; j < d; ++j) dst[j] += w * p[2 + j];
            }
            if (a.fused) {
                (*a.value_codecs)[h]->finalize(coded.data(), mapped.data());
                for (int j = 0; j < d; ++j) plain[j] += mapped[j];
            } else {
                for (int j = 0; j < d; ++j) plain[j] += coded[j];
            }
            for (int j = 0; j < d; ++j) o[j] = plain[j] / l;
        }
    }
}

}  // namespace veloxquant
