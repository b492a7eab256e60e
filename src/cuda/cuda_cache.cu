// Host side of the CUDA backend: the codec tables (from the same codebooks, rotations and page
// layout as the CPU codecs) and the device-resident cache.
#include "cuda/cuda_cache.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "core/bitpack.h"
#include "core/half.h"
#include "core/lloyd_max.h"
#include "core/rng.h"
#include "core/rotation.h"
#include "cuda/host_caches.h"
#include "cuda/turboquant_kernels.cuh"
#include "methods/centered_key_codec.h"
#include "methods/key_codec.h"
#include "veloxquant/caches.h"

namespace veloxquant::cuda {

static_assert(kernels::kPage == kTokensPerPage, "device pages hold the CPU's tokens per page");
static_assert(sizeof(__half2) == sizeof(uint32_t), "pair tables pack two fp16 in one word");

namespace {

uint64_t next_cache_serial() {
    static std::atomic<uint64_t> next{1};
    return next.fetch_add(1, std::memory_order_relaxed);
}

// The signs of a randomized Hadamard rotation: R e_i = s_i H[:, i] / sqrt(d) and H[0][i] = 1.
std::vector<float> rotation_signs(int d, uint64_t seed) {
    const Rotation rotation(d, true, seed);
    std::vector<float> signs(d), e(d), y(d);
    for (int i = 0; i < d; ++i) {
        std::fill(e.begin(), e.end(), 0.0f);
        e[i] = 1.0f;
        rotation.forward(e.data(), y.data());
        signs[i] = y[0] > 0.0f ? 1.0f : -1.0f;
    }
    return signs;
}

float max_abs(const std::vector<float>& c) {
    float m = 0.0f;
    for (float x : c) m = std::max(m, std::fabs(x));
    return m;
}

// half2 (C[i0], C[i1]) / scale for every pair index i0 | i1 << bits.
void append_pairs(const std::vector<float>& c, int bits, float scale, std::vector<uint32_t>& out) {
    for (uint32_t idx = 0; idx < (1u << (2 * bits)); ++idx) {
        const uint32_t lo = float_to_half(c[idx & ((1u << bits) - 1)] / scale);
        const uint32_t hi = float_to_half(c[idx >> bits] / scale);
        out.push_back(lo | (hi << 16));
    }
}

// 2-bit codebooks: the two words of key_i8 (TqDeviceTables) for one stage.
void append_i8_parts(const std::vector<float>& c, float scale, std::vector<uint32_t>& out) {
    uint32_t high = 0, low = 0;
    for (std::size_t a = 0; a < c.size(); ++a) {
        const int k = static_cast<int>(std::lrint(c[a] / scale * kKeyI8Scale));
        const int h = (k + 128) >> 8;  // floor: the low part lies in [-128, 127]
        high |= static_cast<uint32_t>(h & 0xFF) << (8 * a);
        low |= static_cast<uint32_t>((k - 256 * h) & 0xFF) << (8 * a);
    }
    out.push_back(high);
    out.push_back(low);
}

}  // namespace

void check_cuda(cudaError_t err, const char* what) {
    if (err != cudaSuccess)
        throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

TqHostTables make_host_tables(const KVCacheConfig& config, int num_kv_heads, int head_dim,
                              int layer) {
    config.validate();
    const int kb = config.bits, stages = config.num_residuals, vb = config.value_bits, d = head_dim;
    if (config.method != "turboquant_rvq")
        throw std::invalid_argument("CUDA backend: method must be turboquant_rvq, got '" +
                                    config.method + "'");
    if (kb < 1 || kb > 4)
        throw std::invalid_argument("CUDA backend: bits must be in 1..4, got " +
                                    std::to_string(kb));
    if (stages < 1 || stages > kernels::kMaxStages)
        throw std::invalid_argument("CUDA backend: num_residuals must be in 1..3, got " +
                                    std::to_string(stages));
    if (d != 64 && d != 128)
        throw std::invalid_argument("CUDA backend: head_dim must be 64 or 128, got " +
                                    std::to_string(d));
    if (vb != 1 && vb != 2 && vb != 4 && vb != 16)
        throw std::invalid_argument("CUDA backend: value_bits must be 1, 2, 4 or 16, got " +
                                    std::to_string(vb));
    if (!config.use_hadamard) throw std::invalid_argument("CUDA backend: needs use_hadamard=true");
    if (config.outlier_observer)
        throw std::invalid_argument("CUDA backend: no outlier side store yet");
    if (num_kv_heads < 1 || layer < 0)
        throw std::invalid_argument("CUDA backend: bad num_heads or layer");

    TqHostTables t;
    PageLayout& pl = t.page_layout;
    pl.tokens_per_page = kTokensPerPage;
    HeadLayout hl;
    hl.key_code_bytes = static_cast<std::size_t>(stages) * packed_bytes(d, kb);
    hl.key_scalars = 1;
    hl.value_code_bytes = vb == 16 ? 2u * d : packed_bytes(d, vb);
    hl.value_scalars = vb == 16 ? 0 : 1;
    pl.heads.assign(num_kv_heads, hl);
    pl.finalize();

    TqPageLayout& L = t.layout;
    L.head_dim = d;
    L.key_bits = kb;
    L.key_stages = stages;
    L.value_bits = vb;
    L.num_kv_heads = num_kv_heads;
    L.key_stage_bytes = static_cast<uint32_t>(packed_bytes(d, kb));
    L.key_code_bytes = static_cast<uint32_t>(hl.key_code_bytes);
    L.value_code_bytes = static_cast<uint32_t>(hl.value_code_bytes);
    L.head_bytes = static_cast<uint32_t>(pl.page_bytes / num_kv_heads);
    L.page_bytes = pl.page_bytes;
    const HeadLayout& h0 = pl.heads[0];
    L.key_norms_offset = static_cast<uint32_t>(h0.key_scalars_offset);
    L.value_codes_offset = static_cast<uint32_t>(h0.value_codes_offset);
    L.value_scales_offset = static_cast<uint32_t>(h0.value_scalars_offset);
    for (int h = 0; h < num_kv_heads; ++h) {  // every head's block is the first one, shifted
        const HeadLayout& x = pl.heads[h];
        const std::size_t base = static_cast<std::size_t>(h) * L.head_bytes;
        if (x.key_codes_offset != base || x.key_scalars_offset != base + L.key_norms_offset ||
            x.value_codes_offset != base + L.value_codes_offset ||
            x.value_scalars_offset != base + L.value_scales_offset || L.head_bytes % 64 != 0)
            throw std::logic_error("CUDA backend: unexpected CPU page layout");
    }

    for (int h = 0; h < num_kv_heads; ++h) {
        const auto ks =
            rotation_signs(d, derive_seed(config.seed, layer, h, d, RandomPurpose::kKeyRotation));
        const auto vs =
            rotation_signs(d, derive_seed(config.seed, layer, h, d, RandomPurpose::kValueRotation));
        t.key_signs.insert(t.key_signs.end(), ks.begin(), ks.end());
        t.value_signs.insert(t.value_signs.end(), vs.begin(), vs.end());
    }
    for (int s = 0; s < stages; ++s) {
        const ScalarCodebook& cb =
            s == 0 ? rotated_coordinate_codebook(d, kb) : residual_codebook(d, kb, s);
        t.key_centroids.insert(t.key_centroids.end(), cb.centroids.begin(), cb.centroids.end());
        t.key_boundaries.insert(t.key_boundaries.end(), cb.boundaries.begin(), cb.boundaries.end());
        if (kb == 1) {
            t.key_affine.push_back(cb.centroids[0]);
            t.key_affine.push_back(cb.centroids[1] - cb.centroids[0]);
            t.key_c0_sum += cb.centroids[0];
        } else {
            const float scale = max_abs(cb.centroids);
            t.key_affine.push_back(0.0f);
            t.key_affine.push_back(scale);
            append_pairs(cb.centroids, kb, scale, t.key_pairs);
            if (kb == 2) append_i8_parts(cb.centroids, scale, t.key_i8);
        }
    }
    if (kb == 2) {  // every stage in the scale of the largest centroid of any
        const float top = max_abs(t.key_centroids);
        for (int s = 0; s < stages; ++s)
            append_i8_parts(std::vector<float>(t.key_centroids.begin() + 4 * s,
                                               t.key_centroids.begin() + 4 * s + 4),
                            top, t.key_i8_joint);
        t.key_i8_joint_weight = top / kKeyI8Scale;
    }
    if (vb != 16) {
        const ScalarCodebook& cb = rotated_coordinate_codebook(d, vb);
        t.value_centroids = cb.centroids;
        t.value_boundaries = cb.boundaries;
        t.value_pair_scale = max_abs(cb.centroids);
        append_pairs(cb.centroids, vb, t.value_pair_scale, t.value_pairs);
    }
    t.inv_sqrt_d = 1.0f / std::sqrt(static_cast<float>(d));  // as fwht_orthonormal
    return t;
}

DeviceTables::DeviceTables(const TqHostTables& host) {
    struct Part {
        const void* data;
        std::size_t bytes;
        std::size_t offset;
    };
    auto part = [](const auto& v) { return Part{v.data(), v.size() * sizeof(v[0]), 0}; };
    Part parts[] = {
        part(host.key_signs),      part(host.value_signs),     part(host.key_centroids),
        part(host.key_boundaries), part(host.value_centroids), part(host.value_boundaries),
        part(host.key_pairs),      part(host.key_affine),      part(host.value_pairs),
        part(host.key_i8),         part(host.key_i8_joint)};
    for (Part& p : parts) {
        p.offset = bytes_;
        bytes_ += (p.bytes + 255) / 256 * 256;
    }
    check_cuda(cudaMalloc(&memory_, bytes_), "cudaMalloc(tables)");
    auto* base = static_cast<uint8_t*>(memory_);
    for (const Part& p : parts)
        if (p.bytes > 0)
            check_cuda(cudaMemcpy(base + p.offset, p.data, p.bytes, cudaMemcpyHostToDevice),
                       "tables");
    auto at = [&](int i) { return parts[i].bytes > 0 ? base + parts[i].offset : nullptr; };
    tables_.key_signs = reinterpret_cast<const float*>(at(0));
    tables_.value_signs = reinterpret_cast<const float*>(at(1));
    tables_.key_centroids = reinterpret_cast<const float*>(at(2));
    tables_.key_boundaries = reinterpret_cast<const float*>(at(3));
    tables_.value_centroids = reinterpret_cast<const float*>(at(4));
    tables_.value_boundaries = reinterpret_cast<const float*>(at(5));
    tables_.key_pairs = reinterpret_cast<const uint32_t*>(at(6));
    tables_.key_affine = reinterpret_cast<const float*>(at(7));
    tables_.key_i8 = reinterpret_cast<const uint32_t*>(at(9));
    tables_.key_i8_joint = reinterpret_cast<const uint32_t*>(at(10));
    tables_.key_i8_joint_weight = host.key_i8_joint_weight;
    // 4-bit keys and values of one stage share the codebook, so their pair tables are equal: one
    // pointer lets the decode keep a single copy of it in shared memory.
    const bool same_pairs =
        !host.value_pairs.empty() && host.key_pairs.size() >= host.value_pairs.size() &&
        std::equal(host.value_pairs.begin(), host.value_pairs.end(), host.key_pairs.begin());
    tables_.value_pairs = reinterpret_cast<const uint32_t*>(same_pairs ? at(6) : at(8));
    tables_.value_pair_scale = host.value_pair_scale;
    tables_.key_c0_sum = host.key_c0_sum;
    tables_.inv_sqrt_d = host.inv_sqrt_d;
}

DeviceTables::~DeviceTables() {
    cudaFree(memory_);
}

CudaTurboQuantCache::CudaTurboQuantCache(const KVCacheConfig& config, int num_heads, int head_dim,
                                         int max_seq_len, int layer, int window, int sink_tokens)
    : serial_(next_cache_serial()),
      config_(config),
      layer_(layer),
      host_(make_host_tables(config, num_heads, head_dim, layer)),
      tables_(host_),
      num_heads_(num_heads),
      head_dim_(head_dim),
      max_seq_len_(max_seq_len),
      key_bound_(config.key_bound()),
      value_bound_(config.value_bound()),
      pages_(host_.page_layout, std::max(max_seq_len, 1)),
      center_(config, num_heads, head_dim) {
    if (max_seq_len < 1) throw std::invalid_argument("max_seq_len must be positive");
    if (window < 0 || (window > 0 && sink_tokens < 0))
        throw std::invalid_argument(
            "CudaTurboQuantCache: window and sink_tokens must be >= 0, got " +
            std::to_string(window) + " and " + std::to_string(sink_tokens));
    if (window > 0 && config.center_keys)
        throw std::invalid_argument(
            "CudaTurboQuantCache: centred keys with a sliding window are not in the tuned "
            "kernels' scope (CudaCodecCache serves them)");
    check_cuda(cudaGetDevice(&device_), "cudaGetDevice");
    int major = 0, minor = 0;
    check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device_),
               "compute capability");
    check_cuda(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device_),
               "compute capability");
    if (major < 8)  // mma m16n8k16 / m16n8k32 and cp.async (the decode's launcher refuses too)
        throw std::invalid_argument(
            "CUDA backend: the tuned decode needs compute capability 8.0 or newer, this device "
            "has " +
            std::to_string(major) + "." + std::to_string(minor) + " (CudaCodecCache serves it)");
    if (window > 0) {
        window_ = TokenWindow{sink_tokens, window};
        pages_.map_pages();
    } else {
        pages_.reserve(1);
    }
}

