// The value codec (methods/value_codec.h) as a device codec: fp16, or R v / ||v|| quantized
// with the rotated-coordinate Lloyd-Max codebook and one least-squares scale per token.
// Attention accumulates sum_t p_t * (value t in the rotated domain), coordinate by coordinate
// (coord), and maps the sum back once (finalize).
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
    /// The centroids coord looks up (none for fp16).
    VQ_HD static int table_floats(const Params& p) { return p.bits == 16 ? 0 : 1 << p.bits; }
    VQ_HD static const float*& table(Params& p) { return p.centroids; }

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

    /// Coordinates j0 .. j0 + E - 1 of the token in the attention domain, as coord but with one
    /// pass over the packed fields (the kernels' value sum: a lane owns E consecutive ones).
    template <int E>
    VQ_HD static void coords(const Params& p, const uint8_t* code, const float* scalars, int j0,
                             float (&v)[E]) {
        if (p.bits == 16) {
#if defined(__CUDA_ARCH__)
            const uint8_t* halves = code + 2 * j0;
            if (E % 2 == 0 && (reinterpret_cast<std::uintptr_t>(halves) & 3) == 0) {  // staged rows
                for (int e = 0; e < E; e += 2) {
                    const uint32_t w = reinterpret_cast<const uint32_t*>(halves)[e / 2];
                    v[e] = half_bits_to_float(static_cast<uint16_t>(w & 0xffffu));
                    v[e + 1] = half_bits_to_float(static_cast<uint16_t>(w >> 16));
                }
                return;
            }
#endif
            for (int e = 0; e < E; ++e) v[e] = coord(p, code, scalars, j0 + e);
            return;
        }
        const float scale = scalars[0];
        const int bit = j0 * p.bits;
        if ((bit & 7) == 0 && E * p.bits <= 32) {  // whole bytes: one word, cut at fixed shifts
            const uint8_t* bytes = code + (bit >> 3);
            uint32_t w = 0;
            for (int i = 0; i < (E * p.bits + 7) / 8; ++i)
                w |= static_cast<uint32_t>(bytes[i]) << (8 * i);
            const uint32_t mask = (1u << p.bits) - 1u;
            for (int e = 0; e < E; ++e) v[e] = scale * p.centroids[(w >> (e * p.bits)) & mask];
            return;
        }
        FieldReader fields(code, bit);
        for (int e = 0; e < E; ++e) v[e] = scale * p.centroids[fields.next(p.bits)];
    }
    VQ_HD static void decode(const Params& p, const uint8_t* code, const float* scalars, float* v) {
        for (int j = 0; j < p.d; ++j) v[j] = coord(p, code, scalars, j);
        if (p.bits != 16) rotate_inverse(p.rotation, v, v);
    }

    /// out = R^T acc (a copy for fp16); acc and out may alias.
    VQ_HD static void finalize(const Params& p, const float* acc, float* out) {
        if (p.bits == 16) {
            for (int j = 0; j < p.d; ++j) out[j] = acc[j];
            return;
        }
        rotate_inverse(p.rotation, acc, out);
    }
};

}  // namespace veloxquant::dev
