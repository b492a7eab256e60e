#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <typeinfo>
#include <utility>

#include "attention/paged_attention.h"
#include "cache/outlier_store.h"
#include "cache/paged_store.h"
#include "cache/token_check.h"
#include "core/binary_io.h"
#include "core/parallel_errors.h"
#include "core/rng.h"
#include "methods/key_codec.h"
#include "methods/value_codec.h"
#include "veloxquant/caches.h"
#include "veloxquant/observer.h"

namespace veloxquant {

QuantizedKVCache::QuantizedKVCache(const KVCacheConfig& config, int num_heads, int head_dim,
                                   int max_seq_len, int layer, std::string class_name)
    : QuantizedKVCache(std::make_shared<const KVCacheConfig>(config), num_heads, head_dim,
                       max_seq_len, layer, std::move(class_name)) {}

QuantizedKVCache::QuantizedKVCache(std::shared_ptr<const KVCacheConfig> config, int num_heads,
                                   int head_dim, int max_seq_len, int layer, std::string class_name)
    : config_(std::move(config)),
      num_heads_(num_heads),
      head_dim_(head_dim),
      max_seq_len_(max_seq_len),
      layer_(layer),
      class_name_(std::move(class_name)) {
    config_->validate();
    if (num_heads < 1 || num_heads > 4096)
        throw std::invalid_argument("num_heads must be in 1..4096, got " +
                                    std::to_string(num_heads));
    if (head_dim < 2 || head_dim > 1024)
        throw std::invalid_argument("head_dim must be in 2..1024, got " + std::to_string(head_dim));
    if (max_seq_len < 1)
        throw std::invalid_argument("max_seq_len must be positive, got " +
                                    std::to_string(max_seq_len));
    if (layer < 0) throw std::invalid_argument("layer must be >= 0");
    for (int h = 0; h < num_heads; ++h) {
        key_codecs_.push_back(make_key_codec(*config_, head_dim, layer, h));
        const uint64_t vseed =
            derive_seed(config_->seed, layer, h, head_dim, RandomPurpose::kValueRotation);
        value_codecs_.push_back(std::make_unique<ValueCodec>(head_dim, config_->stored_value_bits(),
                                                             config_->use_hadamard, vseed));
    }
    PageLayout layout;
    layout.tokens_per_page = kTokensPerPage;
    for (int h = 0; h < num_heads; ++h) {
        HeadLayout hl;
        hl.key_code_bytes = key_codecs_[h]->code_bytes();
        hl.key_scalars = key_codecs_[h]->num_scalars();
        hl.value_code_bytes = value_codecs_[h]->code_bytes();
        hl.value_scalars = value_codecs_[h]->num_scalars();
        layout.heads.push_back(hl);
    }
    store_ = std::make_unique<PagedStore>(layout);
    if (config_->outlier_observer)
        outliers_ = std::make_unique<OutlierStore>(num_heads, head_dim, config_->outlier_bits);
}

QuantizedKVCache::~QuantizedKVCache() = default;

void QuantizedKVCache::check_tokens(const float* keys, const float* values, int n_tokens) const {
    if (n_tokens < 0)
        throw std::invalid_argument("append: n_tokens must be >= 0, got " +
                                    std::to_string(n_tokens));
    if (n_tokens == 0) return;
    if (keys == nullptr || values == nullptr)
        throw std::invalid_argument("append: null keys or values");
    if (static_cast<long long>(size_) + n_tokens > max_seq_len_)
        throw std::length_error("append: " + std::to_string(n_tokens) +
                                " tokens would exceed max_seq_len " + std::to_string(max_seq_len_) +
                                " (cache holds " + std::to_string(size_) + ")");
    const std::size_t count = static_cast<std::size_t>(num_heads_) * n_tokens * head_dim_;
    for (const bool is_keys : {true, false}) {
        const float* x = is_keys ? keys : values;
        const std::size_t i =
            first_bad_coordinate(x, count, is_keys ? config_->key_bound() : config_->value_bound());
        if (i < count) throw bad_token_error(is_keys, x[i], i, n_tokens, head_dim_);
    }
}

void QuantizedKVCache::append(const float* keys, const float* values, int n_tokens) {
    check_tokens(keys, values, n_tokens);
    if (n_tokens == 0) return;
    // A failure part way (std::bad_alloc, a codec's error) undoes what the call did: the codecs
    // it trained, this layer's observer statistics, the pages and outlier records past size_.
    std::vector<char> trains(num_heads_);
    for (int h = 0; h < num_heads_; ++h) trains[h] = key_codecs_[h]->needs_training();
    std::vector<KeyNormObserver::Stats> stats;
    if (outliers_)
        for (int h = 0; h < num_heads_; ++h)
            stats.push_back(config_->outlier_observer->stats(layer_, h));
    try {
        store_->reserve_tokens(size_ + n_tokens);
        train_key_codecs(key_codecs_, keys, n_tokens);
        encode_tokens(keys, values, n_tokens, observe_key_norms(keys, n_tokens));
    } catch (...) {
        for (int h = 0; h < num_heads_; ++h)
            if (trains[h]) key_codecs_[h]->forget_training();
        if (outliers_) {
            for (int h = 0; h < num_heads_; ++h)
                config_->outlier_observer->set_stats(layer_, h, stats[h]);
            outliers_->truncate(size_);
        }
        store_->truncate(size_);
        throw;
    }
}

std::vector<uint8_t> QuantizedKVCache::observe_key_norms(const float* keys, int n_tokens) const {
    std::vector<uint8_t> flags;
    if (!outliers_) return flags;
    const long long rows = static_cast<long long>(num_heads_) * n_tokens;
    flags.assign(rows, 0);
    std::vector<float> norms(rows);
#pragma omp parallel for schedule(static) if (n_tokens >= KeyNormObserver::kParallelTokens)
    for (long long r = 0; r < rows; ++r) norms[r] = key_norm(keys + r * head_dim_, head_dim_);
    config_->outlier_observer->observe_and_flag_heads(layer_, num_heads_, norms.data(), n_tokens,
                                                      flags.data());
    return flags;
}

void QuantizedKVCache::encode_tokens(const float* keys, const float* values, int n_tokens,
                                     const std::vector<uint8_t>& flags) {
    const int P = kTokensPerPage;
    const std::size_t per_head = static_cast<std::size_t>(n_tokens) * head_dim_;
    // Segments: (head, page) pieces of the new tokens; encoded in parallel.
    const int first_page = size_ / P, last_page = (size_ + n_tokens - 1) / P;
    const int pages = last_page - first_page + 1;
    ParallelErrors errors;
#pragma omp parallel for schedule(dynamic) collapse(2)
    for (int h = 0; h < num_heads_; ++h) {
        for (int pi = 0; pi < pages; ++pi) {
            errors.run(static_cast<long long>(h) * pages + pi, [&] {
                const int p = first_page + pi;
                const int begin = std::max(size_, p * P),
                          end = std::min(size_ + n_tokens, (p + 1) * P);
                const int slot = begin - p * P, n = end - begin;
                const std::size_t src =
                    h * per_head + static_cast<std::size_t>(begin - size_) * head_dim_;
                const KeyCodec& kc = *key_codecs_[h];
                const ValueCodec& vc = *value_codecs_[h];
                kc.encode_at(keys + src, n, begin, store_->key_codes(p, h) + slot * kc.code_bytes(),
                             store_->key_scalars(p, h) + slot, P);
                vc.encode(values + src, n, store_->value_codes(p, h) + slot * vc.code_bytes(),
                          store_->value_scalars(p, h) + slot, P);
            });
        }
    }
    errors.rethrow();
    if (outliers_) {
        for (int h = 0; h < num_heads_; ++h)
            for (int t = 0; t < n_tokens; ++t)
                if (flags[static_cast<std::size_t>(h) * n_tokens + t]) {
                    const std::size_t src = h * per_head + static_cast<std::size_t>(t) * head_dim_;
                    outliers_->add(h, size_ + t, keys + src, values + src);
                }
    }
    size_ += n_tokens;
}

void QuantizedKVCache::attend(const float* queries, int num_q_heads, int n_queries, float* out,
                              float scale, bool causal) const {
    attend_window(queries, num_q_heads, n_queries, out, scale, causal, 0, 0);
}

void QuantizedKVCache::attend_window(const float* queries, int num_q_heads, int n_queries,
                                     float* out, float scale, bool causal, int sinks,
                                     int window) const {
    if (queries == nullptr || out == nullptr)
        throw std::invalid_argument("attend: null queries or out");
    if (num_q_heads < num_heads_ || num_q_heads % num_heads_ != 0)
        throw std::invalid_argument("attend: num_q_heads (" + std::to_string(num_q_heads) +
                                    ") must be a positive multiple of the KV heads (" +
                                    std::to_string(num_heads_) + ")");
    if (n_queries < 1) throw std::invalid_argument("attend: n_queries must be >= 1");
    if (causal && n_queries > size_)
        throw std::invalid_argument("attend: causal with " + std::to_string(n_queries) +
                                    " queries needs at least that many cached tokens (have " +
                                    std::to_string(size_) + ")");
    if (!std::isfinite(scale)) throw std::invalid_argument("attend: scale must be finite");
    if (size_ == 0) {  // nothing to attend to (and an untrained rabitq codec cannot score)
        std::fill(out, out + static_cast<std::size_t>(num_q_heads) * n_queries * head_dim_, 0.0f);
        return;
    }
    PagedAttentionArgs a;
    a.store = store_.get();
    a.key_codecs = &key_codecs_;
    a.value_codecs = &value_codecs_;
    a.outliers = outliers_.get();
    a.num_heads = num_heads_;
    a.head_dim = head_dim_;
    a.size = size_;
    a.queries = queries;
    a.num_q_heads = num_q_heads;
    a.n_queries = n_queries;
    a.out = out;
    a.scale = scale;
    a.causal = causal;
    a.sinks = sinks;
    a.window = window;
    a.fused = config_->use_fused_sdpa;
    paged_attention(a);
}

bool QuantizedKVCache::position_held(int pos) const {
    return pos >= 0 && pos < size_ && store_->held(pos / kTokensPerPage);
}

void QuantizedKVCache::dequantize(int start, int n_tokens, float* keys_out,
                                  float* values_out) const {
    if (start < 0 || n_tokens < 0 || static_cast<long long>(start) + n_tokens > size_)
        throw std::out_of_range("dequantize: range [" + std::to_string(start) + ", " +
                                std::to_string(static_cast<long long>(start) + n_tokens) +
                                ") is outside [0, " + std::to_string(size_) + ")");
    if (n_tokens == 0) return;
    if (keys_out == nullptr || values_out == nullptr)
        throw std::invalid_argument("dequantize: null output");
    const int P = kTokensPerPage;
    for (int p = start / P; p <= (start + n_tokens - 1) / P; ++p)
        if (!store_->held(p))
            throw std::out_of_range("dequantize: tokens of page " + std::to_string(p) +
                                    " were evicted");
    const std::size_t per_head = static_cast<std::size_t>(n_tokens) * head_dim_;
    for (int h = 0; h < num_heads_; ++h) {
        for (int t = start; t < start + n_tokens;) {
            const int p = t / P, slot = t % P, n = std::min(P - slot, start + n_tokens - t);
            const std::size_t dst = h * per_head + static_cast<std::size_t>(t - start) * head_dim_;
            const KeyCodec& kc = *key_codecs_[h];
            const ValueCodec& vc = *value_codecs_[h];
            kc.decode_at(store_->key_codes(p, h) + slot * kc.code_bytes(),
                         store_->key_scalars(p, h) + slot, P, n, t, keys_out + dst);
            vc.decode(store_->value_codes(p, h) + slot * vc.code_bytes(),
                      store_->value_scalars(p, h) + slot, P, n, values_out + dst);
            t += n;
        }
        if (outliers_) {
            const auto& pos = outliers_->positions(h);
            for (auto it = std::lower_bound(pos.begin(), pos.end(), start);
                 it != pos.end() && *it < start + n_tokens; ++it) {
                const std::size_t dst =
                    h * per_head + static_cast<std::size_t>(*it - start) * head_dim_;
                const int e = static_cast<int>(it - pos.begin());
                outliers_->key(h, e, keys_out + dst);
                outliers_->value(h, e, values_out + dst);
            }
        }
    }
}

void QuantizedKVCache::trim(int n_tokens) {
    if (n_tokens < 0 || n_tokens > size_)
        throw std::invalid_argument("trim: cannot drop " + std::to_string(n_tokens) + " of " +
                                    std::to_string(size_) + " tokens");
    size_ -= n_tokens;
    store_->truncate(size_);
    if (outliers_) outliers_->truncate(size_);
}

void QuantizedKVCache::adopt(const PagedStore& pages, int size,
                             const std::vector<std::unique_ptr<KeyCodec>>& codecs,
                             const OutlierStore* outliers) {
    if (outliers != nullptr && outliers->total() > 0) {
        if (!outliers_)
            throw std::invalid_argument("adopt: outlier entries for a cache without a side store");
        if (outliers->bits() != outliers_->bits() || outliers->num_heads() != num_heads_ ||
            outliers->dim() != head_dim_)
            throw std::invalid_argument("adopt: an outlier store of other bits or shape");
        for (int h = 0; h < num_heads_; ++h)  // positions increase within a head
            if (outliers->count(h) > 0 && outliers->positions(h).back() >= size)
                throw std::invalid_argument("adopt: an outlier entry at or past size " +
                                            std::to_string(size));
    }
    if (!same_layout(pages.layout(), store_->layout()))
        throw std::invalid_argument("adopt: the pages have another layout than this " +
                                    class_name_);
    if (size < 0 || size > max_seq_len_)
        throw std::invalid_argument("adopt: size " + std::to_string(size) + " is outside [0, " +
                                    std::to_string(max_seq_len_) + "]");
    // Pages inside the source's table that it does not hold (a sliding window's evicted ones)
    // stay evicted here; its last page must be held.
    const int P = kTokensPerPage, n_pages = (size + P - 1) / P;
    for (int p = 0; p < n_pages; ++p)
        if (p >= pages.page_slots() || (p == n_pages - 1 && !pages.held(p)))
            throw std::invalid_argument("adopt: page " + std::to_string(p) + " is not held");
    if (codecs.size() != key_codecs_.size())
        throw std::invalid_argument("adopt: " + std::to_string(codecs.size()) + " codecs for " +
                                    std::to_string(key_codecs_.size()) + " heads");
    // The learned state goes through the codecs' own serialization (as in a saved file).
    std::vector<std::string> states;
    for (std::size_t h = 0; h < codecs.size(); ++h) {
        const KeyCodec* given = codecs[h].get();
        const KeyCodec& own = *key_codecs_[h];
        if (given == nullptr || typeid(*given) != typeid(own) ||
            given->code_bytes() != own.code_bytes())
            throw std::invalid_argument("adopt: the codec of head " + std::to_string(h) +
                                        " is not this cache's");
        BinaryWriter out;
        codecs[h]->save_state(out);
        states.push_back(out.buffer());
    }
    for (std::size_t h = 0; h < codecs.size(); ++h) {
        BinaryReader in(states[h].data(), states[h].size());
        key_codecs_[h]->load_state(in);
    }
    // Copied before anything changes (the copy may not fit in memory).
    OutlierStore side = outliers != nullptr ? *outliers
                                            : OutlierStore(num_heads_, head_dim_,
                                                           outliers_ ? outliers_->bits() : 8);
    store_->clear();
    for (int p = 0; p < n_pages; ++p)
        if (pages.held(p))
            std::memcpy(store_->allocate_page(p), pages.page_data(p), store_->layout().page_bytes);
    // The source's last page may hold codes past `size` (a device cache keeps them after a trim
    // or a failed append): zeroed, so that what this cache saves depends on its tokens alone.
    store_->truncate(size);
    if (outliers_) *outliers_ = std::move(side);
    size_ = size;
}

void QuantizedKVCache::reset() {
    size_ = 0;
    store_->clear();
    if (outliers_) outliers_->clear();
}

void QuantizedKVCache::evict_range(int sinks, int keep_from) {
    const int P = kTokensPerPage;
    for (int p = 0; p < store_->page_slots(); ++p) {
        const int t0 = p * P, t1 = (p + 1) * P;  // page holds [t0, t1)
        if (t0 >= sinks && t1 <= keep_from) store_->evict(p);
    }
    if (outliers_ && keep_from > sinks) outliers_->erase_range(sinks, keep_from);
}

std::size_t QuantizedKVCache::storage_bytes() const {
    return store_->nbytes() + (outliers_ ? outliers_->nbytes() : 0);
}

std::size_t QuantizedKVCache::parameter_bytes() const {
    std::size_t n = 0;
    for (const auto& c : key_codecs_) n += c->parameter_bytes();
    for (const auto& c : value_codecs_) n += c->parameter_bytes();
    return n;
}

std::size_t QuantizedKVCache::nbytes() const {
    return storage_bytes() + parameter_bytes();
}

double QuantizedKVCache::key_bits_per_coordinate() const {
    double bits = 0.0;
    for (const auto& kc : key_codecs_) bits += 8.0 * kc->code_bytes() + 32.0 * kc->num_scalars();
    return bits / (static_cast<double>(head_dim_) * num_heads_);
}

double QuantizedKVCache::value_bits_per_coordinate() const {
    double bits = 0.0;
    for (const auto& vc : value_codecs_) bits += 8.0 * vc->code_bytes() + 32.0 * vc->num_scalars();
    return bits / (static_cast<double>(head_dim_) * num_heads_);
}

int QuantizedKVCache::outlier_tokens() const {
    return outliers_ ? outliers_->total() : 0;
}

}  // namespace veloxquant
