#include "cuda/codec_batch.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <stdexcept>
#include <string>

#include "cuda/cuda_cache.h"
#include "cuda/rabitq_training.h"
#include "methods/key_codec.h"
#include "veloxquant/caches.h"

namespace veloxquant::cuda {
namespace {

std::vector<const CudaCodecCache*> as_const(const std::vector<CudaCodecCache*>& caches) {
    return {caches.begin(), caches.end()};
}

bool same_view(const CodecParamsView& a, const CodecParamsView& b) {
    const AffineState &f = a.affine, &g = b.affine;
    return a.keys == b.keys && a.values == b.values && f.constant == g.constant &&
           f.matrix == g.matrix && f.row_of == g.row_of && f.varying == g.varying &&
           f.stride == g.stride && a.state_stride == b.state_stride &&
           a.key_table_floats == b.key_table_floats &&
           a.value_table_floats == b.value_table_floats && a.feature_mode == b.feature_mode;
}

bool same_side(const OutlierView& a, const OutlierView& b) {
    return a.records == b.records && a.positions == b.positions && a.counts == b.counts &&
           a.mask == b.mask && a.capacity == b.capacity && a.mask_words == b.mask_words &&
           a.bits == b.bits && a.vector_bytes == b.vector_bytes && a.sequences == b.sequences &&
           a.mask_rows == b.mask_rows;
}

}  // namespace

bool CudaCodecBatch::alike(const std::vector<const CudaCodecCache*>& caches) {
    check_distinct(caches, "alike");
    const CudaCodecCache& first = *caches[0];
    for (const CudaCodecCache* c : caches)
        if (!c->backend_ || c->device_ != first.device_ || c->kind_ != first.kind_ ||
            c->window_.window != first.window_.window || c->window_.sinks != first.window_.sinks)
            return false;
    return true;
}

KinParams CudaCodecBatch::kin_params(const std::vector<CudaCodecCache*>& caches,
                                     cudaStream_t stream) {
    const CudaCodecCache& first = *caches[0];
    if (std::all_of(caches.begin(), caches.end(),
                    [&](const CudaCodecCache* c) { return c->fingerprint_ == first.fingerprint_; }))
        return {};  // one set of codecs: caches[0]'s backend's own
    KinParams kin;
    kin.affine = true;
    kin.feature_mode = caches[0]->backend_->params_view().feature_mode;
    std::vector<CodecParamsView> views;
    for (const CudaCodecCache* c : caches) {
        views.push_back(c->backend_->params_view());
        const CodecParamsView& v = views.back();
        if (v.feature_mode != kin.feature_mode) kin.feature_mode = 0;  // lane scores
        kin.state_stride = std::max(kin.state_stride, v.state_stride);
        kin.key_table_floats = std::max(kin.key_table_floats, v.key_table_floats);
        kin.value_table_floats = std::max(kin.value_table_floats, v.value_table_floats);
        kin.affine = kin.affine && v.affine.constant != nullptr;
    }
    kin.views = kin_views_.update(views, same_view, stream, "batch codecs");
    return kin;
}

OutlierView CudaCodecBatch::side_params(const std::vector<CudaCodecCache*>& caches,
                                        cudaStream_t stream) {
    OutlierView side;
    if (std::none_of(caches.begin(), caches.end(),
                     [](const CudaCodecCache* c) { return c->outlier_tokens() > 0; }))
        return side;  // nothing to skip or add
    std::vector<OutlierView> views;
    std::vector<const uint32_t*> rows;
    for (const CudaCodecCache* c : caches) {
        views.push_back(c->outliers_ ? c->outliers_->view() : OutlierView{});
        for (int h = 0; h < c->num_heads_; ++h)
            rows.push_back(views.back().active() ? views.back().mask_row(0, h) : nullptr);
    }
    side.sequences = side_views_.update(views, same_side, stream, "batch outlier stores");
    side.mask_rows =
        mask_rows_.update(rows, std::equal_to<const uint32_t*>(), stream, "batch outlier masks");
    return side;
}

void CudaCodecBatch::append(const std::vector<CudaCodecCache*>& caches, const float* keys,
                            const float* values, int n_tokens, cudaStream_t stream) {
    check_distinct(caches, "append");
    const CudaCodecCache& first = *caches[0];
    const float key_bound = first.config_.key_bound(), value_bound = first.config_.value_bound();
    for (size_t b = 1; b < caches.size(); ++b) {
        const CudaCodecCache& c = *caches[b];
        if (c.device_ != first.device_ || c.num_heads_ != first.num_heads_ ||
            c.head_dim_ != first.head_dim_ || c.config_.key_bound() != key_bound ||
            c.config_.value_bound() != value_bound)
            throw std::invalid_argument(
                "append: the cache of sequence " + std::to_string(b) +
                " differs from sequence 0's in shape, storage or device (a batch takes one "
                "layer's caches, made alike)");
    }
    check_append(caches, keys, values, n_tokens);
    if (n_tokens == 0) return;
    const int batch = static_cast<int>(caches.size());
    const size_t per_sequence = static_cast<size_t>(first.num_heads_) * n_tokens * first.head_dim_;
    // The keys' norms for the outlier observers come back with the input check's synchronization.
    for (int b = 0; b < batch; ++b)
        if (caches[b]->outliers_)
            caches[b]->outliers_->measure(keys + b * per_sequence, n_tokens, stream);
    input_check_.require(keys, values, first.num_heads_, n_tokens, first.head_dim_, key_bound,
                         value_bound, stream, batch);
    // Room for the new tokens: a window's pages from its pool's free slots (given back if the
    // batch fails), another cache's pool grown.
    const int P = kTokensPerPage;
    for (CudaCodecCache* c : caches) {
        if (c->pages_->mapped())
            c->pages_->hold(c->size_ / P, (c->size_ + n_tokens + P - 1) / P, stream);
        else
            c->pages_->reserve(c->size_ + n_tokens);
    }
    // Codecs that train do so on their first keys, every one before any encode; the outlier
    // observers see the sequences' norms after it, sequence by sequence. The batch is all or
    // nothing: if a training, an encode or an outlier record throws, every cache keeps its size
    // (codes written past it are never read or saved), its side store and its observer's
    // statistics, and the caches trained here forget it.
    std::vector<int> sizes;
    std::vector<std::vector<KeyNormObserver::Stats>> stats;
    std::vector<CudaCodecCache*> trained;
    for (const CudaCodecCache* c : caches) {
        sizes.push_back(c->size_);
        stats.push_back(c->observer_stats());
    }
    std::vector<const float*> trained_keys;
    for (int b = 0; b < batch; ++b)
        if (!caches[b]->backend_) {
            trained.push_back(caches[b]);
            trained_keys.push_back(keys + b * per_sequence);
        }
    try {
        train(trained, trained_keys, n_tokens, stream);
        encode(caches, keys, values, n_tokens, per_sequence, stream);
        for (int b = 0; b < batch; ++b)
            caches[b]->observe_outliers(keys + b * per_sequence, values + b * per_sequence,
                                        n_tokens, sizes[b], stream);
    } catch (...) {
        // In reverse, so that an observer the caches share ends with sequence 0's statistics.
        for (int b = batch - 1; b >= 0; --b) {
            CudaCodecCache& c = *caches[b];
            c.size_ = sizes[b];
            if (c.pages_->mapped())
                c.pages_->release((sizes[b] + P - 1) / P, (sizes[b] + n_tokens + P - 1) / P);
            c.observer_restore(stats[b], sizes[b]);
        }
        for (CudaCodecCache* c : trained) c->forget_training();
        throw;
    }
    // Each window gives back what its first new token's window no longer needs.
    for (int b = 0; b < batch; ++b)
        if (caches[b]->window_.window > 0)
            caches[b]->evict_before(sizes[b] + 1 - caches[b]->window_.window, stream);
}

void CudaCodecBatch::train(const std::vector<CudaCodecCache*>& fresh,
                           const std::vector<const float*>& keys, int n_tokens,
                           cudaStream_t stream) {
    std::vector<KeyCodec*> codecs;
    std::vector<const float*> rows;
    bool together = fresh.size() > 1;
    for (std::size_t i = 0; i < fresh.size() && together; ++i) {
        together = !fresh[i]->center_.enabled();
        const std::vector<const float*> heads = fresh[i]->head_keys(keys[i], n_tokens);
        rows.insert(rows.end(), heads.begin(), heads.end());
        for (auto& codec : fresh[i]->key_codecs_) codecs.push_back(codec.get());
    }
    if (together && train_rabitq_on_device(codecs, rows, n_tokens, stream)) {
        for (CudaCodecCache* c : fresh) c->build_backend();
        return;
    }
    for (std::size_t i = 0; i < fresh.size(); ++i) fresh[i]->train_on(keys[i], n_tokens, stream);
}

void CudaCodecBatch::encode(const std::vector<CudaCodecCache*>& caches, const float* keys,
                            const float* values, int n_tokens, size_t per_sequence,
                            cudaStream_t stream) {
    CudaCodecCache& first = *caches[0];
    const int batch = static_cast<int>(caches.size());
    // One launch writes every sequence; centred keys are first shifted by their own sequence's
    // mean, all in one launch too (KeyCenter::centred_batch). Sliding windows encode one by one
    // (each through its own page table).
    if (batch > 1 && alike(as_const(caches)) && first.window_.window == 0) {
        std::vector<const uint8_t*> pools;
        std::vector<int32_t> starts;
        int last = 0, pages = 1;
        bool centring = false;
        for (const CudaCodecCache* c : caches) {
            pools.push_back(c->pages_->pool());
            starts.push_back(c->size_);
            last = std::max(last, c->size_);
            pages = std::max(pages, c->pages_->capacity_pages());
            centring = centring || c->center_.centering();
            // The decodes' page phases, for the pool's capacity (CudaCodecCache::encode_tokens).
            if (c->center_.enabled()) c->center_.reserve_pages(c->pages_->capacity_pages(), stream);
        }
        encode_arrays_.describe(pools, starts, pages, stream);
        SequenceSet at;
        at.pools = encode_arrays_.pools();
        at.sizes = encode_arrays_.lens();
        at.page_table = encode_arrays_.page_table();
        at.batch = batch;
        at.size = last;
        at.kin = kin_params(caches, stream);
        const float* shifted = keys;
        if (centring) {  // each sequence's damped mean (zeros where it does not centre)
            centres_.describe(damped_means(caches), starts, 1, stream);
            shifted = first.center_.centred_batch(
                keys, n_tokens, batch, reinterpret_cast<const float* const*>(centres_.pools()),
                centres_.lens(), stream);
        }
        try {
            first.backend_->encode(at, n_tokens, shifted, values, stream);
        } catch (...) {
            first.center_.release_scratch(stream);
            throw;
        }
        first.center_.release_scratch(stream);
        for (CudaCodecCache* c : caches) c->size_ += n_tokens;
        return;
    }
    for (int b = 0; b < batch; ++b) {  // one sequence, or caches not alike
        CudaCodecCache& c = *caches[b];
        c.encode_tokens(keys + b * per_sequence, values + b * per_sequence, n_tokens, stream);
        c.size_ += n_tokens;
    }
}

void CudaCodecBatch::attend(const std::vector<CudaCodecCache*>& caches, const float* queries,
                            int num_q_heads, float* out, float scale, cudaStream_t stream) {
    if (!alike(as_const(caches)))
        throw std::invalid_argument(
            "attend: the caches differ in config, layer, shape, window or device, or a codec is "
            "not trained yet: attend them one by one");
    CudaCodecCache& first = *caches[0];
    const int group = first.query_group(queries, out, num_q_heads, scale);
    std::vector<const uint8_t*> pools, tables;
    std::vector<int32_t> sizes;
    int longest = 0, pages = 1, span = 0;
    for (size_t b = 0; b < caches.size(); ++b) {
        const CudaCodecCache& c = *caches[b];
        if (c.size_ == 0)
            throw std::invalid_argument("attend: the cache of sequence " + std::to_string(b) +
                                        " holds no tokens");
        pools.push_back(c.pages_->pool());
        tables.push_back(reinterpret_cast<const uint8_t*>(c.pages_->page_table()));
        sizes.push_back(c.size_);
        longest = std::max(longest, c.size_);
        pages = std::max(pages, c.pages_->capacity_pages());
        span = std::max(span, c.size_ - c.window_.gap(c.size_));
    }
    arrays_.describe(pools, sizes, pages, stream);
    SequenceSet source;
    source.pools = arrays_.pools();
    source.sizes = arrays_.lens();
    source.page_table = arrays_.page_table();  // row 0: the identity, as wide as any pool
    source.batch = static_cast<int>(caches.size());
    source.size = longest;
    source.kin = kin_params(caches, stream);
    source.outliers = side_params(caches, stream);
    if (first.window_.window > 0) {  // each window's own page table; splits over the longest span
        tables_.describe(tables, sizes, 1, stream);
        source.page_tables = reinterpret_cast<const int32_t* const*>(tables_.pools());
        source.window = first.window_;
        source.span = span;
    }
    if (std::any_of(caches.begin(), caches.end(),
                    [](const CudaCodecCache* c) { return c->center_.centering(); })) {
        // Each sequence's own damped mean (zeros where a cache does not centre), and the
        // longest sequence's page phases, which cover every sequence's pages (the caches share
        // the RoPE parameters: alike).
        centres_.describe(damped_means(caches), sizes, 1, stream);
        const CudaCodecCache& widest = **std::max_element(
            caches.begin(), caches.end(),
            [](const CudaCodecCache* x, const CudaCodecCache* y) { return x->size_ < y->size_; });
        source.center = widest.phase_params(stream);  // though widest may not centre
        source.center.damped = reinterpret_cast<const float* const*>(centres_.pools());
    }
    first.backend_->attend(source, queries, group, 1, out, scale, false, stream);
}

}  // namespace veloxquant::cuda
