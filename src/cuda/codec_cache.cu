#include "cuda/codec_cache.h"

#include <cmath>
#include <stdexcept>
#include <string>

#include "cache/cache_io.h"
#include "core/binary_io.h"
#include "core/rng.h"
#include "cuda/cuda_cache.h"
#include "cuda/host_caches.h"
#include "cuda/rabitq_training.h"
#include "device_codecs/device_common.h"
#include "methods/centered_key_codec.h"
#include "methods/key_codec.h"
#include "methods/value_codec.h"
#include "veloxquant/caches.h"
#include "veloxquant/observer.h"

namespace veloxquant::cuda {

namespace {

/// picked [heads][m][d] = rows training_row(i, n, m) of keys [heads][n][d].
__global__ void gather_training_rows(const float* keys, int heads, int n, int m, int d,
                                     float* picked) {
    const std::size_t at = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (at >= static_cast<std::size_t>(heads) * m * d) return;
    const std::size_t row = at / d;
    const int h = static_cast<int>(row / m), i = static_cast<int>(row % m);
    picked[at] = keys[(static_cast<std::size_t>(h) * n + training_row(i, n, m)) * d + at % d];
}

uint64_t fingerprint_of(const std::string& bytes) {
    return (static_cast<uint64_t>(bytes.size()) << 32) | crc32(bytes.data(), bytes.size());
}

}  // namespace

CudaCodecCache::CudaCodecCache(const KVCacheConfig& config, int num_heads, int head_dim,
                               int max_seq_len, int layer, int window, int sink_tokens)
    : config_(config),
      num_heads_(num_heads),
      head_dim_(head_dim),
      max_seq_len_(max_seq_len),
      layer_(layer),
      center_(config, num_heads, head_dim, PhaseLayout::kPageRows) {
    config_.validate();
    if (num_heads < 1 || num_heads > 4096)
        throw std::invalid_argument("num_heads must be in 1..4096, got " +
                                    std::to_string(num_heads));
    if (head_dim < 2 || head_dim > dev::kMaxDim)
        throw std::invalid_argument("CUDA codec cache: head_dim must be in 2.." +
                                    std::to_string(dev::kMaxDim) + ", got " +
                                    std::to_string(head_dim));
    if (max_seq_len < 1)
        throw std::invalid_argument("max_seq_len must be positive, got " +
                                    std::to_string(max_seq_len));
    if (layer < 0) throw std::invalid_argument("layer must be >= 0");
    if (window < 0)
        throw std::invalid_argument(
            "CUDA codec cache: window must be >= 0 (0: no sliding window), got " +
            std::to_string(window));
    if (sink_tokens < 0)
        throw std::invalid_argument("CUDA codec cache: sink_tokens must be >= 0, got " +
                                    std::to_string(sink_tokens));
    if (window > 0) window_ = TokenWindow{sink_tokens, window};
    layout_.tokens_per_page = kTokensPerPage;
    for (int h = 0; h < num_heads; ++h) {
        key_codecs_.push_back(make_key_codec(config_, head_dim, layer, h));
        const uint64_t vseed =
            derive_seed(config_.seed, layer, h, head_dim, RandomPurpose::kValueRotation);
        value_codecs_.push_back(std::make_unique<ValueCodec>(head_dim, config_.stored_value_bits(),
                                                             config_.use_hadamard, vseed));
        HeadLayout hl;
        hl.key_code_bytes = key_codecs_[h]->code_bytes();
        hl.key_scalars = key_codecs_[h]->num_scalars();
        hl.value_code_bytes = value_codecs_[h]->code_bytes();
        hl.value_scalars = value_codecs_[h]->num_scalars();
        layout_.heads.push_back(hl);
    }
    layout_.finalize();
    check_cuda(cudaGetDevice(&device_), "cudaGetDevice");
    kind_ = fingerprint_of(kind_bytes().buffer());
    if (!key_codecs_[0]->needs_training()) build_backend();
    pages_ = std::make_unique<DevicePagePool>(layout_, max_seq_len);
    if (window_.window > 0)
        pages_->map_pages();
    else
        pages_->reserve(1);
    if (config_.outlier_observer)
        outliers_ = std::make_unique<DeviceOutlierStore>(num_heads, head_dim, config_.outlier_bits,
                                                         max_seq_len);
}

CudaCodecCache::~CudaCodecCache() = default;

BinaryWriter CudaCodecCache::kind_bytes() const {
    BinaryWriter kind;  // config, layer and shape
    kind.str(config_bytes(config_));
    for (const int v : {layer_, num_heads_, head_dim_}) kind.put<int32_t>(v);
    return kind;
}

std::vector<const KeyCodec*> CudaCodecCache::device_key_codecs() const {
    std::vector<const KeyCodec*> codecs;
    for (const auto& codec : key_codecs_)
        codecs.push_back(center_.enabled() ? &dynamic_cast<const CenteredKeyCodec&>(*codec).inner()
                                           : codec.get());
    return codecs;
}

void CudaCodecCache::build_backend() {
    backend_ = make_codec_backend(config_.method, device_key_codecs(), value_codecs_, layout_);
    BinaryWriter identity = kind_bytes();  // and every head's learned state
    for (const auto& codec : key_codecs_) codec->save_state(identity);
    fingerprint_ = fingerprint_of(identity.buffer());
}

void CudaCodecCache::forget_training() noexcept {
    backend_.reset();
    fingerprint_ = 0;
    for (auto& codec : key_codecs_) codec->forget_training();
    center_.forget();
}

std::vector<float> CudaCodecCache::training_keys(const float* keys, int n_tokens, int rows,
                                                 cudaStream_t stream) const {
    const std::size_t floats = static_cast<std::size_t>(num_heads_) * rows * head_dim_;
    std::vector<float> host(floats);
    if (rows == n_tokens) {
        check_cuda(cudaMemcpyAsync(host.data(), keys, floats * sizeof(float),
                                   cudaMemcpyDeviceToHost, stream),
                   "append: copy keys for training");
    } else {
        float* picked = nullptr;
        check_cuda(
            cudaMallocAsync(reinterpret_cast<void**>(&picked), floats * sizeof(float), stream),
            "append: training rows");
        gather_training_rows<<<static_cast<unsigned>((floats + 255) / 256), 256, 0, stream>>>(
            keys, num_heads_, n_tokens, rows, head_dim_, picked);
        check_cuda(cudaGetLastError(), "append: gather training rows");
        check_cuda(cudaMemcpyAsync(host.data(), picked, floats * sizeof(float),
                                   cudaMemcpyDeviceToHost, stream),
                   "append: copy keys for training");
        check_cuda(cudaFreeAsync(picked, stream), "append: training rows");
    }
    check_cuda(cudaStreamSynchronize(stream), "append: synchronize for training");
    return host;
}

void CudaCodecCache::train_on(const float* keys, int n_tokens, cudaStream_t stream) {
    // The CPU cache trains every head on the first append's keys (QuantizedKVCache::append);
    // the device cache trains the same codecs: rabitq's on the device (train_rabitq_on_device),
    // any other codec that trains on the host, where only the rows it reads travel, then uploads
    // the trained parameters.
    auto train_heads = [&](const std::vector<KeyCodec*>& codecs, const float* rows_of) {
        if (train_rabitq_on_device(codecs, head_keys(rows_of, n_tokens), n_tokens, stream)) return;
        const int rows = codecs[0]->training_rows(n_tokens);
        train_key_codecs(codecs, training_keys(rows_of, n_tokens, rows, stream).data(), rows);
    };
    if (!center_.enabled()) {
        std::vector<KeyCodec*> codecs;
        for (auto& codec : key_codecs_) codecs.push_back(codec.get());
        train_heads(codecs, keys);
        return build_backend();
    }
    // Centred keys: the mean is estimated on the device from the rows CenteredKeyCodec::train
    // reads (KeyCenter::estimate) and adopted by the CPU codecs; an inner codec that trains
    // (rabitq) then trains on the centred keys, as the CPU codec's train does.
    center_.estimate(keys, n_tokens, stream);
    std::vector<KeyCodec*> inner;
    for (int h = 0; h < num_heads_; ++h) {
        auto& codec = dynamic_cast<CenteredKeyCodec&>(*key_codecs_[h]);
        codec.adopt_mean(center_.mean().data() + static_cast<std::size_t>(h) * head_dim_);
        inner.push_back(&codec.inner());
    }
    if (inner[0]->needs_training()) {
        try {
            train_heads(inner, center_.centred(keys, n_tokens, 0, stream));
        } catch (...) {
            center_.release_scratch(stream);
            throw;
        }
        center_.release_scratch(stream);
    }
    build_backend();
}

std::vector<const float*> CudaCodecCache::head_keys(const float* keys, int n_tokens) const {
    std::vector<const float*> heads;
    for (int h = 0; h < num_heads_; ++h)
        heads.push_back(keys + static_cast<std::size_t>(h) * n_tokens * head_dim_);
    return heads;
}

void CudaCodecCache::encode_tokens(const float* keys, const float* values, int n_tokens,
                                   cudaStream_t stream) {
    SequenceSet at;
    at.pool = pages_->pool();
    at.page_table = pages_->page_table();
    at.size = size_;
    // Phases too where this cache does not centre: a batch may read them (phase_params). A
    // window's pages are slots: its phases cover the positions.
    if (center_.enabled())
        center_.reserve_pages(pages_->mapped()
                                  ? (size_ + n_tokens + kTokensPerPage - 1) / kTokensPerPage
                                  : pages_->capacity_pages(),
                              stream);
    const float* shifted = center_.centred(keys, n_tokens, size_, stream);
    try {
        backend_->encode(at, n_tokens, shifted, values, stream);
    } catch (...) {
        center_.release_scratch(stream);
        throw;
    }
    center_.release_scratch(stream);
}

CenterParams CudaCodecCache::center_params(cudaStream_t stream) const {
    return center_.centering() ? phase_params(stream) : CenterParams{};
}

CenterParams CudaCodecCache::phase_params(cudaStream_t stream) const {
    CenterParams c;
    // Reserved by the appends for the pool's capacity; pages uploaded without one are reserved
    // here (a device synchronization, so not in a graph capture).
    center_.reserve_pages((size_ + kTokensPerPage - 1) / kTokensPerPage, stream);
    c.damped = center_.damped_address();
    c.phases = reinterpret_cast<const float2*>(center_.phases());
    c.pairs = center_.pairs();
    c.half_split = center_.half_split() ? 1 : 0;
    return c;
}

void CudaCodecCache::append(const float* keys, const float* values, int n_tokens,
                            cudaStream_t stream) {
    if (n_tokens < 0) throw std::invalid_argument("append: n_tokens must be >= 0");
    if (n_tokens == 0) return;
    if (keys == nullptr || values == nullptr)
        throw std::invalid_argument("append: null keys or values");
    if (static_cast<long long>(size_) + n_tokens > max_seq_len_)
        throw std::length_error("append: " + std::to_string(n_tokens) +
                                " tokens would exceed max_seq_len " + std::to_string(max_seq_len_) +
                                " (cache holds " + std::to_string(size_) + ")");
    // The keys' norms for the outlier observer come back with the input check's synchronization.
    if (outliers_) outliers_->measure(keys, n_tokens, stream);
    input_check_.require(keys, values, num_heads_, n_tokens, head_dim_, config_.key_bound(),
                         config_.value_bound(), stream);
    const int P = kTokensPerPage, before = size_;
    const int first_new_page = (before + P - 1) / P, end_page = (before + n_tokens + P - 1) / P;
    if (pages_->mapped())
        pages_->hold(before / P, end_page, stream);
    else
        pages_->reserve(size_ + n_tokens);
    const bool trains = !backend_;
    // The observer's statistics of this layer, restored if the append fails (as the CPU's).
    const std::vector<KeyNormObserver::Stats> stats = observer_stats();
    try {
        if (trains) train_on(keys, n_tokens, stream);
        encode_tokens(keys, values, n_tokens, stream);
        observe_outliers(keys, values, n_tokens, before, stream);
    } catch (...) {
        // Codes written past size_ are never read and never saved (to_host's adopt zeroes them).
        if (trains) forget_training();
        if (pages_->mapped()) pages_->release(first_new_page, end_page);
        observer_restore(stats, before);
        throw;
    }
    size_ += n_tokens;
    // What the first new token's window needs stays, so a causal attend over the chunk is exact.
    if (window_.window > 0) evict_before(before + 1 - window_.window, stream);
}

std::vector<KeyNormObserver::Stats> CudaCodecCache::observer_stats() const {
    std::vector<KeyNormObserver::Stats> stats;
    if (outliers_)
        for (int h = 0; h < num_heads_; ++h)
            stats.push_back(config_.outlier_observer->stats(layer_, h));
    return stats;
}

void CudaCodecCache::observe_outliers(const float* keys, const float* values, int n, int first,
                                      cudaStream_t stream) {
    if (outliers_)
        outliers_->add(*config_.outlier_observer, layer_, keys, values, n, first, stream);
}

void CudaCodecCache::observer_restore(const std::vector<KeyNormObserver::Stats>& stats, int first) {
    if (!outliers_) return;
    for (int h = 0; h < num_heads_; ++h) config_.outlier_observer->set_stats(layer_, h, stats[h]);
    outliers_->truncate(first);
}

void CudaCodecCache::evict_before(int keep_from, cudaStream_t stream) {
    const int P = kTokensPerPage;
    if (keep_from <= window_.sinks) return;
    pages_->release((window_.sinks + P - 1) / P, keep_from / P);
    if (outliers_) outliers_->erase_range(window_.sinks, keep_from, stream);
}

bool CudaCodecCache::position_held(int pos) const {
    return pos >= 0 && pos < size_ && pages_->held(pos / kTokensPerPage);
}

int CudaCodecCache::query_group(const float* queries, float* out, int num_q_heads,
                                float scale) const {
    if (queries == nullptr || out == nullptr)
        throw std::invalid_argument("attend: null queries or out");
    if (num_q_heads < num_heads_ || num_q_heads % num_heads_ != 0)
        throw std::invalid_argument("attend: num_q_heads must be a multiple of the " +
                                    std::to_string(num_heads_) + " KV heads, got " +
                                    std::to_string(num_q_heads));
    if (!std::isfinite(scale)) throw std::invalid_argument("attend: scale must be finite");
    return num_q_heads / num_heads_;
}

void CudaCodecCache::attend(const float* queries, int num_q_heads, int n_queries, float* out,
                            float scale, bool causal, cudaStream_t stream) {
    const int group = query_group(queries, out, num_q_heads, scale);
    if (n_queries < 1) throw std::invalid_argument("attend: n_queries must be positive");
    if (causal && n_queries > size_)
        throw std::invalid_argument("attend: causal attention of " + std::to_string(n_queries) +
                                    " queries needs as many stored tokens, cache holds " +
                                    std::to_string(size_));
    if (window_.window > 0 && causal && n_queries > 1) {
        // Each query's window must still be held: the earliest query's start.
        const int from = size_ - n_queries + 1 - window_.window;
        if (from > window_.sinks && !position_held(from))
            throw std::invalid_argument("attend: " + std::to_string(n_queries) +
                                        " causal queries reach tokens the sliding window evicted");
    }
    if (size_ == 0 || !backend_) {  // nothing to attend to: zeros, as the CPU cache
        check_cuda(cudaMemsetAsync(out, 0,
                                   static_cast<std::size_t>(num_q_heads) * n_queries * head_dim_ *
                                       sizeof(float),
                                   stream),
                   "attend: zero output");
        return;
    }
    SequenceSet source;
    source.pool = pages_->pool();
    source.page_table = pages_->page_table();
    source.size = size_;
    source.center = center_params(stream);
    source.window = window_;
    if (outliers_) source.outliers = outliers_->view();
    backend_->attend(source, queries, group, n_queries, out, scale, causal, stream);
}

void CudaCodecCache::dequantize(int start, int n_tokens, float* keys, float* values,
                                cudaStream_t stream) const {
    if (start < 0 || n_tokens < 0 || static_cast<long long>(start) + n_tokens > size_)
        throw std::out_of_range("dequantize: range outside [0, " + std::to_string(size_) + ")");
    if (n_tokens == 0) return;
    if (keys == nullptr || values == nullptr)
        throw std::invalid_argument("dequantize: null output");
    pages_->require_held(start, n_tokens);
    backend_->dequantize(pages_->pool(), pages_->page_table(), start, n_tokens, keys, values,
                         stream);
    center_.restore(keys, n_tokens, start, stream);
    if (outliers_) outliers_->restore(start, n_tokens, keys, values, stream);
}

void CudaCodecCache::truncate(int n_tokens) {
    if (n_tokens < 0 || n_tokens > size_)
        throw std::out_of_range("truncate: " + std::to_string(n_tokens) + " is outside [0, " +
                                std::to_string(size_) + "]");
    if (pages_->mapped()) pages_->cut_window(n_tokens, size_, window_.window, window_.sinks);
    if (outliers_) outliers_->truncate(n_tokens);
    size_ = n_tokens;
}

void CudaCodecCache::reset() {
    if (pages_->mapped()) pages_->release(0, pages_->max_pages());
    if (outliers_) outliers_->clear();
    size_ = 0;
}

std::size_t CudaCodecCache::nbytes() const {
    return pages_->nbytes() + (backend_ ? backend_->nbytes() : 0) + center_.nbytes() +
           (outliers_ ? outliers_->nbytes() : 0);
}

void CudaCodecCache::download(PagedStore& store) const {
    pages_->download(store, size_);
}

std::unique_ptr<QuantizedKVCache> CudaCodecCache::to_host() const {
    std::unique_ptr<QuantizedKVCache> cpu =
        make_quantized_cache(config_, num_heads_, head_dim_, max_seq_len_, layer_);
    PagedStore pages(layout_);
    download(pages);
    cpu->adopt(pages, size_, key_codecs_, outliers_ ? &outliers_->host() : nullptr);
    return cpu;
}

std::unique_ptr<KVCache> CudaCodecCache::host_cache() const {
    return with_window(to_host(), window_);
}

std::unique_ptr<CudaCodecCache> CudaCodecCache::from_host(const KVCache& cpu) {
    const HostCacheParts parts = host_cache_parts(cpu, "CudaCodecCache::from_host");
    return from_host(parts.cache, parts.window);
}

std::unique_ptr<CudaCodecCache> CudaCodecCache::from_host(const QuantizedKVCache& cpu) {
    return from_host(cpu, TokenWindow{});
}

std::unique_ptr<CudaCodecCache> CudaCodecCache::from_host(const QuantizedKVCache& cpu,
                                                          const TokenWindow& window) {
    auto gpu = std::make_unique<CudaCodecCache>(cpu.config(), cpu.num_heads(), cpu.head_dim(),
                                                cpu.max_seq_len(), cpu.layer(), window.window,
                                                window.sinks);
    // The learned state (rabitq's centroids) through the codecs' own serialization.
    const auto& trained = cpu.key_codecs();
    for (int h = 0; h < gpu->num_heads_; ++h) {
        BinaryWriter out;
        trained[h]->save_state(out);
        BinaryReader in(out.buffer().data(), out.buffer().size());
        gpu->key_codecs_[h]->load_state(in);
    }
    if (!gpu->key_codecs_[0]->needs_training()) {
        if (gpu->center_.enabled()) {  // the mean the CPU pages were centred by
            std::vector<float> mean;
            for (const auto& codec : gpu->key_codecs_) {
                const auto& m = dynamic_cast<const CenteredKeyCodec&>(*codec).mean();
                mean.insert(mean.end(), m.begin(), m.end());
            }
            gpu->center_.set_mean(mean);
        }
        gpu->build_backend();
    }
    if (cpu.size() > 0) gpu->upload(cpu.paged_store(), cpu.size());
    if (gpu->outliers_ && cpu.outlier_store() != nullptr)
        gpu->outliers_->assign(*cpu.outlier_store());
    return gpu;
}

void CudaCodecCache::save(const std::string& path) const {
    host_cache()->save(path);
}

std::unique_ptr<CudaCodecCache> CudaCodecCache::load(const std::string& path) {
    return from_host(*load_host_cache(path, "CudaCodecCache::load"));
}

void CudaCodecCache::upload(const PagedStore& store, int size) {
    if (size < 0 || size > max_seq_len_) throw std::invalid_argument("upload: bad size");
    if (!backend_)
        throw std::logic_error("upload: train the codecs first (append, or a calibrated config)");
    pages_->upload(store, size);
    if (outliers_) outliers_->clear();
    size_ = size;
}

}  // namespace veloxquant::cuda
