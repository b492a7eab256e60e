#include "attention/paged_attention.h"

#include <omp.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "attention/online_softmax.h"
#include "cache/outlier_store.h"
#include "cache/paged_store.h"
#include "core/parallel_errors.h"
#include "methods/key_codec.h"
#include "methods/value_codec.h"
#include "model/matmul.h"

namespace veloxquant {
namespace {

constexpr int kRowTile = 8;
// With this many query rows per KV head or more (prefill), pages are decoded once into float
// tiles shared by every row of the head, kTiledRowTile at a time: scoring each row on the codes
// would redo per-row work (query tables, lookups) that one decode plus SIMD matrix products do
// for all of them.
constexpr int kTiledMinRows = 16;
constexpr int kTiledRowTile = 128;
// The partial results of a tiled prefill (a row's max, sum and d accumulators per chunk of
// pages) stay under this: chunks beyond it split the rows instead.
constexpr std::size_t kMaxPartialBytes = std::size_t(64) << 20;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Plan {
    int group, rows, row_tile, tiles, page_slots, chunk_pages, chunks,
        slots;           // slots = chunks + outliers
    bool tiled;          // run_tiles, not run_codes
    std::size_t stride;  // floats per partial
};

float* partial(std::vector<float>& parts, const Plan& plan, int h, int row, int slot) {
    return &parts[((static_cast<std::size_t>(h) * plan.rows + row) * plan.slots + slot) *
                  plan.stride];
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
    // A page wholly before the limit and inside the window (most decode pages) skips the test.
    const bool all_visible = t0 + n <= limit && (a.window <= 0 || t0 >= limit - a.window);
    for (int t = 0; t < n && !all_visible; ++t)
        if (t0 + t >= limit || !in_window(a, t0 + t, limit)) logits[t] = kNegInf;
    if (a.outliers != nullptr) {
        const auto& pos = a.outliers->positions(h);
        for (auto it = std::lower_bound(pos.begin(), pos.end(), t0);
             it != pos.end() && *it < t0 + n; ++it)
            logits[*it - t0] = kNegInf;
    }
}

void scale_acc(float* acc, int d, float r) {
    if (r != 1.0f)
        for (int j = 0; j < d; ++j) acc[j] *= r;
}

// Rows of work item (h, r0..r1) visible up to max_limit; the pages of chunk c they can see.
int last_page(const PagedAttentionArgs& a, const Plan& plan, int r0, int r1, int c, int P) {
    int max_limit = 0;
    for (int r = r0; r < r1; ++r)
        max_limit = std::max(max_limit, visible_limit(a, r % a.n_queries));
    return std::min({plan.page_slots, (c + 1) * plan.chunk_pages, (max_limit + P - 1) / P});
}

const float* query_row(const PagedAttentionArgs& a, const Plan& plan, int h, int r) {
    const int qh = h * plan.group + r / a.n_queries;
    return a.queries + (static_cast<std::size_t>(qh) * a.n_queries + r % a.n_queries) * a.head_dim;
}

// Decoded-tile work item (prefill, or use_fused_sdpa = false): KV head h, rows [r0, r1) (every
// row of the head unless the plan splits them), pages of chunk c. Each page's keys and values are
// decoded once into float tiles (64 tokens, in L1) that serve every row, kTiledRowTile rows at a
// time, through the SIMD products of model/matmul.h: logits = Q K^T, then acc += W V. A page is
// decoded once per KV head, not once per row tile (a 256-token chunk of 4 query heads a KV head has
// 8 tiles), and a row tile skips the pages wholly after its rows. Nothing beyond one page is ever
// materialised.
void run_tiles(const PagedAttentionArgs& a, const Plan& plan, std::vector<float>& parts, int h,
               int r0, int r1, int c) {
    const PagedStore& store = *a.store;
    const KeyCodec& kc = *(*a.key_codecs)[h];
    const ValueCodec& vc = *(*a.value_codecs)[h];
    const int d = a.head_dim, P = store.tokens_per_page(), nr = r1 - r0;
    const int p_end = last_page(a, plan, r0, r1, c, P);
    const int tiles = (nr + kTiledRowTile - 1) / kTiledRowTile;
    std::vector<float> q(static_cast<std::size_t>(nr) * d), kbuf(static_cast<std::size_t>(P) * d),
        vbuf(static_cast<std::size_t>(P) * d), vt(static_cast<std::size_t>(d) * P),
        w(static_cast<std::size_t>(kTiledRowTile) * P),
        pv(static_cast<std::size_t>(kTiledRowTile) * d);
    std::vector<float> rescale(kTiledRowTile);  // each row's softmax rescale of this page
    std::vector<int> tile_limit(tiles, 0);      // the furthest position a row of the tile sees
    for (int r = r0; r < r1; ++r) {             // queries pre-scaled: the logits come out scaled
        const float* qr = query_row(a, plan, h, r);
        float* dst = &q[static_cast<std::size_t>(r - r0) * d];
        for (int j = 0; j < d; ++j) dst[j] = qr[j] * a.scale;
        int& limit = tile_limit[(r - r0) / kTiledRowTile];
        limit = std::max(limit, visible_limit(a, r % a.n_queries));
    }
    for (int p = c * plan.chunk_pages; p < p_end; ++p) {
        if (!store.held(p)) continue;
        const int t0 = p * P, n = std::min(P, a.size - t0);
        kc.decode_at(store.key_codes(p, h), store.key_scalars(p, h), P, n, t0, kbuf.data());
        vc.decode(store.value_codes(p, h), store.value_scalars(p, h), P, n, vbuf.data());
        for (int t = 0; t < n; ++t)
            for (int j = 0; j < d; ++j)
                vt[static_cast<std::size_t>(j) * n + t] = vbuf[static_cast<std::size_t>(t) * d + j];
        const QMatrix keys{GGMLType::F32, reinterpret_cast<const uint8_t*>(kbuf.data()), n, d,
                           static_cast<std::size_t>(d) * sizeof(float)};
        const QMatrix values{GGMLType::F32, reinterpret_cast<const uint8_t*>(vt.data()), d, n,
                             static_cast<std::size_t>(n) * sizeof(float)};
        for (int tile = 0; tile < tiles; ++tile) {
            if (t0 >= tile_limit[tile]) continue;
            const int s0 = r0 + tile * kTiledRowTile, s1 = std::min(r1, s0 + kTiledRowTile);
            const MatmulOut logits{&keys, w.data(), P};
            matmul(&logits, 1, &q[static_cast<std::size_t>(s0 - r0) * d], d, s1 - s0);
            for (int r = s0; r < s1; ++r) {
                float* wr = &w[static_cast<std::size_t>(r - s0) * P];
                const int limit = visible_limit(a, r % a.n_queries);
                float* part = partial(parts, plan, h, r, c);
                if (t0 >= limit) {
                    std::fill(wr, wr + n, 0.0f);
                    rescale[r - s0] = 1.0f;
                    continue;
                }
                mask_logits(a, h, t0, n, limit, wr);
                rescale[r - s0] = online_softmax_block_isa(wr, n, part[0], part[1], wr);
            }
            const MatmulOut mixed{&values, pv.data(), d};
            matmul(&mixed, 1, w.data(), P, s1 - s0);
            for (int r = s0; r < s1; ++r) {  // acc = acc * rescale + W V, one pass
                float* acc = partial(parts, plan, h, r, c) + 2;
                const float* add = &pv[static_cast<std::size_t>(r - s0) * d];
                const float f = rescale[r - s0];
                for (int j = 0; j < d; ++j) acc[j] = acc[j] * f + add[j];
            }
        }
    }
}

// Fused work item (decode): KV head h, rows [r0, r1), pages of chunk c, scored on the codes.
// Per page, every row's logits and softmax weights come first; then the values are read once
// for all rows.
void run_codes(const PagedAttentionArgs& a, const Plan& plan, std::vector<float>& parts, int h,
               int r0, int r1, int c) {
    const PagedStore& store = *a.store;
    const KeyCodec& kc = *(*a.key_codecs)[h];
    const ValueCodec& vc = *(*a.value_codecs)[h];
    const int d = a.head_dim, P = store.tokens_per_page(), nr = r1 - r0;
    const int p_end = last_page(a, plan, r0, r1, c, P);
    const std::size_t qs = kc.query_state_size();
    std::vector<float> states(static_cast<std::size_t>(nr) * qs);
    for (int r = r0; r < r1; ++r)
        kc.prepare_query(query_row(a, plan, h, r), &states[(r - r0) * qs]);
    std::vector<float> logits(static_cast<std::size_t>(nr) * P),
        weights(static_cast<std::size_t>(nr) * P);
    std::vector<float*> acc(nr);
    for (int r = r0; r < r1; ++r) acc[r - r0] = partial(parts, plan, h, r, c) + 2;
    for (int p = c * plan.chunk_pages; p < p_end; ++p) {
        if (!store.held(p)) continue;
        const int t0 = p * P, n = std::min(P, a.size - t0);
        // All rows at once (a codec may share the reading of the codes between them), also any
        // that see none of the page: their logits go unused.
        kc.score_rows_at(states.data(), qs, nr, store.key_codes(p, h), store.key_scalars(p, h), P,
                         n, t0, logits.data(), P);
        for (int r = r0; r < r1; ++r) {
            float* w = &weights[static_cast<std::size_t>(r - r0) * P];
            float* l = &logits[static_cast<std::size_t>(r - r0) * P];
            const int limit = visible_limit(a, r % a.n_queries);
            if (t0 >= limit) {
                std::fill(w, w + n, 0.0f);
                continue;
            }
            for (int t = 0; t < n; ++t) l[t] *= a.scale;
            mask_logits(a, h, t0, n, limit, l);
            float* part = acc[r - r0] - 2;
            scale_acc(acc[r - r0], d, online_softmax_block_isa(l, n, part[0], part[1], w));
        }
        vc.accumulate(weights.data(), P, nr, store.value_codes(p, h), store.value_scalars(p, h), n,
                      acc.data());
    }
}

// The outlier side store of head h, exact dot products, accumulated in the value space.
void run_outliers(const PagedAttentionArgs& a, const Plan& plan, std::vector<float>& parts, int h,
                  int r0, int r1) {
    const OutlierStore& os = *a.outliers;
    const int d = a.head_dim, n = os.count(h);
    if (n == 0) return;
    std::vector<float> keys(static_cast<std::size_t>(n) * d),
        values(static_cast<std::size_t>(n) * d);
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
        const float rescale =
            online_softmax_block_isa(logits.data(), n, part[0], part[1], weights.data());
        scale_acc(part + 2, d, rescale);
        for (int e = 0; e < n; ++e)
            for (int j = 0; j < d; ++j)
                part[2 + j] += weights[e] * values[static_cast<std::size_t>(e) * d + j];
    }
}

}  // namespace