CudaTurboQuantCache::~CudaTurboQuantCache() {
    cudaFree(workspace_);
    cudaFree(page_bias_);
}

void CudaTurboQuantCache::append(const float* keys, const float* values, int n_tokens,
                                 cudaStream_t stream) {
    if (n_tokens < 0) throw std::invalid_argument("append: n_tokens must be >= 0");
    if (n_tokens == 0) return;
    if (keys == nullptr || values == nullptr)
        throw std::invalid_argument("append: null keys or values");
    if (static_cast<long long>(size_) + n_tokens > max_seq_len_)
        throw std::length_error("append: " + std::to_string(n_tokens) +
                                " tokens would exceed max_seq_len " + std::to_string(max_seq_len_));
    require_key_mean("append");
    input_check_.require(keys, values, num_heads_, n_tokens, head_dim_, key_bound_, value_bound_,
                         stream);
    const int before = size_;
    make_room(n_tokens, stream);
    try {
        encode_tokens(keys, values, n_tokens, stream);
    } catch (...) {
        // A window's slots taken for pages that hold nothing yet go back (codes written past
        // size_ are never read).
        if (pages_.mapped())
            pages_.release((before + kTokensPerPage - 1) / kTokensPerPage,
                           (before + n_tokens + kTokensPerPage - 1) / kTokensPerPage);
        throw;
    }
    evict_after_append(before);
}

