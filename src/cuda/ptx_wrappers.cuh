// PTX wrappers shared by the CUDA kernels: tensor-core mma, ldmatrix / movmatrix, cp.async,
// the fast exp2, half2 packing and programmatic dependent launch. Below the architecture its
// instruction needs, the fp16 mma (two m16n8k8 on sm_75) and ldmatrix take other forms (before
// sm_75: mma_portable.h), so the generic attention runs on every GPU the code is built for; the
// others trap, and the tuned decode's launcher refuses such devices first.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/mma_portable.h"

namespace veloxquant::cuda {

/// The calling thread's lane in its warp (%laneid: whatever the block's shape).
__device__ __forceinline__ int lane_id() {
    int lane;
    asm("mov.u32 %0, %%laneid;" : "=r"(lane));
    return lane;
}

/// mma m16n8k16 as two m16n8k8 (sm_75, Turing's tensor cores): k 0-7 are A registers 0, 1 and
/// B register 0, k 8-15 registers 2, 3 and 1.
__device__ __forceinline__ void mma_16816_as_two_1688(float (&c)[4], const uint32_t (&a)[4],
                                                      uint32_t b0, uint32_t b1) {
#if __CUDA_ARCH__ >= 750
    asm("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(b0));
    asm("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[2]), "r"(a[3]), "r"(b1));
#else
    __trap();
#endif
}

/// C += A B, m16n8k16, f16 inputs and f32 accumulators (fragments: mma_portable.h).
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
#if __CUDA_ARCH__ >= 800
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#elif __CUDA_ARCH__ >= 750
    mma_16816_as_two_1688(c, a, b0, b1);
#else
    mma_16816_by_lanes(c, lane_id(), [&](int r, int j) {
        return __shfl_sync(0xffffffffu, r < 4 ? a[r] : r == 4 ? b0 : b1, j);
    });
#endif
}

/// x rounded to tf32 (10 fraction bits; to nearest, ties away from zero), as a b32 register.
__device__ __forceinline__ uint32_t to_tf32(float x) {
#if __CUDA_ARCH__ >= 800
    uint32_t y;
    asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(y) : "f"(x));
    return y;
#else
    __trap();
    return 0;
#endif
}

/// C += A B, m16n8k8, tf32 inputs (to_tf32) and f32 accumulators. A 16 x 8 (row): lane 4 g + t
/// holds A[g][t], A[g+8][t], A[g][t+4], A[g+8][t+4]; B 8 x 8 (column): B[t][g], B[t+4][g]; C as
/// mma_16816's.
__device__ __forceinline__ void mma_1688_tf32(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                              uint32_t b1) {
#if __CUDA_ARCH__ >= 800
    asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    __trap();
#endif
}

/// Integer mma m16n8k32: 8-bit A (row; unsigned, or signed with SIGNED_A), signed 8-bit B
/// (column), int32 accumulators.
template <bool SIGNED_A>
__device__ __forceinline__ void mma_16832_i8(int (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
#if __CUDA_ARCH__ >= 800
    if constexpr (SIGNED_A)
        asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};\n"
            : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    else
        asm("mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};\n"
            : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    __trap();
#endif
}

/// Four 8x8 b16 matrices from shared memory at shared address s (lane 8 i + r gives row r of
/// matrix i; lane l gets row l / 4, elements 2 (l % 4) and 2 (l % 4) + 1 of each), or their
/// transposes (TRANS).
template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4_at(uint32_t (&r)[4], uint32_t s) {
#if __CUDA_ARCH__ >= 750
    if constexpr (TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(s)
                     : "memory");
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(s)
                     : "memory");
#else
    const auto mine = reinterpret_cast<unsigned long long>(__cvta_shared_to_generic(s));
    ldmatrix_x4_by_lanes<TRANS>(r, lane_id(), [mine](int j) {
        return reinterpret_cast<const uint16_t*>(__shfl_sync(0xffffffffu, mine, j));
    });
#endif
}

/// ldmatrix_x4_at from a generic pointer into shared memory.
template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
    ldmatrix_x4_at<TRANS>(r, static_cast<uint32_t>(__cvta_generic_to_shared(smem)));
}

/// The transpose of an 8x8 fp16 matrix across the warp, in registers: thread (g, t) passes row g,
/// columns 2t, 2t + 1 (an mma C fragment's row) and gets rows 2t, 2t + 1 of column g (a B
/// fragment's k pair).
__device__ __forceinline__ uint32_t movmatrix_trans(uint32_t x) {
#if __CUDA_ARCH__ >= 750
    uint32_t y;
    asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
    return y;
#else
    __trap();
    return 0;
#endif
}

/// An asynchronous copy of BYTES (16: through L2 only, .cg; 4: through L1, as .ca is the only
/// cache mode cp.async takes for fewer than 16 bytes) to a 32-bit shared-window address
/// (__cvta_generic_to_shared): where the kernel keeps that address in a register, ptxas folds
/// constant offsets added to it into the instruction.
template <int BYTES>
__device__ __forceinline__ void cp_async_at(uint32_t s, const void* gmem) {
    static_assert(BYTES == 4 || BYTES == 16, "4- or 16-byte copies");
#if __CUDA_ARCH__ >= 800
    if constexpr (BYTES == 16)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
    else
        asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(s), "l"(gmem) : "memory");
