// The value codec (methods/value_codec.h) as a device codec: fp16, or R v / ||v|| quantized
// with the rotated-coordinate Lloyd-Max codebook and one least-squares scale per token.
// Attention accumulates sum_t p_t * (value t in the rotated domain) (coord; on the GPU the
// tensor cores' sum of src/cuda/codec_value_mma.cuh) and maps the sum back once (finalize).
#pragma once

#include <cfloat>

#include "device_codecs/device_common.h"

namespace veloxquant {
class ValueCodec;
}

namespace veloxquant::dev {

struct ValueDevice {
    struct Params {
        int d = 0;
        int bits = 16;
        RotationParams rotation;
        const float* centroids = nullptr;   ///< [2^bits]
        const float* boundaries = nullptr;  ///< [2^bits - 1]
        void rebase(const uint8_t* base) {
            if (bits == 16) return;
            rotation.rebase(base);
            dev::rebase(centroids, base);
            dev::rebase(boundaries, base);
        }
    };

    static Params build(const ValueCodec& cpu, ParamArena& arena);

    VQ_HD static int code_bytes(const Params& p) {
        return p.bits == 16 ? 2 * p.d : packed_size(p.d, p.bits);
    }
    VQ_HD static int num_scalars(const Params& p) { return p.bits == 16 ? 0 : 1; }
    VQ_HD static void encode(const Params& p, const float* v, uint8_t* code, float* scalars) {
        const int d = p.d;
        if (p.bits == 16) {
            for (int j = 0; j < d; ++j) {
                const uint16_t h = float_to_half_bits(v[j]);
                code[2 * j] = static_cast<uint8_t>(h & 0xffu);
                code[2 * j + 1] = static_cast<uint8_t>(h >> 8);
            }
            return;
        }
        const int levels = 1 << p.bits;
        double norm2 = 0.0;
        for (int j = 0; j < d; ++j) norm2 += static_cast<double>(v[j]) * v[j];
        const double norm = sqrt(norm2);
        zero_bytes(code, code_bytes(p));
        float scale = 0.0f;
        const float inv = norm > 0.0 ? static_cast<float>(1.0 / norm) : 0.0f;
        if (norm > 0.0 && inv <= FLT_MAX) {  // a subnormal v is stored as 0 (as ValueCodec)
            float u[kMaxDim];
            rotate_forward(p.rotation, v, u);
            // Least-squares scale ||v|| <u, c> / ||c||^2 (as ValueCodec::encode).
            double uc = 0.0, cc = 0.0;
            for (int j = 0; j < d; ++j) {
                const float x = u[j] * inv;
                const int idx = quantize_sorted(p.boundaries, levels - 1, x);
                const double c = p.centroids[idx];
                uc += x * c;
                cc += c * c;
                or_bits(code, j, p.bits, static_cast<uint32_t>(idx));
            }
            scale = cc > 0.0 ? static_cast<float>(norm * uc / cc) : 0.0f;
        }
        scalars[0] = scale;
    }

    /// Coordinate j of the token in the attention domain (rotated and scaled, or fp16).
    VQ_HD static float coord(const Params& p, const uint8_t* code, const float* scalars, int j) {
        if (p.bits == 16)
            return half_bits_to_float(static_cast<uint16_t>(code[2 * j] | (code[2 * j + 1] << 8)));
        return scalars[0] * p.centroids[read_bits(code, j, p.bits)];
    }

    VQ_HD static void decode(const Params& p, const uint8_t* code, const float* scalars, float* v) {
        for (int j = 0; j < p.d; ++j) v[j] = coord(p, code, scalars, j);
        if (p.bits != 16) rotate_inverse_in_place(p.rotation, v);
    }

    /// out = R^T acc (a copy for fp16); acc and out distinct.
    VQ_HD static void finalize(const Params& p, const float* acc, float* out) {
        if (p.bits == 16) {
            for (int j = 0; j < p.d; ++j) out[j] = acc[j];
            return;
        }
        rotate_inverse(p.rotation, acc, out);
    }
};

}  // namespace veloxquant::dev