void CudaTurboQuantCache::make_room(int n_tokens, cudaStream_t stream) {
    if (pages_.mapped())
        pages_.hold(size_ / kTokensPerPage,
                    (size_ + n_tokens + kTokensPerPage - 1) / kTokensPerPage, stream);
    else
        pages_.reserve(size_ + n_tokens);
}

void CudaTurboQuantCache::evict_after_append(int first_new) {
    // What the first new token's window needs stays, as the CPU window keeps it.
    const int keep_from = first_new + 1 - window_.window;
    if (window_.window == 0 || keep_from <= window_.sinks) return;
    pages_.release(window_.sink_end() / kTokensPerPage, keep_from / kTokensPerPage);
}

bool CudaTurboQuantCache::position_held(int pos) const {
    return pos >= 0 && pos < size_ && pages_.held(pos / kTokensPerPage);
}

void CudaTurboQuantCache::require_key_mean(const char* what) const {
    if (center_.enabled() && !center_.estimated() && size_ > 0)
        throw std::invalid_argument(std::string(what) +
                                    ": this centred cache holds uploaded tokens but no key mean; "
                                    "set_key_mean must give the mean they were centred by");
}

void CudaTurboQuantCache::encode_tokens(const float* keys, const float* values, int n_tokens,
                                        cudaStream_t stream) {
    const bool first = center_.enabled() && !center_.estimated();
    try {
        if (first) center_.estimate(keys, n_tokens, stream);
        if (center_.enabled()) center_.reserve_pages(pages_.capacity_pages(), stream);
        EncodeArgs a;
        a.layout = host_.layout;
        a.tables = tables_.get();
        a.pool = pages_.pool();
        a.page_table = pages_.page_table();
        a.start = size_;
        a.n_tokens = n_tokens;
        a.keys = center_.centred(keys, n_tokens, size_, stream);
        a.values = values;
        const cudaError_t err = launch_encode(a, stream);
        center_.release_scratch(stream);
        check_cuda(err, "launch_encode");
    } catch (...) {
        center_.release_scratch(stream);
        if (first) center_.forget();  // as the CPU cache forgets a failed first append's training
        throw;
    }
    size_ += n_tokens;
}