void paged_attention(const PagedAttentionArgs& a) {
    const int d = a.head_dim;
    Plan plan;
    plan.group = a.num_q_heads / a.num_heads;
    plan.rows = plan.group * a.n_queries;
    plan.tiled = !a.fused || plan.rows >= kTiledMinRows;
    plan.page_slots = a.store->page_slots();
    plan.stride = static_cast<std::size_t>(d) + 2;
    const int threads = omp_get_max_threads();
    if (plan.tiled) {
        // Chunks of pages first, so that each page is decoded once per KV head: four items a
        // thread or more, their count a multiple of the threads (an item holds every row of its
        // head: equal items then end together), as far as the pages and kMaxPartialBytes allow.
        // Rows are split (each part decoding the pages again) only where those chunks leave
        // threads idle.
        const std::size_t chunk_bytes =
            static_cast<std::size_t>(a.num_heads) * plan.rows * plan.stride * sizeof(float);
        const int memory_chunks = static_cast<int>(std::clamp<std::size_t>(
            kMaxPartialBytes / chunk_bytes, 1, std::numeric_limits<int>::max()));
        int chunks = (4 * threads + a.num_heads - 1) / a.num_heads;
        while (a.num_heads * chunks % threads != 0) ++chunks;
        plan.chunks = std::clamp(chunks, 1, std::max(1, std::min(plan.page_slots, memory_chunks)));
        const int items = a.num_heads * plan.chunks;
        const int most_splits = std::max(1, (plan.rows + kTiledRowTile - 1) / kTiledRowTile);
        const int splits =
            items >= 4 * threads ? 1 : std::min(most_splits, (4 * threads + items - 1) / items);
        const int part_rows = (plan.rows + splits - 1) / splits;
        plan.row_tile = (part_rows + kTiledRowTile - 1) / kTiledRowTile * kTiledRowTile;
        plan.tiles = (plan.rows + plan.row_tile - 1) / plan.row_tile;
    } else {
        plan.row_tile = kRowTile;
        plan.tiles = (plan.rows + plan.row_tile - 1) / plan.row_tile;
        const int items = a.num_heads * plan.tiles;
        plan.chunks = 1;
        if (items < 4 * threads && plan.page_slots > 1)
            plan.chunks = std::min(plan.page_slots, (4 * threads + items - 1) / items);
    }
    plan.chunk_pages = std::max(1, (plan.page_slots + plan.chunks - 1) / plan.chunks);
    plan.chunks =
        plan.page_slots == 0 ? 1 : (plan.page_slots + plan.chunk_pages - 1) / plan.chunk_pages;
    const bool has_outliers = a.outliers != nullptr && a.outliers->total() > 0;
    plan.slots = plan.chunks + (has_outliers ? 1 : 0);

    std::vector<float> parts(
        static_cast<std::size_t>(a.num_heads) * plan.rows * plan.slots * plan.stride, 0.0f);
    for (std::size_t i = 0; i < parts.size(); i += plan.stride) parts[i] = kNegInf;

    const int total = a.num_heads * plan.tiles * plan.slots;
    ParallelErrors errors;
#pragma omp parallel for schedule(dynamic)
    for (int w = 0; w < total; ++w) {
        errors.run(w, [&] {
            const int slot = w % plan.slots;
            const int tile = (w / plan.slots) % plan.tiles;
            const int h = w / (plan.slots * plan.tiles);
            const int r0 = tile * plan.row_tile, r1 = std::min(plan.rows, r0 + plan.row_tile);
            if (slot >= plan.chunks)
                run_outliers(a, plan, parts, h, r0, r1);
            else if (plan.tiled)
                run_tiles(a, plan, parts, h, r0, r1, slot);
            else
                run_codes(a, plan, parts, h, r0, r1, slot);
        });
    }
    errors.rethrow();

#pragma omp parallel
    {
        std::vector<float> coded, plain, mapped;
#pragma omp for schedule(static)
        for (int hr = 0; hr < a.num_heads * plan.rows; ++hr) {
            errors.run(hr, [&] {
                coded.resize(d), plain.resize(d), mapped.resize(d);
                const int h = hr / plan.rows, r = hr % plan.rows;
                const int qh = h * plan.group + r / a.n_queries;
                float* o =
                    a.out + (static_cast<std::size_t>(qh) * a.n_queries + r % a.n_queries) * d;
                float m = kNegInf;
                for (int s = 0; s < plan.slots; ++s)
                    m = std::max(m, partial(parts, plan, h, r, s)[0]);
                std::fill(o, o + d, 0.0f);
                if (m == kNegInf) return;
                std::fill(coded.begin(), coded.end(), 0.0f);
                std::fill(plain.begin(), plain.end(), 0.0f);
                float l = 0.0f;
                for (int s = 0; s < plan.slots; ++s) {
                    const float* p = partial(parts, plan, h, r, s);
                    if (p[1] == 0.0f) continue;
                    const float w = std::exp(p[0] - m);
                    l += w * p[1];
                    // run_codes partials live in the value codec's domain; tiles and outliers in
                    // plain space.
                    float* dst = (!plan.tiled && s < plan.chunks) ? coded.data() : plain.data();
                    for (int j = 0; j < d; ++j) dst[j] += w * p[2 + j];
                }
                if (!plan.tiled) {
                    (*a.value_codecs)[h]->finalize(coded.data(), mapped.data());
                    for (int j = 0; j < d; ++j) plain[j] += mapped[j];
                }
                for (int j = 0; j < d; ++j) o[j] = plain[j] / l;
            });
        }
    }
    errors.rethrow();
}

}  // namespace veloxquant
