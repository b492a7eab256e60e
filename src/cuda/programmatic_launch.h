// Programmatic dependent launch (sm_90): a kernel launched as the programmatic dependent of the
// stream's previous kernel may start as that kernel's CTAs end, or once they have all called
// allow_dependent_grid_launch() (the turboquant decode does at its entry, for its small merge;
// codec_attention.cuh says why the prepare kernel does not), so that its launch and whatever it
// does before wait_for_prerequisite_grid() (ptx_wrappers.cuh) overlap the other's completion.
// Only code built for sm_90 or newer waits there; older code (a compute_80 PTX the driver
// compiled for a newer GPU, say) would read the other kernel's outputs too early, so it is
// launched as usual.
#pragma once

#include <cuda_runtime.h>

#include <utility>

namespace veloxquant::cuda {

/// Whether kernel's code on the current device waits in wait_for_prerequisite_grid()
/// (cudaFuncAttributes::ptxVersion: 90 for code built for sm_90; the code of one translation
/// unit shares it). Errors are returned, with `waits` false.
inline cudaError_t kernel_waits_for_prerequisite(const void* kernel, bool& waits) {
    cudaFuncAttributes attributes{};
    const cudaError_t err = cudaFuncGetAttributes(&attributes, kernel);
    waits = err == cudaSuccess && attributes.ptxVersion >= 90;
    return err;
}

template <class... Params>
cudaError_t kernel_waits_for_prerequisite(void (*kernel)(Params...), bool& waits) {
    return kernel_waits_for_prerequisite(reinterpret_cast<const void*>(kernel), waits);
}

/// kernel<<<grid, block, smem, stream>>>(args...), as the programmatic dependent of the
/// stream's previous kernel where `programmatic` (kernel_waits_for_prerequisite said so).
template <class... Params, class... Args>
cudaError_t launch_after_prerequisite(void (*kernel)(Params...), dim3 grid, dim3 block,
                                      std::size_t smem, cudaStream_t stream, bool programmatic,
                                      Args&&... args) {
    cudaLaunchConfig_t config = {};
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    cudaLaunchAttribute attribute = {};
    attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute.val.programmaticStreamSerializationAllowed = 1;
    config.attrs = &attribute;
    config.numAttrs = programmatic ? 1 : 0;
    return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

}  // namespace veloxquant::cuda
