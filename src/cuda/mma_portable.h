// Portable forms of the two warp-level matrix instructions of the generic attention
// (codec_attention.cuh): mma.m16n8k16 (f32 += f16 x f16) and ldmatrix.x4 (and .trans), for GPUs
// before sm_75 (ptx_wrappers.cuh takes these there; sm_75 has ldmatrix and does the mma as two
// m16n8k8).
// Each lane gathers the fragment entries it needs from the lanes that hold them through
// `fetch`, a warp shuffle on the device; the host tests pass the 32 lanes' registers instead, so
// the same code is checked without a GPU (tests/test_mma_portable.cpp). The fragment layouts are
// the PTX ISA's ("Matrix Fragments for mma.m16n8k16 with floating point type", "ldmatrix").
// Per mma 32 fetches and 64 FMAs a lane: slow, but the same results (products of halves are
// exact in float; only the order of the sums differs from the tensor cores').
#pragma once

#include <cstdint>

#include "core/host_device.h"
#include "device_codecs/device_common.h"

namespace veloxquant::cuda {

/// The low (k even) and high (k odd) halves of a fragment register as floats.
VQ_HD float low_half(uint32_t x) {
    return dev::half_bits_to_float(static_cast<uint16_t>(x & 0xffffu));
}
VQ_HD float high_half(uint32_t x) {
    return dev::half_bits_to_float(static_cast<uint16_t>(x >> 16));
}

/// C += A B, A 16 x 16 (row), B 16 x 8 (column), for lane = 4 g + t, whose accumulators are
/// c = {C[g][2t], C[g][2t+1], C[g+8][2t], C[g+8][2t+1]}. fetch(r, j) returns register r of lane
/// j (the same r on every lane at once): r = 0..3 its A fragment (A[g][2t..2t+1], A[g+8][2t..],
/// A[g][2t+8..], A[g+8][2t+8..]), r = 4, 5 its B fragment (B[2t..2t+1][g], B[2t+8..][g]), each
/// two halves with the lower k in the low 16 bits.
template <class Fetch>
VQ_HD void mma_16816_by_lanes(float (&c)[4], int lane, Fetch&& fetch) {
    const int g = lane >> 2, t = lane & 3;
#if defined(__CUDA_ARCH__)
#pragma unroll  // constant register indices: the fragments stay in registers
#endif
    for (int p = 0; p < 8; ++p) {  // k = 2p, 2p + 1: held by lanes 4 n + p % 4
        const int upper = p >> 2, q = p & 3;
        const uint32_t top = fetch(2 * upper, 4 * g + q);         // A[g][k]
        const uint32_t bottom = fetch(2 * upper + 1, 4 * g + q);  // A[g + 8][k]
        const uint32_t even = fetch(4 + upper, 8 * t + q);        // B[k][2t]
        const uint32_t odd = fetch(4 + upper, 8 * t + 4 + q);     // B[k][2t + 1]
        const float a0 = low_half(top), a1 = high_half(top);
        const float a2 = low_half(bottom), a3 = high_half(bottom);
        const float b0 = low_half(even), b1 = high_half(even);
        const float b2 = low_half(odd), b3 = high_half(odd);
        c[0] += a0 * b0 + a1 * b1;
        c[1] += a0 * b2 + a1 * b3;
        c[2] += a2 * b0 + a3 * b1;
        c[3] += a2 * b2 + a3 * b3;
    }
}

/// ldmatrix.x4 for the lane: row_of(j) is the address lane j gave (lane 8 i + s: row s of
/// matrix i, 8 halves). Without TRANS r[i] holds row lane / 4 of matrix i, columns 2 (lane % 4)
/// and 2 (lane % 4) + 1; with TRANS the same of its transpose: rows 2 (lane % 4) and
/// 2 (lane % 4) + 1 of column lane / 4. The lower column (row) in the low 16 bits.
template <bool TRANS, class RowOf>
VQ_HD void ldmatrix_x4_by_lanes(uint32_t (&r)[4], int lane, RowOf&& row_of) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int i = 0; i < 4; ++i) {
        uint32_t lo, hi;
        if constexpr (TRANS) {
            lo = row_of(8 * i + 2 * (lane & 3))[lane >> 2];
            hi = row_of(8 * i + 2 * (lane & 3) + 1)[lane >> 2];
        } else {
            const uint16_t* row = row_of(8 * i + (lane >> 2));
            lo = row[2 * (lane & 3)];
            hi = row[2 * (lane & 3) + 1];
        }
        r[i] = lo | hi << 16;
    }
}

}  // namespace veloxquant::cuda
