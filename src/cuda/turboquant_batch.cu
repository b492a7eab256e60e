#include "cuda/turboquant_batch.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "veloxquant/caches.h"

namespace veloxquant::cuda {
namespace {

/// One codec: the same layout parameters and the same rotation signs and codebooks (the
/// caches of one config and one layer).
bool same_codec(const TqHostTables& a, const TqHostTables& b) {
    const TqPageLayout &x = a.layout, &y = b.layout;
    return x.head_dim == y.head_dim && x.key_bits == y.key_bits && x.key_stages == y.key_stages &&
           x.value_bits == y.value_bits && x.num_kv_heads == y.num_kv_heads &&
           a.key_signs == b.key_signs && a.value_signs == b.value_signs &&
           a.key_centroids == b.key_centroids && a.key_boundaries == b.key_boundaries &&
           a.value_centroids == b.value_centroids && a.value_boundaries == b.value_boundaries;
}

}  // namespace

void CudaTurboQuantBatch::check_batch(const std::vector<const CudaTurboQuantCache*>& caches,
                                      const char* what) {
    if (!caches.empty() && caches.size() == checked_.size() &&
        std::equal(caches.begin(), caches.end(), checked_.begin(),
                   [](const CudaTurboQuantCache* c, uint64_t serial) {
                       return c != nullptr && c->serial_ == serial;
                   }))
        return;  // these very caches passed before (a cache's codec never changes)
    checked_.clear();
    check_distinct(caches, what);
    const CudaTurboQuantCache& first = *caches[0];
    for (size_t b = 1; b < caches.size(); ++b) {
        const CudaTurboQuantCache& c = *caches[b];
        if (c.device() != first.device() || !same_codec(c.host_, first.host_) ||
            !c.center_.alike(first.center_) || c.window_.window != first.window_.window ||
            c.window_.sinks != first.window_.sinks)
            throw std::invalid_argument(
                std::string(what) + ": the cache of sequence " + std::to_string(b) +
                " differs from sequence 0's in config, layer, shape, window or device (a batch "
                "takes one layer's caches, made alike)");
    }
    for (const CudaTurboQuantCache* c : caches) checked_.push_back(c->serial_);
}

CudaTurboQuantBatch::~CudaTurboQuantBatch() {
    cudaFree(workspace_);
    cudaFree(page_bias_);
}

void CudaTurboQuantBatch::append(const std::vector<CudaTurboQuantCache*>& caches, const float* keys,
                                 const float* values, int n_tokens, cudaStream_t stream) {
    check_batch(std::vector<const CudaTurboQuantCache*>(caches.begin(), caches.end()), "append");
    check_append(caches, keys, values, n_tokens);
    if (n_tokens == 0) return;
    for (const CudaTurboQuantCache* c : caches) c->require_key_mean("append");
    CudaTurboQuantCache& first = *caches[0];
    const int batch = static_cast<int>(caches.size());
    input_check_.require(keys, values, first.num_heads_, n_tokens, first.head_dim_,
                         first.key_bound_, first.value_bound_, stream, batch);
    std::vector<int> sizes;
    for (CudaTurboQuantCache* c : caches) {
        sizes.push_back(c->size_);
        c->make_room(n_tokens, stream);
    }
    // Centred caches estimate their means on their first keys, every one before the encode. All
    // or nothing: if an estimate or the encode throws, the caches estimated here forget it (as
    // CudaTurboQuantCache::encode_tokens does), windows give back the slots taken for new pages,
    // and no size changes.
    const size_t per_sequence = static_cast<size_t>(first.num_heads_) * n_tokens * first.head_dim_;
    std::vector<CudaTurboQuantCache*> estimated;
    try {
        if (batch == 1) {
            first.encode_tokens(keys, values, n_tokens, stream);
        } else {
            for (int b = 0; b < batch; ++b) {
                KeyCenter& centre = caches[b]->center_;
                if (centre.enabled() && !centre.estimated()) {
                    estimated.push_back(caches[b]);
                    centre.estimate(keys + b * per_sequence, n_tokens, stream);
                }
            }
            encode(caches, keys, values, n_tokens, stream);
            for (CudaTurboQuantCache* c : caches) c->size_ += n_tokens;
        }
    } catch (...) {
        for (CudaTurboQuantCache* c : estimated) c->center_.forget();
        for (int b = 0; b < batch; ++b)
            if (caches[b]->pages_.mapped())
                caches[b]->pages_.release(
                    (sizes[b] + kTokensPerPage - 1) / kTokensPerPage,
                    (sizes[b] + n_tokens + kTokensPerPage - 1) / kTokensPerPage);
        throw;
    }
    for (int b = 0; b < batch; ++b) caches[b]->evict_after_append(sizes[b]);
}

void CudaTurboQuantBatch::encode(const std::vector<CudaTurboQuantCache*>& caches, const float* keys,
                                 const float* values, int n_tokens, cudaStream_t stream) {
    CudaTurboQuantCache& first = *caches[0];
    const int batch = static_cast<int>(caches.size());
    std::vector<const uint8_t*> pools, tables;
    std::vector<int32_t> starts;
    int pages = 1;
    bool centring = false;
    for (CudaTurboQuantCache* c : caches) {
        pools.push_back(c->pages_.pool());
        tables.push_back(reinterpret_cast<const uint8_t*>(c->pages_.page_table()));
        starts.push_back(c->size_);
        pages = std::max(pages, c->pages_.capacity_pages());
        centring = centring || c->center_.centering();
        // The decodes' page phases, for the pool's capacity (as encode_tokens reserves them).
        if (c->center_.enabled()) c->center_.reserve_pages(c->pages_.capacity_pages(), stream);
    }
    const bool short_append = n_tokens < kShortAppendTokens;
    if (short_append) encode_arrays_.describe(pools, starts, pages, stream);
    const float* shifted = keys;
    if (centring) {  // each sequence's keys less its own centres (zeros where it does not centre)
        centres_.describe(damped_means(caches), starts, 1, stream);
        shifted = first.center_.centred_batch(
            keys, n_tokens, batch, reinterpret_cast<const float* const*>(centres_.pools()),
            centres_.lens(), stream);
    }
    EncodeArgs a;
    a.layout = first.host_.layout;
    a.tables = first.tables_.get();
    a.n_tokens = n_tokens;
    cudaError_t err = cudaSuccess;
    if (short_append) {  // a decode step: one launch for every sequence
        a.pools = const_cast<uint8_t* const*>(encode_arrays_.pools());
        a.starts = encode_arrays_.lens();
        a.page_table = encode_arrays_.page_table();
        if (first.window_.window > 0) {  // each window's own page table
            tables_.describe(tables, starts, 1, stream);
            a.page_tables = reinterpret_cast<const int32_t* const*>(tables_.pools());
        }
        a.batch = batch;
        a.keys = shifted;
        a.values = values;
        err = launch_encode(a, stream);
    } else {  // prefills: the bulk encoders, a launch a sequence
        const size_t per_sequence =
            static_cast<size_t>(first.num_heads_) * n_tokens * first.head_dim_;
        for (int b = 0; b < batch && err == cudaSuccess; ++b) {
            a.pool = caches[b]->pages_.pool();
            a.page_table = caches[b]->pages_.page_table();
            a.start = caches[b]->size_;
            a.keys = shifted + b * per_sequence;
            a.values = values + b * per_sequence;
            err = launch_encode(a, stream);
        }
    }
    first.center_.release_scratch(stream);
    check_cuda(err, "launch_encode");
}

void CudaTurboQuantBatch::attend(const std::vector<const CudaTurboQuantCache*>& caches,
                                 const float* queries, int num_q_heads, float* out, float scale,
                                 cudaStream_t stream) {
    check_batch(caches, "attend");
    if (queries == nullptr || out == nullptr)
        throw std::invalid_argument("attend: null queries or out");
    const CudaTurboQuantCache& first = *caches[0];
    const int group = first.query_group(num_q_heads, scale);
    std::vector<const uint8_t*> pools, tables;
    std::vector<int32_t> lens;
    int longest = 0, pages = 1;
    for (size_t b = 0; b < caches.size(); ++b) {
        const CudaTurboQuantCache& c = *caches[b];
        if (c.size_ == 0)
            throw std::invalid_argument("attend: the cache of sequence " + std::to_string(b) +
                                        " holds no tokens");
        c.require_key_mean("attend");
        pools.push_back(c.pages_.pool());
        tables.push_back(reinterpret_cast<const uint8_t*>(c.pages_.page_table()));
        lens.push_back(c.size_);
        longest = std::max(longest, c.size_);
        pages = std::max(pages, c.pages_.capacity_pages());
    }
    arrays_.describe(pools, lens, pages, stream);
    DecodeArgs a;
    a.layout = first.host_.layout;
    a.tables = first.tables_.get();
    a.pools = arrays_.pools();
    a.seq_lens = arrays_.lens();
    a.page_table = arrays_.page_table();
    a.page_table_stride = arrays_.stride();
    a.max_seq_len = longest;
    if (first.window_.window > 0) {  // each window's own page table
        tables_.describe(tables, lens, 1, stream);
        a.page_tables = reinterpret_cast<const int32_t* const*>(tables_.pools());
        a.window = first.window_;
    }
    a.batch = static_cast<int>(caches.size());
    a.group = group;
    a.queries = queries;
    a.out = out;
    a.scale = scale;
    if (std::any_of(caches.begin(), caches.end(),
                    [](const CudaTurboQuantCache* c) { return c->center_.centering(); })) {
        centres_.describe(damped_means(caches), lens, 1, stream);
        // Rows of the largest pool capacity (grown a quarter at a time: rare reallocations).
        const int longest_pages = (longest + kTokensPerPage - 1) / kTokensPerPage;
        const int stride = std::max(longest_pages, pages);
        ensure_device_bytes(page_bias_, page_bias_bytes_,
                            caches.size() * num_q_heads * stride * sizeof(float),
                            "attend: page bias");
        // The longest sequence's page phases cover every sequence's pages (reserved as its
        // pool grew); the caches share the RoPE parameters (alike).
        const CudaTurboQuantCache& widest =
            **std::max_element(caches.begin(), caches.end(),
                               [](const CudaTurboQuantCache* x, const CudaTurboQuantCache* y) {
                                   return x->size_ < y->size_;
                               });
        widest.center_.page_bias(reinterpret_cast<const float* const*>(centres_.pools()), queries,
                                 a.batch, num_q_heads, a.seq_lens, longest, longest_pages, scale,
                                 static_cast<float*>(page_bias_), stride, stream);
        a.page_bias = static_cast<const float*>(page_bias_);
        a.page_bias_stride = stride;
    }
    decode_in_workspace(a, workspace_, workspace_bytes_, stream);
}

}  // namespace veloxquant::cuda
