// The memoized runtime queries of runtime_facts.h: one table per process, keyed by device.
#include "cuda/runtime_facts.h"

#include <map>
#include <mutex>
#include <tuple>
#include <utility>

#include "cuda/programmatic_launch.h"

namespace veloxquant::cuda {
namespace {

constexpr std::size_t kDefaultDynamicSmem = 48 * 1024;  // no attribute needed up to this

struct Facts {
    std::mutex mutex;
    std::map<std::tuple<int, const void*, int, std::size_t>, int> occupancy;
    std::map<std::pair<int, const void*>, std::size_t> smem_limits;  // as raised so far
    std::map<std::pair<int, const void*>, bool> waits;
    std::map<int, std::pair<int, int>> devices;
    std::map<int, std::size_t> optin;
};

Facts& facts() {
    static Facts f;
    return f;
}

}  // namespace

cudaError_t device_facts(int& sms, int& major) {
    int device = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err != cudaSuccess) return err;
    Facts& f = facts();
    std::lock_guard<std::mutex> lock(f.mutex);
    if (const auto it = f.devices.find(device); it != f.devices.end()) {
        std::tie(sms, major) = it->second;
        return cudaSuccess;
    }
    err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (err == cudaSuccess)
        err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    if (err == cudaSuccess) f.devices[device] = {sms, major};
    return err;
}

cudaError_t shared_memory_optin(std::size_t& bytes) {
    int device = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err != cudaSuccess) return err;
    Facts& f = facts();
    std::lock_guard<std::mutex> lock(f.mutex);
    if (const auto it = f.optin.find(device); it != f.optin.end()) {
        bytes = it->second;
        return cudaSuccess;
    }
    int optin = 0;
    err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (err == cudaSuccess) bytes = f.optin[device] = static_cast<std::size_t>(optin);
    return err;
}

cudaError_t resident_ctas(const void* kernel, int threads, std::size_t smem, int& per_sm) {
    int device = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err != cudaSuccess) return err;
    Facts& f = facts();
    std::lock_guard<std::mutex> lock(f.mutex);
    const auto key = std::make_tuple(device, kernel, threads, smem);
    if (const auto it = f.occupancy.find(key); it != f.occupancy.end()) {
        per_sm = it->second;
        return cudaSuccess;
    }
    std::size_t& limit =
        f.smem_limits.try_emplace({device, kernel}, kDefaultDynamicSmem).first->second;
    if (smem > limit) {
        err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   static_cast<int>(smem));
        if (err != cudaSuccess) return err;
        limit = smem;
    }
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem);
    if (err == cudaSuccess) f.occupancy[key] = per_sm;
    return err;
}

cudaError_t waits_for_prerequisite(const void* kernel, bool& waits) {
    int device = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err != cudaSuccess) return err;
    Facts& f = facts();
    std::lock_guard<std::mutex> lock(f.mutex);
    const auto key = std::make_pair(device, kernel);
    if (const auto it = f.waits.find(key); it != f.waits.end()) {
        waits = it->second;
        return cudaSuccess;
    }
    err = kernel_waits_for_prerequisite(kernel, waits);
    if (err == cudaSuccess) f.waits[key] = waits;
    return err;
}

}  // namespace veloxquant::cuda
