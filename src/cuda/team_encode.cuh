// Team encoders: one CTA of kTeam threads encodes one (KV head, token) item, for the short
// appends of decode steps. The device codecs' encoders (src/device_codecs/) run one thread per
// item, which keeps a prefill's many items busy but leaves a decode step (one token per KV head
// and sequence) to the latency of one thread: on the H200 at d = 128, a step's append took per
// layer commvq 6.3 ms, vecinfer 2.6, spectral 1.8, qjl 1.4, rabitq 1.1, polarquant 0.19 ms
// (bench_codec_cache, step_append_ms, before the teams).
//
// A team runs across its threads what the codec's encoder does independently (rotation rows and
// butterflies, per-coordinate quantization, codeword distances, sketch rows) and keeps every
// sum that the CPU takes in order in one thread, in that order. Its codes are therefore the
// one-thread encoder's, bit for bit (test_cuda_codec_cache: TeamEncodesLikeOneThread).
//
// A codec opts in by specializing TeamEncoder (team_encoders.cuh and the files beside it):
//   template <> struct TeamEncoder<XDevice> {
//     static constexpr bool kAvailable = true;
//     // The largest code the codec makes (its CPU codec's limits); its shared bit stream is
//     // sized by it, and the backend refuses a layout past it (codec_backend.cu).
//     static constexpr int kMaxCodeBytes = ...;
//     // key: d floats in shared memory (read-only); code: the token's code bytes in its page
//     // (every byte written); scalars: scalar s at scalars[s * stride]. All kTeam threads call
//     // it; it returns after a team barrier.
//     __device__ static void encode(const XDevice::Params&, const float* key, int pos,
//                                   uint8_t* code, float* scalars, int stride);
//   };
// Files that include this header must compile with --fmad=false, as the one-thread encoders.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/codec_kernels.cuh"
#include "device_codecs/device_common.h"

namespace veloxquant::cuda::team {

constexpr int kTeam = 128;  // threads per item
constexpr int kWarpsPerTeam = kTeam / 32;
/// The most code bytes of one token that most codecs reach (fp16 values at d = kMaxDim).
constexpr int kCommonMaxCodeBytes = 2 * dev::kMaxDim;

template <class Codec>
struct TeamEncoder {
    static constexpr bool kAvailable = false;
};

__device__ __forceinline__ int rank() {
    return static_cast<int>(threadIdx.x);
}
__device__ __forceinline__ int lane() {
    return static_cast<int>(threadIdx.x) & 31;
}
__device__ __forceinline__ int warp() {
    return static_cast<int>(threadIdx.x) >> 5;
}
__device__ __forceinline__ void sync() {
    __syncthreads();
}

/// y = R x (dev::rotate_forward's operations; x and y in shared memory, distinct). Hadamard: the
/// sign flips, each butterfly stage's d / 2 pairs across the team, then the scale; dense: one
/// row's sequential dot product per thread.
__device__ inline void rotate(const dev::RotationParams& r, const float* x, float* y) {
    const int d = r.d;
    if (r.hadamard) {
        for (int i = rank(); i < d; i += kTeam) y[i] = x[i] * r.signs[i];
        sync();
        for (int len = 1; len < d; len <<= 1) {
            for (int p = rank(); p < d / 2; p += kTeam) {
                const int i = (p / len) * 2 * len + p % len;
                const float a = y[i], b = y[i + len];
                y[i] = a + b;
                y[i + len] = a - b;
            }
            sync();
        }
        const float scale = 1.0f / sqrtf(static_cast<float>(d));
        for (int i = rank(); i < d; i += kTeam) y[i] *= scale;
    } else {
        for (int i = rank(); i < d; i += kTeam) {
            const float* row = r.matrix + static_cast<std::size_t>(i) * d;
            float acc = 0.0f;
            for (int k = 0; k < d; ++k) acc += row[k] * x[k];
            y[i] = acc;
        }
    }
    sync();
}

/// sum_j x_j^2 in double, in j order (the encoders' norms), computed by thread 0 and returned
/// to every thread.
__device__ inline double sum_squares(const float* x, int d) {
    __shared__ double result;
    if (rank() == 0) {
        double s = 0.0;
        for (int j = 0; j < d; ++j) s += static_cast<double>(x[j]) * x[j];
        result = s;
    }
    sync();
    const double s = result;
    sync();  // result may be written again by the next call
    return s;
}

/// An LSB-first bit stream assembled in shared memory: zero(), then any thread ORs fields into
/// it (atomically: neighbouring fields share words), then store() copies its bytes out.
struct SharedBits {
    uint32_t* words;