int CudaTurboQuantCache::query_group(int num_q_heads, float scale) const {
    if (num_q_heads < num_heads_ || num_q_heads % num_heads_ != 0 ||
        num_q_heads / num_heads_ > kernels::kMaxGroup)
        throw std::invalid_argument("attend: num_q_heads must be 1..8 times the KV heads, got " +
                                    std::to_string(num_q_heads));
    if (!std::isfinite(scale)) throw std::invalid_argument("attend: scale must be finite");
    return num_q_heads / num_heads_;
}

void CudaTurboQuantCache::attend(const float* queries, int num_q_heads, float* out, float scale,
                                 cudaStream_t stream) const {
    if (queries == nullptr || out == nullptr)
        throw std::invalid_argument("attend: null queries or out");
    const int group = query_group(num_q_heads, scale);
    require_key_mean("attend");
    DecodeArgs a;
    a.layout = host_.layout;
    a.tables = tables_.get();
    a.pool = pages_.pool();
    a.page_table = pages_.page_table();
    a.page_table_stride = pages_.mapped() ? pages_.max_pages() : pages_.capacity_pages();
    a.window = window_;
    a.seq_len = size_;
    a.max_seq_len = std::max(size_, 1);
    a.batch = 1;
    a.group = group;
    a.queries = queries;
    a.out = out;
    a.scale = scale;
    if (center_.centering() && size_ > 0) {
        // Rows of the pool's capacity, which grows by a quarter at a time: the buffer is
        // reallocated (a device synchronization) that rarely, not at every new page.
        const int pages = (size_ + kTokensPerPage - 1) / kTokensPerPage;
        const int stride = std::max(pages, pages_.capacity_pages());
        ensure_device_bytes(page_bias_, page_bias_bytes_,
                            static_cast<std::size_t>(num_q_heads) * stride * sizeof(float),
                            "attend: page bias");
        center_.page_bias(center_.damped_address(), queries, 1, num_q_heads, nullptr, size_, pages,
                          scale, static_cast<float*>(page_bias_), stride, stream);
        a.page_bias = static_cast<const float*>(page_bias_);
        a.page_bias_stride = stride;
    }
    decode_in_workspace(a, workspace_, workspace_bytes_, stream);
}

