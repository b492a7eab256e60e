// The side stream that long appends encode their values on (side_stream.h): every SideStream of
// a device forks to that device's one stream, so caches do not each hold a stream's device memory
// (0.53 MiB a stream on the H200). Skips without a device.
#include <gtest/gtest.h>

#include <memory>
#include <vector>

#include "cuda/side_stream.h"
#include "cuda_test_helpers.h"

namespace veloxquant::cuda {
namespace {

double free_device_mib() {
    size_t free = 0, total = 0;
    check_cuda(cudaDeviceSynchronize(), "sync");
    check_cuda(cudaMemGetInfo(&free, &total), "cudaMemGetInfo");
    return static_cast<double>(free) / (1 << 20);
}

TEST(SideStream, EveryInstanceForksToTheDevicesOneStream) {
    SKIP_WITHOUT_DEVICE();
    cudaStream_t main = nullptr;
    check_cuda(cudaStreamCreateWithFlags(&main, cudaStreamNonBlocking), "main stream");
    SideStream a, b;
    cudaStream_t side = a.fork(main);
    EXPECT_NE(side, main);
    EXPECT_EQ(b.fork(main), side);
    EXPECT_EQ(device_side_stream(), side);
    // Work queued on the side stream is done once `main` has passed the join.
    vqtest::DeviceBuffer<uint8_t> buffer(size_t{64} << 20);
    check_cuda(cudaMemsetAsync(buffer.get(), 0x5a, size_t{64} << 20, side), "memset");
    a.join(main);
    b.join(main);
    check_cuda(cudaStreamSynchronize(main), "main");
    EXPECT_EQ(cudaStreamQuery(side), cudaSuccess);
    const std::vector<uint8_t> bytes = buffer.download();
    EXPECT_EQ(bytes.front(), 0x5a);
    EXPECT_EQ(bytes.back(), 0x5a);
    check_cuda(cudaStreamDestroy(main), "main stream");
}

TEST(SideStream, InstancesHoldNoDeviceMemory) {
    SKIP_WITHOUT_DEVICE();
    const SideStream first;  // the device's stream exists from here on
    const double before = free_device_mib();
    std::vector<std::unique_ptr<SideStream>> many;
    for (int i = 0; i < 64; ++i) many.push_back(std::make_unique<SideStream>());
    // A stream of its own each took 34 MiB for 64 of them.
    EXPECT_LT(before - free_device_mib(), 2.0);
}

}  // namespace
}  // namespace veloxquant::cuda
