// Team encoders (team_encode.cuh) of the value codec and the key codecs whose encoders are
// per-coordinate or per-row work after a norm and a rotation: fp16, turboquant_rvq (and
// ratequant), qjl, polarquant. Each mirrors the one-thread encoder of its device codec
// (src/device_codecs/) operation for operation; what that encoder sums in order, thread 0 sums
// here in the same order.
#pragma once

#include <cfloat>

#include "cuda/team_encode.cuh"
#include "device_codecs/fp16_device.h"
#include "device_codecs/polarquant_device.h"
#include "device_codecs/qjl_device.h"
#include "device_codecs/tq_device.h"
#include "device_codecs/value_device.h"

namespace veloxquant::cuda::team {

/// Coordinate j as two fp16 bytes, one thread per coordinate.
__device__ inline void store_halves(const float* x, int d, uint8_t* code) {
    for (int j = rank(); j < d; j += kTeam) {
        const uint16_t h = dev::float_to_half_bits(x[j]);
        code[2 * j] = static_cast<uint8_t>(h & 0xffu);
        code[2 * j + 1] = static_cast<uint8_t>(h >> 8);
    }
    sync();
}

template <>
struct TeamEncoder<dev::Fp16Device> {
    static constexpr bool kAvailable = true;
    static constexpr int kMaxCodeBytes = kCommonMaxCodeBytes;
    __device__ static void encode(const dev::Fp16Device::Params& p, const float* key, int,
                                  uint8_t* code, float*, int) {
        store_halves(key, p.d, code);
    }
};

/// TqDevice::encode: the norm, the rotation, then each coordinate's residual stages in one
/// thread (coordinates are independent).
template <>
struct TeamEncoder<dev::TqDevice> {
    static constexpr bool kAvailable = true;
    /// Up to 8 stages of 8-bit indices (TurboQuantRVQCodec's limits).
    static constexpr int kMaxCodeBytes = 8 * 8 * dev::kMaxDim / 8;
    __device__ static void encode(const dev::TqDevice::Params& p, const float* key, int,
                                  uint8_t* code, float* scalars, int) {
        __shared__ float u[dev::kMaxDim];
        __shared__ uint32_t words[(kMaxCodeBytes + 3) / 4];
        const int d = p.d, levels = 1 << p.bits, bytes = dev::TqDevice::code_bytes(p);
        const float norm = static_cast<float>(sqrt(sum_squares(key, d)));
        if (rank() == 0) scalars[0] = norm;
        rotate(p.rotation, key, u);
        const SharedBits stream{words};
        stream.zero(bytes);
        for (int j = rank(); j < d; j += kTeam) {
            float x = norm > 0.0f ? u[j] / norm : 0.0f;
            for (int s = 0; s < p.stages; ++s) {
                const int idx =
                    dev::quantize_sorted(p.boundaries + s * (levels - 1), levels - 1, x);
                x -= p.centroids[s * levels + idx];
                stream.put(8 * s * p.stage_bytes + j * p.bits, p.bits, static_cast<uint32_t>(idx));
            }
        }
        stream.store(code, bytes);
    }
};

/// ValueDevice::encode: the norm, the rotation, each coordinate's index and its terms of the
/// least-squares scale, whose two double sums thread 0 and thread 32 then take in order.
template <>
struct TeamEncoder<dev::ValueDevice> {
    static constexpr bool kAvailable = true;
    static constexpr int kMaxCodeBytes = kCommonMaxCodeBytes;
    __device__ static void encode(const dev::ValueDevice::Params& p, const float* v, int,
                                  uint8_t* code, float* scalars, int) {
        if (p.bits == 16) return store_halves(v, p.d, code);
        __shared__ float u[dev::kMaxDim];
        __shared__ double uc_terms[dev::kMaxDim], cc_terms[dev::kMaxDim];
        __shared__ double sums[2];
        __shared__ uint32_t words[(kMaxCodeBytes + 3) / 4];
        const int d = p.d, levels = 1 << p.bits, bytes = dev::ValueDevice::code_bytes(p);
        const double norm = sqrt(sum_squares(v, d));
        const SharedBits stream{words};
        stream.zero(bytes);
        float scale = 0.0f;
        const float inv = norm > 0.0 ? static_cast<float>(1.0 / norm) : 0.0f;
        if (norm > 0.0 && inv <= FLT_MAX) {  // a subnormal v is stored as 0 (as ValueCodec)
            rotate(p.rotation, v, u);
            for (int j = rank(); j < d; j += kTeam) {
                const float x = u[j] * inv;
                const int idx = dev::quantize_sorted(p.boundaries, levels - 1, x);
                const double c = p.centroids[idx];
                uc_terms[j] = x * c;
                cc_terms[j] = c * c;
                stream.put(j * p.bits, p.bits, static_cast<uint32_t>(idx));
            }
            sync();
            if (rank() == 0 || rank() == 32) {
                const double* terms = rank() == 0 ? uc_terms : cc_terms;
                double s = 0.0;
                for (int j = 0; j < d; ++j) s += terms[j];
                sums[rank() == 0 ? 0 : 1] = s;
            }
            sync();
            scale = sums[1] > 0.0 ? static_cast<float>(norm * sums[0] / sums[1]) : 0.0f;
        }
        if (rank() == 0) scalars[0] = scale;
        stream.store(code, bytes);
    }
};

/// QjlDevice::encode: the norm, then one sketch row's sequential double dot product per thread.
template <>
struct TeamEncoder<dev::QjlDevice> {
    static constexpr bool kAvailable = true;
    /// One bit per sketch row, up to QJLCodec::kMaxSketchDim = 8192 rows.
    static constexpr int kMaxCodeBytes = 8192 / 8;
    __device__ static void encode(const dev::QjlDevice::Params& p, const float* key, int,
                                  uint8_t* code, float* scalars, int) {
        __shared__ uint32_t words[(kMaxCodeBytes + 3) / 4];
        const int d = p.d, bytes = dev::QjlDevice::code_bytes(p);
        const double norm2 = sum_squares(key, d);
        if (rank() == 0) scalars[0] = static_cast<float>(sqrt(norm2));
        const SharedBits stream{words};
        stream.zero(bytes);
        for (int i = rank(); i < p.m; i += kTeam) {
            const float* row = p.sketch + static_cast<std::size_t>(i) * d;
            double acc = 0.0;
            for (int j = 0; j < d; ++j) acc += static_cast<double>(row[j]) * key[j];
            if (acc >= 0.0) stream.put(i, 1, 1u);
        }
        stream.store(code, bytes);
    }
};

/// PolarQuantDevice::encode: the norm, the rotation, then each level's angles across the team
/// (a level's radii depend only on the level below).
template <>
struct TeamEncoder<dev::PolarQuantDevice> {
    static constexpr bool kAvailable = true;
    static constexpr int kMaxCodeBytes = kCommonMaxCodeBytes;
    using Polar = dev::PolarQuantDevice;
    __device__ static void encode(const Polar::Params& p, const float* key, int, uint8_t* code,
                                  float* scalars, int) {
        __shared__ float y[dev::kMaxDim];
        __shared__ double r[dev::kMaxDim / 2];
        __shared__ uint32_t words[(kMaxCodeBytes + 3) / 4];
        const int d = p.d, bytes = Polar::code_bytes(p);
        const double norm = sqrt(sum_squares(key, d));
        if (rank() == 0) scalars[0] = static_cast<float>(norm);
        rotate(p.rotation, key, y);
        const SharedBits stream{words};
        stream.zero(bytes);
        // Level 1: full-circle angles of coordinate pairs, in [0, 2 pi).
        const int bits1 = Polar::level_bits(p, 1);
        const float* b1 = p.boundaries + p.boundary_offset[0];
        for (int j = rank(); j < d / 2; j += kTeam) {
            const double a = y[2 * j], b = y[2 * j + 1];
            double theta = atan2(b, a);
            if (theta < 0.0) theta += Polar::kTwoPi;
            const int idx =
                dev::quantize_sorted(b1, Polar::levels(p, 1) - 1, static_cast<float>(theta));
            stream.put(j * bits1, bits1, static_cast<uint32_t>(idx));
            r[j] = hypot(a, b);
        }
        sync();
        // Levels 2..4 after each other in the second stream; r shrinks in place.
        const int upper = 8 * p.level1_bytes;
        for (int level = 2, len = d / 4, at = 0; level <= Polar::kLevels;
             at += len, ++level, len /= 2) {
            const float* bl = p.boundaries + p.boundary_offset[level - 1];
            double next[(dev::kMaxDim / 4 + kTeam - 1) / kTeam];
            for (int j = rank(), k = 0; j < len; j += kTeam, ++k) {
                const float angle = static_cast<float>(atan2(r[2 * j + 1], r[2 * j]));
                const int idx = dev::quantize_sorted(bl, Polar::levels(p, level) - 1, angle);
                stream.put(upper + (at + j) * p.bits, p.bits, static_cast<uint32_t>(idx));
                next[k] = hypot(r[2 * j], r[2 * j + 1]);
            }
            sync();
            for (int j = rank(), k = 0; j < len; j += kTeam, ++k) r[j] = next[k];
            sync();
        }
        // Final radii relative to ||k||, in [0, 1], as fp16.
        const int radii = 8 * (p.level1_bytes + p.upper_bytes);
        const double inv = norm > 0.0 ? 1.0 / norm : 0.0;
        for (int j = rank(); j < d / Polar::kBlock; j += kTeam)
            stream.put(radii + 16 * j, 16, dev::float_to_half_bits(static_cast<float>(r[j] * inv)));
        stream.store(code, bytes);
    }
};

}  // namespace veloxquant::cuda::team