void decode_in_workspace(DecodeArgs a, void*& workspace, std::size_t& bytes, cudaStream_t stream) {
    const std::size_t need = decode_workspace_bytes(a);
    if (need == 0) throw std::runtime_error("attend: no decode plan for this device");
    ensure_device_bytes(workspace, bytes, need, "attend: workspace");
    a.workspace = workspace;
    check_cuda(launch_decode_attention(a, stream), "launch_decode_attention");
}

void CudaTurboQuantCache::dequantize(int start, int n_tokens, float* keys, float* values,
                                     cudaStream_t stream) const {
    if (start < 0 || n_tokens < 0 || static_cast<long long>(start) + n_tokens > size_)
        throw std::out_of_range("dequantize: range outside [0, " + std::to_string(size_) + ")");
    if (n_tokens == 0) return;
    if (keys == nullptr || values == nullptr)
        throw std::invalid_argument("dequantize: null output");
    require_key_mean("dequantize");
    pages_.require_held(start, n_tokens);
    DequantizeArgs a;
    a.layout = host_.layout;
    a.tables = tables_.get();
    a.pool = pages_.pool();
    a.page_table = pages_.page_table();
    a.start = start;
    a.n_tokens = n_tokens;
    a.keys = keys;
    a.values = values;
    check_cuda(launch_dequantize(a, stream), "launch_dequantize");
    center_.restore(keys, n_tokens, start, stream);
}