#else
    (void)s, (void)gmem;
    __trap();
#endif
}

/// L2 cache policy words of the cache_hint forms (PTX createpolicy's encodings, as CUTLASS's
/// CacheHintSm90 spells them): a line fetched under evict-first is the first the L2 replaces.
constexpr uint64_t kL2EvictNormal = 0x1000000000000000ull;
constexpr uint64_t kL2EvictFirst = 0x12F0000000000000ull;

/// cp_async_at with an L2 cache policy word (kL2Evict*). CUDA 13.0's ptxas mis-encodes these
/// copies where it splits the shared address into a lane register and a uniform base (it encodes
/// [R + UR0 + imm], desc[UR1] with neither set: an illegal instruction); callers pass addresses
/// it cannot take apart (the decode's pass through an identity PRMT).
template <int BYTES>
__device__ __forceinline__ void cp_async_hinted_at(uint32_t s, const void* gmem, uint64_t policy) {
    static_assert(BYTES == 4 || BYTES == 16, "4- or 16-byte copies");
#if __CUDA_ARCH__ >= 800
    if constexpr (BYTES == 16)
        asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;\n" ::"r"(s),
                     "l"(gmem), "l"(policy)
                     : "memory");
    else
        asm volatile("cp.async.ca.shared.global.L2::cache_hint [%0], [%1], 4, %2;\n" ::"r"(s),
                     "l"(gmem), "l"(policy)
                     : "memory");
#else
    (void)s, (void)gmem, (void)policy;
    __trap();
#endif
}

/// cp_async_at to a shared-memory pointer.
template <int BYTES>
__device__ __forceinline__ void cp_async(void* smem, const void* gmem) {
    static_assert(BYTES == 4 || BYTES == 16, "4- or 16-byte copies");
#if __CUDA_ARCH__ >= 800
    cp_async_at<BYTES>(static_cast<uint32_t>(__cvta_generic_to_shared(smem)), gmem);
#else
    if constexpr (BYTES == 16)
        *static_cast<uint4*>(smem) = *static_cast<const uint4*>(gmem);
    else
        *static_cast<uint32_t*>(smem) = *static_cast<const uint32_t*>(gmem);
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

/// Waits until at most `pending` (0..3) committed groups are still in flight.
__device__ __forceinline__ void cp_async_wait(int pending) {
#if __CUDA_ARCH__ >= 800
    switch (pending) {
        case 0:
            asm volatile("cp.async.wait_group 0;\n" ::: "memory");
            break;
        case 1:
            asm volatile("cp.async.wait_group 1;\n" ::: "memory");
            break;
        case 2:
            asm volatile("cp.async.wait_group 2;\n" ::: "memory");
            break;
        default:
            asm volatile("cp.async.wait_group 3;\n" ::: "memory");
            break;
    }
#endif
}

/// 2^x for x <= 0 (MUFU.EX2, flushing subnormal results to 0; -inf gives 0).
/// max(a, b), NaN if either is (max.NaN: one instruction on sm_80 and newer).
__device__ __forceinline__ float max_nan(float a, float b) {
#if __CUDA_ARCH__ >= 800
    float d;
    asm("max.NaN.f32 %0, %1, %2;\n" : "=f"(d) : "f"(a), "f"(b));
    return d;
#else
    return a != a || b != b ? a + b : fmaxf(a, b);
#endif
}

/// Keeps x in a register from here on: ptxas can no longer rebuild it from what it was computed
/// of (it does so for cheap values under register pressure, at every use in a loop).
template <class T>
__device__ __forceinline__ void pin_register(T& x) {
    if constexpr (sizeof(T) == 8)
        asm volatile("" : "+l"(x));
    else
        asm volatile("" : "+r"(x));
}

/// PRMT with a selector taken as it is: byte i of the result is byte (nibble i & 7) of the pool
/// hi:lo, or its sign where the nibble's bit 3 is set. (__byte_perm masks its selector with
/// 0x7777 first: an extra LOP3 where the selector is not a constant.)
__device__ __forceinline__ uint32_t permute_bytes(uint32_t lo, uint32_t hi, uint32_t sel) {
    uint32_t d;
    asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(d) : "r"(lo), "r"(hi), "r"(sel));
    return d;
}

__device__ __forceinline__ float exp2_approx(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ uint32_t pack_half2(__half lo, __half hi) {
    return static_cast<uint32_t>(__half_as_ushort(lo)) |
           (static_cast<uint32_t>(__half_as_ushort(hi)) << 16);
}

/// Programmatic dependent launch (sm_90, griddepcontrol.wait). In a grid launched as the
/// programmatic dependent of the stream's previous kernel: waits until that grid has ended and
/// its writes are visible; in a grid launched as usual it returns at once. Below sm_90 a
/// no-op, so the launchers launch such code as usual (programmatic_launch.h).
__device__ __forceinline__ void wait_for_prerequisite_grid() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

/// Lets the stream's next kernel, where it is this grid's programmatic dependent, launch once
/// every CTA of this grid has called this or ended (griddepcontrol.launch_dependents); its CTAs
/// then wait in wait_for_prerequisite_grid() for this grid's end. Below sm_90 a no-op.
__device__ __forceinline__ void allow_dependent_grid_launch() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

}  // namespace veloxquant::cuda
