// A second stream for work that may run beside a caller's stream: fork() makes it wait for what
// the caller's stream has queued so far, join() makes the caller's stream wait for what was queued
// here since. The codec backend encodes a long append's values here while its keys encode on the
// caller's stream, so that the value kernel's CTAs take what the key kernel's leave of the SMs
// (and its tail). On the H200, 32K tokens x 8 heads (cuda_h200_20261203y_encoders.txt):
// turboquant k4v4 1.96-1.98 -> 1.90 ms, vecinfer 1%; rabitq and commvq, whose key kernels fill
// the SMs' registers, unchanged. Events and a stream wait are recorded into a graph under stream
// capture as well.
#pragma once

#include <cuda_runtime.h>

#include "cuda/cuda_cache.h"

namespace veloxquant::cuda {

class SideStream {
public:
    SideStream() {
        check_cuda(cudaStreamCreateWithFlags(&side_, cudaStreamNonBlocking), "side stream");
        check_cuda(cudaEventCreateWithFlags(&forked_, cudaEventDisableTiming), "side stream fork");
        check_cuda(cudaEventCreateWithFlags(&joined_, cudaEventDisableTiming), "side stream join");
    }
    ~SideStream() {
        cudaEventDestroy(joined_);
        cudaEventDestroy(forked_);
        cudaStreamDestroy(side_);
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
