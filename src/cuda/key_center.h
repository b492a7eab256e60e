// KeyCenter: centred keys (KVCacheConfig::center_keys) for a device cache, the device side of
// CenteredKeyCodec (methods/centered_key_codec.h). The cache codes k - c_b instead of k; the
// first append estimates the pre-RoPE mean mu on the device; a decode adds <q, c_b> to the
// scores of each page b (the page bias, one float per page and query head), which the decode
// kernel folds into its logits; a dequantize adds c_b back. Pages hold 64 tokens, the centres'
// block, so a page has one centre.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "cuda/launch_scratch.h"
#include "veloxquant/config.h"

namespace veloxquant::cuda {

/// How the page phases lie (KeyCenter::phases): kPairRows [2P][pages], rows 2i and 2i + 1 the cos
/// and sin of 64 page w_i, for page_bias's tiles of pages; kPageRows [pages][P] float2 (cos, sin),
/// for the generic attention, whose lanes take one page's pairs (coalesced: with pair rows each
/// lane's read was a cache line of its own; page rows took 1-4% off centred decodes at 32K).
enum class PhaseLayout { kPairRows, kPageRows };

class KeyCenter {
public:
    /// The widest head the device centre takes (its kernels' shared tiles are sized for it).
    static constexpr int kMaxHeadDim = 128;

    /// Off (every call passes through) unless config.center_keys; then head_dim must be even and
    /// at most 128 (std::invalid_argument). Allocates its parameters on the current device.
    KeyCenter(const KVCacheConfig& config, int num_heads, int head_dim,
              PhaseLayout layout = PhaseLayout::kPairRows);
    ~KeyCenter();
    KeyCenter(const KeyCenter&) = delete;
    KeyCenter& operator=(const KeyCenter&) = delete;

    bool enabled() const { return enabled_; }
    /// The same centring parameters (on or off, RoPE frequencies and pairing): caches a batch
    /// takes together.
    bool alike(const KeyCenter& other) const {
        return enabled_ == other.enabled_ && inv_freq_ == other.inv_freq_ &&
               half_split_ == other.half_split_ && dim_ == other.dim_ && heads_ == other.heads_;
    }
    /// A non-zero mean: appends shift, decodes take the page bias.
    bool centering() const { return centering_; }
    /// Whether the mean is set (by the first append, set_mean, or as zero by a short first append).
    bool estimated() const { return estimated_; }
    /// The pre-RoPE mean [num_heads][head_dim] (zeros until estimated).
    const std::vector<float>& mean() const { return mean_; }
    /// Sets the mean (e.g. a CPU cache's, with its pages); std::invalid_argument for a wrong size
    /// or a non-finite entry. Synchronous.
    void set_mean(const std::vector<float>& mean);
    /// Forgets the mean (a failed first append).
    void forget() noexcept;

    /// First append (positions 0 .. n - 1): estimates the mean from device keys [heads][n][d]
    /// (rows training_row of at most CenteredKeyCodec::kMaxEstimateRows), or leaves it zero for
    /// the cache's life when n < kMinEstimateTokens, as the CPU codec does. Synchronizes.
    void estimate(const float* keys, int n, cudaStream_t stream);
    /// keys [heads][n][d] at positions pos0.. less their centres, in this object's scratch
    /// (valid until release_scratch), or keys itself when not centering.
    const float* centred(const float* keys, int n, int pos0, cudaStream_t stream);
    /// Keys [batch][heads][n][d] of a batch of sequences alike this one (KeyCenter::alike),
    /// sequence b's at positions starts[b].. less its own centres: damped [batch] and starts
    /// [batch] are device arrays (each sequence's damped(), and its first position). In this
    /// object's scratch, as centred() (whether or not this sequence centres).
    const float* centred_batch(const float* keys, int n, int batch, const float* const* damped,
                               const int32_t* starts, cudaStream_t stream);
    /// Ends the use of centred()'s or centred_batch()'s result: scratch over
    /// LaunchScratch::kKeptBytes (a long prefill's) goes back to the device's memory pool,
    /// ordered on `stream` after the encode that read it.
    void release_scratch(cudaStream_t stream) noexcept { scratch_.release(stream); }
    /// keys [heads][n][d] at positions pos0.. plus their centres, in place.
    void restore(float* keys, int n, int pos0, cudaStream_t stream) const;
    /// The damped mean on the device [heads][d] (the page bias's input).
    const float* damped() const { return damped_device_; }
    /// A device array of one pointer, damped(): page_bias's `damped` for this cache alone.
    const float* const* damped_address() const { return damped_address_; }

    /// Makes the page phases, the decodes' page factor, cover `pages` pages: where they do not,
    /// computes them for a quarter more (a device synchronization; the caches call this as
    /// their pools grow, so that a decode, maybe in a graph capture, never needs to).
    void reserve_pages(int pages, cudaStream_t stream) const;

    /// The page phases, cos and sin of 64 page w_i for the pages reserved (reserve_pages), laid
    /// out as the constructor's PhaseLayout says.
    const float* phases() const { return static_cast<const float*>(phases_); }
    /// Turned pairs P (the RoPE frequencies) and their pairing.
    int pairs() const { return pairs_; }
    bool half_split() const { return half_split_; }

    /// Device bytes held (parameters, scratch and the page phases).
    std::size_t nbytes() const { return param_bytes_ + scratch_.nbytes() + phase_bytes_; }

    /// bias [batch][q_heads][bias_stride] (log2 units: log2(e) scale <q, c_page>) of each page of
    /// each sequence: damped [batch] device pointers to the sequences' damped means, queries
    /// [batch][q_heads][d], seq_lens [batch] on the device or null (all seq_len). The decode that
    /// reads bias may be launched as this kernel's programmatic dependent. Past the pages
    /// reserved it first reserves max_pages (a device synchronization: not in a graph capture).
    /// Pair rows only (std::logic_error otherwise).
    void page_bias(const float* const* damped, const float* queries, int batch, int q_heads,
                   const int32_t* seq_lens, int seq_len, int max_pages, float scale, float* bias,
                   int bias_stride, cudaStream_t stream) const;

private:
    void upload_damped();
    // The shift of `batch` sequences' keys into scratch_.
    const float* shift_into_scratch(const float* keys, int n, int batch, const float* const* damped,
                                    const int32_t* starts, int pos0, cudaStream_t stream);

    bool enabled_ = false;
    bool estimated_ = false;
    bool centering_ = false;
    int heads_ = 0, dim_ = 0, pairs_ = 0;
    bool half_split_ = false;
    PhaseLayout layout_ = PhaseLayout::kPairRows;
    std::vector<float> mean_;           ///< [heads][d]
    std::vector<double> inv_freq_;      ///< [pairs]
    std::vector<float> block_average_;  ///< [pairs][2]: A_i (rope_block_average)
    void* params_ = nullptr;            ///< damped_address_, inv_freq [pairs], damped [heads][d]
    const float* const* damped_address_ = nullptr;
    double* inv_freq_device_ = nullptr;
    float* damped_device_ = nullptr;
    std::size_t param_bytes_ = 0;
    LaunchScratch scratch_;  ///< centred keys of an append
    // The page phases of phase_pages_ pages (kernels::page_phase_kernel): parameters that grow
    // with the pool, so reserve_pages is const.
    mutable void* phases_ = nullptr;
    mutable std::size_t phase_bytes_ = 0;
    mutable int phase_pages_ = 0;
};

}  // namespace veloxquant::cuda
