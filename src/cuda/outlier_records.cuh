// The outlier side store's records on the device (DeviceOutlierStore, OutlierView), in the CPU's
// OutlierStore layout: per entry its key vector, then its value vector; a vector is d int8 codes
// then a float scale (x_j = scale * code_j), or d halves (scale 1). Entries are 2 (d + 4) or 4 d
// bytes apart from a 256-byte aligned base, so at even d every vector starts on 4 bytes.
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

namespace veloxquant::cuda {

/// The vector's scale: read byte by byte (d need not be a multiple of 4); 1 for fp16.
__device__ __forceinline__ float outlier_scale(const uint8_t* vec, int bits, int d) {
    if (bits == 16) return 1.0f;
    uint32_t raw = 0;
#pragma unroll
    for (int b = 0; b < 4; ++b) raw |= static_cast<uint32_t>(vec[d + b]) << (8 * b);
    return __uint_as_float(raw);
}

/// Coordinate j of the vector over its scale (the int8 code, or the half).
__device__ __forceinline__ float outlier_code(const uint8_t* vec, int bits, int j) {
    return bits == 16 ? __half2float(reinterpret_cast<const __half*>(vec)[j])
                      : static_cast<float>(reinterpret_cast<const int8_t*>(vec)[j]);
}

/// Coordinate j of the vector.
__device__ __forceinline__ float outlier_coordinate(const uint8_t* vec, int bits, int d, int j) {
    return outlier_scale(vec, bits, d) * outlier_code(vec, bits, j);
}

/// <q, x> for the vector x, q of d floats (shared memory), by one thread: the codes four bytes at
/// a time where d is even (int8 at d a multiple of 4).
__device__ __forceinline__ float outlier_dot(const uint8_t* vec, int bits, int d, const float* q) {
    float s = 0.0f;
    if (bits == 16 && d % 2 == 0) {
        const __half2* h = reinterpret_cast<const __half2*>(vec);
#pragma unroll 8
        for (int j = 0; j < d; j += 2) {
            const float2 x = __half22float2(h[j / 2]);
            s += q[j] * x.x + q[j + 1] * x.y;
        }
        return s;
    }
    if (bits == 8 && d % 4 == 0) {
        const char4* c = reinterpret_cast<const char4*>(vec);
#pragma unroll 8
        for (int j = 0; j < d; j += 4) {
            const char4 x = c[j / 4];
            s += q[j] * x.x + q[j + 1] * x.y + q[j + 2] * x.z + q[j + 3] * x.w;
        }
        return s * outlier_scale(vec, bits, d);
    }
    for (int j = 0; j < d; ++j) s += q[j] * outlier_code(vec, bits, j);
    return s * outlier_scale(vec, bits, d);
}

}  // namespace veloxquant::cuda
