// A second stream for work that may run beside a caller's stream: fork() makes it wait for what
// the caller's stream has queued so far, join() makes the caller's stream wait for what was queued
// here since. The codec backend encodes a long append's values here while its keys encode on the
// caller's stream, so that the value kernel's CTAs take what the key kernel's leave of the SMs
// (and its tail). On the H200, 32K tokens x 8 heads (cuda_h200_20261203y_encoders.txt):
// turboquant k4v4 1.96-1.98 -> 1.90 ms, vecinfer 1%; rabitq and commvq, whose key kernels fill
// the SMs' registers, unchanged. Events and a stream wait are recorded into a graph under stream
// capture as well.
// The stream itself is the current device's one side stream, shared by every SideStream of the
// process (each keeps its own events): a CUDA stream holds 0.53 MiB of device memory (H200,
// bench/results/cuda_h200_20261203zg_stream_memory.txt), which one per cache added to every
// layer's cache beyond its nbytes(). Sharing it orders the value encodes of caches appending on
// different streams one after the other, and a join waits for every value encode queued before
// it; two threads capturing graphs through it at the same time would clash.
#pragma once

#include <cuda_runtime.h>

#include <mutex>
#include <vector>

#include "cuda/cuda_cache.h"

namespace veloxquant::cuda {

/// The current device's shared side stream, created on first use and kept for the process (not
/// destroyed at exit, when the driver may already be gone).
inline cudaStream_t device_side_stream() {
    static std::mutex mutex;
    static std::vector<cudaStream_t> streams;  // by device ordinal
    int device = 0;
    check_cuda(cudaGetDevice(&device), "side stream device");
    const std::lock_guard<std::mutex> lock(mutex);
    if (streams.size() <= static_cast<std::size_t>(device)) streams.resize(device + 1, nullptr);
    if (streams[device] == nullptr)
        check_cuda(cudaStreamCreateWithFlags(&streams[device], cudaStreamNonBlocking),
                   "side stream");
    return streams[device];
}

class SideStream {
public:
    SideStream() : side_(device_side_stream()) {
        check_cuda(cudaEventCreateWithFlags(&forked_, cudaEventDisableTiming), "side stream fork");
        check_cuda(cudaEventCreateWithFlags(&joined_, cudaEventDisableTiming), "side stream join");
    }
    ~SideStream() {
        cudaEventDestroy(joined_);
        cudaEventDestroy(forked_);
    }
    SideStream(const SideStream&) = delete;
    SideStream& operator=(const SideStream&) = delete;

    /// The side stream, after everything queued on `main` so far.
    cudaStream_t fork(cudaStream_t main) {
        check_cuda(cudaEventRecord(forked_, main), "side stream fork record");
        check_cuda(cudaStreamWaitEvent(side_, forked_, 0), "side stream fork wait");
        return side_;
    }
    /// `main` waits for everything queued on the side stream so far.
    void join(cudaStream_t main) {
        check_cuda(cudaEventRecord(joined_, side_), "side stream join record");
        check_cuda(cudaStreamWaitEvent(main, joined_, 0), "side stream join wait");
    }

private:
    cudaStream_t side_ = nullptr;
    cudaEvent_t forked_ = nullptr, joined_ = nullptr;
};

}  // namespace veloxquant::cuda