    __device__ void zero(int bytes) const {
        for (int w = rank(); w < (bytes + 3) / 4; w += kTeam) words[w] = 0;
        sync();
    }
    /// ORs the `bits`-bit field v (bits <= 16) at bit `bit`.
    __device__ void put(int bit, int bits, uint32_t v) const {
        const int w = bit >> 5, shift = bit & 31;
        atomicOr(words + w, v << shift);
        if (shift + bits > 32) atomicOr(words + w + 1, v >> (32 - shift));
    }
    /// Copies the first `bytes` bytes to dst (after a barrier that ends the puts).
    __device__ void store(uint8_t* dst, int bytes) const {
        sync();
        const auto* src = reinterpret_cast<const uint8_t*>(words);  // little-endian words
        for (int b = rank(); b < bytes; b += kTeam) dst[b] = src[b];
        sync();
    }
};

/// The best of a scan's candidates, split across the 32 lanes of a warp. Each lane scans its
/// contiguous run of candidates (lane_range) in order with the codec's own update rule and
/// hands in its run's result: the run's best value and index, or index -1 if the codec's scan
/// would take none of them from an empty start. The runs then fold left to right: a run's result
/// replaces the fold so far if that is empty or better(run value, fold value), which equals the
/// one sequential scan for rules that replace the best only by a strictly better value (first
/// index among equals). Returns the winning index (-1 if none) to every lane.
template <class Better>
__device__ int warp_fold_best(float value, int index, Better better) {
    for (int offset = 1; offset < 32; offset <<= 1) {
        // Lanes 2 offset k hold the fold of [2 offset k, 2 offset k + offset); add the next run.
        const float v2 = __shfl_down_sync(kFull, value, offset);
        const int i2 = __shfl_down_sync(kFull, index, offset);
        if ((lane() & (2 * offset - 1)) == 0 && i2 >= 0 && (index < 0 || better(v2, value))) {
            value = v2;
            index = i2;
        }
    }
    return __shfl_sync(kFull, index, 0);
}

/// Lane l's share [begin, end) of n candidates split into 32 contiguous runs.
__device__ __forceinline__ void lane_range(int n, int* begin, int* end) {
    *begin = lane() * n / 32;
    *end = (lane() + 1) * n / 32;
}

}  // namespace veloxquant::cuda::team

namespace veloxquant::cuda::codec {

/// One CTA of team::kTeam threads per (unit, token) item: the key codec's team encoder, then
/// the value codec's, each on the item's row staged in shared memory (EncodeParams as
/// codec_encode_kernel). (Value is a parameter so that its team encoder is looked up where the
/// kernel is instantiated, after team_encoders.cuh.)
template <class Codec, class Value = dev::ValueDevice>
__global__ void __launch_bounds__(team::kTeam)
    codec_team_encode_kernel(const EncodeParams<Codec> a) {
    __shared__ __align__(16) float row[dev::kMaxDim];
    const long long item = blockIdx.x;
    const int u = static_cast<int>(item / a.n), t = static_cast<int>(item % a.n);
    const int h = a.head(u), pos = a.pos(u, t), d = a.store.d;
    const HeadRegions R = a.store.regions[h];
    uint8_t* page = a.page(u, pos);
    const int slot = pos % kPage;
    const size_t first = (static_cast<size_t>(u) * a.n + t) * d;
    if (a.keys != nullptr) {  // (else a key kernel of its own encodes them)
        for (int j = team::rank(); j < d; j += team::kTeam) row[j] = a.keys[first + j];
        team::sync();
        team::TeamEncoder<Codec>::encode(
            a.key_params(u), row, pos, page + R.key_codes + slot * R.key_code_bytes,
            reinterpret_cast<float*>(page + R.key_scalars) + slot, kPage);
    }
    if (a.values == nullptr) return;  // encode_values_kernel's
    for (int j = team::rank(); j < d; j += team::kTeam) row[j] = a.values[first + j];
    team::sync();
    team::TeamEncoder<Value>::encode(
        a.value_params(u), row, pos, page + R.value_codes + slot * R.value_code_bytes,
        reinterpret_cast<float*>(page + R.value_scalars) + slot, kPage);
}

}  // namespace veloxquant::cuda::codec
