#include "cuda/key_center.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "cuda/cuda_cache.h"
#include "cuda/key_center.cuh"
#include "methods/centered_key_codec.h"

namespace veloxquant::cuda {

static_assert(2 * kernels::kCenterMaxPairs == KeyCenter::kMaxHeadDim,
              "the page bias's tiles hold the widest head's pairs");

KeyCenter::KeyCenter(const KVCacheConfig& config, int num_heads, int head_dim, PhaseLayout layout)
    : enabled_(config.center_keys), heads_(num_heads), dim_(head_dim), layout_(layout) {
    if (!enabled_) return;
    if (head_dim % 2 != 0 || head_dim > 2 * kernels::kCenterMaxPairs)
        throw std::invalid_argument("CUDA center_keys: head_dim must be even and at most " +
                                    std::to_string(2 * kernels::kCenterMaxPairs) + ", got " +
                                    std::to_string(head_dim));
    if (config.rope_inv_freq.size() > static_cast<std::size_t>(head_dim / 2))
        throw std::invalid_argument("rope_inv_freq has more than head_dim / 2 frequencies");
    pairs_ = static_cast<int>(config.rope_inv_freq.size());
    half_split_ = config.rope_half_split;
    inv_freq_ = config.rope_inv_freq;
    mean_.assign(static_cast<std::size_t>(num_heads) * head_dim, 0.0f);
    block_average_ = rope_block_average(config.rope_inv_freq);
    // [the damped mean's address][inv_freq][damped mean], each part 256-byte aligned.
    const std::size_t freq_bytes = (pairs_ * sizeof(double) + 255) / 256 * 256;
    param_bytes_ = 256 + freq_bytes + mean_.size() * sizeof(float);
    check_cuda(cudaMalloc(&params_, param_bytes_), "cudaMalloc(key centre)");
    uint8_t* base = static_cast<uint8_t*>(params_);
    damped_address_ = reinterpret_cast<const float* const*>(base);
    inv_freq_device_ = reinterpret_cast<double*>(base + 256);
    damped_device_ = reinterpret_cast<float*>(base + 256 + freq_bytes);
    check_cuda(cudaMemcpy(base, &damped_device_, sizeof(float*), cudaMemcpyHostToDevice),
               "upload the key centre's address");
    if (pairs_ > 0)
        check_cuda(cudaMemcpy(inv_freq_device_, config.rope_inv_freq.data(),
                              pairs_ * sizeof(double), cudaMemcpyHostToDevice),
                   "upload rope_inv_freq");
    upload_damped();
}

KeyCenter::~KeyCenter() {
    cudaFree(params_);
    cudaFree(phases_);
}

void KeyCenter::upload_damped() {
    std::vector<float> damped = mean_;
    for (int h = 0; h < heads_; ++h)
        damp_rope_mean(block_average_, half_split_,
                       damped.data() + static_cast<std::size_t>(h) * dim_, dim_);
    check_cuda(cudaMemcpy(damped_device_, damped.data(), damped.size() * sizeof(float),
                          cudaMemcpyHostToDevice),
               "upload the damped key mean");
    centering_ = std::any_of(mean_.begin(), mean_.end(), [](float x) { return x != 0.0f; });
}

void KeyCenter::set_mean(const std::vector<float>& mean) {
    if (!enabled_) throw std::invalid_argument("set_mean: the cache does not centre its keys");
    if (mean.size() != mean_.size())
        throw std::invalid_argument("set_mean: the mean has " + std::to_string(mean.size()) +
                                    " entries, num_heads * head_dim is " +
                                    std::to_string(mean_.size()));
    for (float x : mean)
        if (!std::isfinite(x)) throw std::invalid_argument("set_mean: non-finite key mean");
    mean_ = mean;
    upload_damped();
    estimated_ = true;
}

void KeyCenter::forget() noexcept {
    if (!enabled_) return;
    std::fill(mean_.begin(), mean_.end(), 0.0f);
    estimated_ = false;
    centering_ = false;
    // A batch reads every sequence's damped mean once one of them centres: zeros for this one.
    cudaMemset(damped_device_, 0, mean_.size() * sizeof(float));
}

void KeyCenter::estimate(const float* keys, int n, cudaStream_t stream) {
    if (!enabled_ || estimated_) return;
    std::vector<float> mean(mean_.size(), 0.0f);
    if (n >= CenteredKeyCodec::kMinEstimateTokens) {
        const int m = std::min(n, CenteredKeyCodec::kMaxEstimateRows);
        kernels::KeyCenterView c{heads_, dim_, pairs_, half_split_, inv_freq_device_};
        // The estimate lands in the damped buffer, read back, and is replaced by the damped mean.
        kernels::estimate_key_mean_kernel<<<dim3(heads_, dim_ / 2), kernels::kCenterThreads, 0,
                                            stream>>>(c, keys, n, m, damped_device_);
        check_cuda(cudaGetLastError(), "estimate_key_mean_kernel");
        check_cuda(cudaMemcpyAsync(mean.data(), damped_device_, mean.size() * sizeof(float),
                                   cudaMemcpyDeviceToHost, stream),
                   "download the key mean");
        check_cuda(cudaStreamSynchronize(stream), "estimate the key mean");
    }
    set_mean(mean);
}

const float* KeyCenter::shift_into_scratch(const float* keys, int n, int batch,
                                           const float* const* damped, const int32_t* starts,
                                           int pos0, cudaStream_t stream) {
    const std::size_t count = static_cast<std::size_t>(batch) * heads_ * n * dim_;
    auto* out =
        static_cast<float*>(scratch_.get(count * sizeof(float), stream, "centred keys scratch"));
    kernels::KeyCenterView c{heads_, dim_, pairs_, half_split_, inv_freq_device_};
    check_cuda(
        kernels::launch_shift_keys(c, damped, starts, pos0, keys, out, n, batch, -1.0f, stream),
        "shift_keys_kernel");
    return out;
}

const float* KeyCenter::centred(const float* keys, int n, int pos0, cudaStream_t stream) {
    if (!centering_ || n == 0) return keys;
    return shift_into_scratch(keys, n, 1, damped_address_, nullptr, pos0, stream);
}

const float* KeyCenter::centred_batch(const float* keys, int n, int batch,
                                      const float* const* damped, const int32_t* starts,
                                      cudaStream_t stream) {
    if (!enabled_ || n == 0) return keys;
    return shift_into_scratch(keys, n, batch, damped, starts, 0, stream);
}

void KeyCenter::restore(float* keys, int n, int pos0, cudaStream_t stream) const {
    if (!centering_ || n == 0) return;
    kernels::KeyCenterView c{heads_, dim_, pairs_, half_split_, inv_freq_device_};
    check_cuda(kernels::launch_shift_keys(c, damped_address_, nullptr, pos0, keys, keys, n, 1, 1.0f,
                                          stream),
               "shift_keys_kernel");
}

void KeyCenter::reserve_pages(int pages, cudaStream_t stream) const {
    if (pages <= phase_pages_ || pairs_ == 0) return;
    // Whole tiles of the bias kernel, and a quarter more than needed, as the pool grows.
    const int tile = kernels::kBiasPages;
    const int want = std::max({pages, phase_pages_ + phase_pages_ / 4, 2 * tile});
    const int stride = (want + tile - 1) / tile * tile;
    // Until the new table is written, none is held: a failed allocation or launch below must
    // not leave the old page count over a freed buffer (the next call starts over).
    phase_pages_ = 0;
    ensure_device_bytes(phases_, phase_bytes_,
                        static_cast<std::size_t>(2 * pairs_) * stride * sizeof(float),
                        "centred keys: page phases");
    kernels::KeyCenterView c{heads_, dim_, pairs_, half_split_, inv_freq_device_};
    const std::size_t threads = static_cast<std::size_t>(pairs_) * stride;
    const unsigned blocks =
        static_cast<unsigned>((threads + kernels::kCenterThreads - 1) / kernels::kCenterThreads);
    kernels::page_phase_kernel<<<blocks, kernels::kCenterThreads, 0, stream>>>(
        c, static_cast<float*>(phases_), stride, layout_ == PhaseLayout::kPageRows);
    check_cuda(cudaGetLastError(), "page_phase_kernel");
    phase_pages_ = stride;
}

void KeyCenter::page_bias(const float* const* damped, const float* queries, int batch, int q_heads,
                          const int32_t* seq_lens, int seq_len, int max_pages, float scale,
                          float* bias, int bias_stride, cudaStream_t stream) const {
    if (layout_ != PhaseLayout::kPairRows)
        throw std::logic_error("KeyCenter::page_bias: the phases lie in page rows");
    reserve_pages(max_pages, stream);
    kernels::KeyCenterView c{heads_, dim_, pairs_, half_split_, inv_freq_device_};
    const dim3 grid((max_pages + kernels::kBiasPages - 1) / kernels::kBiasPages, batch,
                    (q_heads + kernels::kBiasHeads - 1) / kernels::kBiasHeads);
    kernels::page_bias_kernel<<<grid, kernels::kCenterThreads, 0, stream>>>(
        c, static_cast<const float*>(phases_), phase_pages_, damped, queries, q_heads,
        q_heads / heads_, seq_lens, seq_len, scale * 1.4426950408889634f, bias, bias_stride);
    check_cuda(cudaGetLastError(), "page_bias_kernel");
}

}  // namespace veloxquant::cuda
