// Device memory that the launches of one call use and no later call reads: an append's centred
// keys (KeyCenter), an attention's query states and partial softmax states (the generic codec
// backend). Up to kKeptBytes stays allocated between calls, so that decode steps and short
// appends allocate nothing; a larger need, a long prefill chunk's, is allocated stream-ordered
// and given back on the same stream once the call has enqueued the launches that read it
// (release). Without that, a cache kept its largest launch's temporaries for its life: a
// 512-query chunk over 131072 tokens left 229 MB of partial states in a turboquant cache whose
// pages took 162 MB (bench/results/cuda_h100_20261206d_outlier_costs.json, cache_nbytes).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

namespace veloxquant::cuda {

/// Makes `buffer` hold at least `need` bytes: a larger buffer replaces it after synchronizing the
/// device (no launch still reads the old one). Throws std::runtime_error naming `what`.
void ensure_device_bytes(void*& buffer, std::size_t& bytes, std::size_t need, const char* what);

class LaunchScratch {
public:
    static constexpr std::size_t kKeptBytes = std::size_t{32} << 20;

    LaunchScratch() = default;
    ~LaunchScratch();
    LaunchScratch(const LaunchScratch&) = delete;
    LaunchScratch& operator=(const LaunchScratch&) = delete;

    /// `bytes` of scratch for launches on `stream`, valid until release(): the kept buffer
    /// (grown, after a device synchronization, up to kKeptBytes) or, past that, a stream-ordered
    /// allocation. One allocation at a time: a second get() before release() replaces the
    /// first's buffer (std::logic_error if the first was stream-ordered). Throws
    /// std::runtime_error naming `what` when the device has no memory for it.
    void* get(std::size_t bytes, cudaStream_t stream, const char* what);
    /// Ends the use of get()'s buffer: a stream-ordered one goes back to the device's memory pool
    /// after the launches enqueued on `stream` so far.
    void release(cudaStream_t stream) noexcept;
    /// Device bytes held between calls.
    std::size_t nbytes() const { return kept_bytes_; }

private:
    void* kept_ = nullptr;
    std::size_t kept_bytes_ = 0;
    void* transient_ = nullptr;
};

/// release()s a LaunchScratch when the call that used it returns or throws.
class ScratchRelease {
public:
    ScratchRelease(LaunchScratch& scratch, cudaStream_t stream)
        : scratch_(scratch), stream_(stream) {}
    ~ScratchRelease() { scratch_.release(stream_); }
    ScratchRelease(const ScratchRelease&) = delete;
    ScratchRelease& operator=(const ScratchRelease&) = delete;

private:
    LaunchScratch& scratch_;
    cudaStream_t stream_;
};

}  // namespace veloxquant::cuda
