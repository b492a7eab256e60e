// stage_rows (codec_attention.cuh), the generic attention's copy of a chunk's code rows into
// padded shared-memory rows, on a GPU: row sizes that take each path (16-, 8- and 4-byte
// asynchronous units, and stage_bytes for rows not a multiple of 4 bytes) at source addresses
// with every offset from a 16-byte boundary, the kernels' (always 4-byte aligned) and others
// (stage_bytes' unaligned start), byte for byte against the host, padding untouched. Skips
// without a device.
#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <vector>

#include "cuda/codec_attention.cuh"
#include "cuda_test_helpers.h"

namespace veloxquant::cuda {
namespace {

using vqtest::DeviceBuffer;

constexpr int kMaxRows = 33, kMaxStride = 128;
constexpr uint8_t kPad = 0xA5;

// One warp stages n rows of row_bytes from src into rows dst_stride apart and writes them out.
__global__ void stage_kernel(const uint8_t* src, int row_bytes, int n, int dst_stride,
                             uint8_t* out) {
    __shared__ __align__(16) uint8_t rows[kMaxRows * kMaxStride];
    const int lane = threadIdx.x;
    for (int i = lane; i < n * dst_stride; i += 32) rows[i] = kPad;
    __syncwarp();
    codec::stage_rows(rows, dst_stride, src, row_bytes, n, lane);
    codec::stage_wait();
    for (int i = lane; i < n * dst_stride; i += 32) out[i] = rows[i];
}

TEST(StageRowsDevice, CopiesEveryRowSizeFromEveryOffset) {
    SKIP_WITHOUT_DEVICE();
    std::mt19937 gen(3);
    constexpr int kSlack = 64;  // source bytes past the rows (stage_bytes reads whole words)
    std::vector<uint8_t> host(kMaxRows * kMaxStride + 16 + kSlack);
    for (auto& b : host) b = static_cast<uint8_t>(gen());
    const DeviceBuffer<uint8_t> src(host);
    DeviceBuffer<uint8_t> out(kMaxRows * kMaxStride);
    for (const int row_bytes : {1, 3, 4, 6, 8, 18, 32, 64, 126}) {
        const int stride = (row_bytes + 15) / 16 * 16;
        for (const int offset : {0, 1, 2, 3, 4, 6, 8, 12}) {
            for (const int n : {1, 7, 32, 33}) {
                stage_kernel<<<1, 32>>>(src.get() + offset, row_bytes, n, stride, out.get());
                ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
                const std::vector<uint8_t> got = out.download();
                for (int t = 0; t < n; ++t)
                    for (int j = 0; j < stride; ++j) {
                        const uint8_t want =
                            j < row_bytes ? host[offset + t * row_bytes + j] : kPad;
                        ASSERT_EQ(got[t * stride + j], want)
                            << "row_bytes " << row_bytes << " offset " << offset << " n " << n
                            << " row " << t << " byte " << j;
                    }
            }
        }
    }
}

}  // namespace
}  // namespace veloxquant::cuda