void CudaTurboQuantCache::truncate(int n_tokens) {
    if (n_tokens < 0 || n_tokens > size_)
        throw std::out_of_range("truncate: " + std::to_string(n_tokens) + " is outside [0, " +
                                std::to_string(size_) + "]");
    if (pages_.mapped()) pages_.cut_window(n_tokens, size_, window_.window, window_.sinks);
    size_ = n_tokens;
}

void CudaTurboQuantCache::reset() {
    if (pages_.mapped()) pages_.release(0, pages_.max_pages());
    size_ = 0;
}

void CudaTurboQuantCache::copy_page(int page, void* host) const {
    pages_.copy_page(page, host);
}

std::size_t CudaTurboQuantCache::nbytes() const {
    return pages_.nbytes() + tables_.nbytes() + workspace_bytes_ + center_.nbytes() +
           page_bias_bytes_;
}

void CudaTurboQuantCache::upload(const PagedStore& store, int size) {
    if (size < 0 || size > max_seq_len_) throw std::invalid_argument("upload: bad size");
    pages_.upload(store, size);
    size_ = size;
}

void CudaTurboQuantCache::download(PagedStore& store) const {
    pages_.download(store, size_);
}

std::unique_ptr<QuantizedKVCache> CudaTurboQuantCache::to_host() const {
    require_key_mean("to_host");
    std::unique_ptr<QuantizedKVCache> cpu =
        make_quantized_cache(config_, num_heads_, head_dim_, max_seq_len_, layer_);
    // The codecs whose state the CPU cache takes: a centred cache's with the mean its pages
    // were centred by.
    std::vector<std::unique_ptr<KeyCodec>> codecs;
    for (int h = 0; h < num_heads_; ++h) {
        codecs.push_back(make_key_codec(config_, head_dim_, layer_, h));
        if (center_.estimated())
            dynamic_cast<CenteredKeyCodec&>(*codecs.back())
                .adopt_mean(center_.mean().data() + static_cast<std::size_t>(h) * head_dim_);
    }
    PagedStore pages(host_.page_layout);
    download(pages);
    cpu->adopt(pages, size_, codecs);
    return cpu;
}

std::unique_ptr<KVCache> CudaTurboQuantCache::host_cache() const {
    return with_window(to_host(), window_);
}

std::unique_ptr<CudaTurboQuantCache> CudaTurboQuantCache::from_host(const KVCache& cpu) {
    const HostCacheParts parts = host_cache_parts(cpu, "CudaTurboQuantCache::from_host");
    const QuantizedKVCache& q = parts.cache;
    auto gpu = std::make_unique<CudaTurboQuantCache>(q.config(), q.num_heads(), q.head_dim(),
                                                     q.max_seq_len(), q.layer(),
                                                     parts.window.window, parts.window.sinks);
    if (gpu->center_.enabled()) {  // the mean the CPU pages were centred by, once estimated
        std::vector<float> mean;
        bool estimated = true;
        for (const auto& codec : q.key_codecs()) {
            const auto& centred = dynamic_cast<const CenteredKeyCodec&>(*codec);
            estimated = estimated && centred.estimated();
            mean.insert(mean.end(), centred.mean().begin(), centred.mean().end());
        }
        if (estimated) gpu->set_key_mean(mean);
    }
    if (q.size() > 0) gpu->upload(q.paged_store(), q.size());
    return gpu;
}

void CudaTurboQuantCache::save(const std::string& path) const {
    host_cache()->save(path);
}

std::unique_ptr<CudaTurboQuantCache> CudaTurboQuantCache::load(const std::string& path) {
    return from_host(*load_host_cache(path, "CudaTurboQuantCache::load"));
}

}  // namespace veloxquant::cuda
