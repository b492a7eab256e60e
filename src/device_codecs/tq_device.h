// turboquant_rvq (and ratequant, its per-head-width form) as a device codec: the reference
// example of the concept in device_common.h. Mirrors TurboQuantRVQCodec (methods/turboquant_rvq.h):
// n = ||k||, u = R k / n, stage s quantizes the residual with codebook C_s; score
// n * sum_j (R q)_j sum_s C_s[i_sj].
#pragma once

#include "device_codecs/device_common.h"

namespace veloxquant {
class KeyCodec;
}

namespace veloxquant::dev {

/// A B-bit codebook's centroid of index i. For B <= 2 the centroids are held in registers and
/// picked by selects, so a lane score reads shared memory only for the query state: the generic
/// kernel's lane-scored loop is bound by its shared-memory loads (bench/cuda/decode_tuning.md,
/// session p). Wider codebooks are read from the table.
template <int B>
struct CentroidPick {
    const float* table;
    VQ_HD explicit CentroidPick(const float* t) : table(t) {}
    VQ_HD float operator()(uint32_t i) const { return table[i]; }
};
template <>
struct CentroidPick<1> {
    float c0, c1;
    VQ_HD explicit CentroidPick(const float* t) : c0(t[0]), c1(t[1]) {}
    VQ_HD float operator()(uint32_t i) const { return i != 0 ? c1 : c0; }
};
template <>
struct CentroidPick<2> {
    float c0, c1, c2, c3;
    VQ_HD explicit CentroidPick(const float* t) : c0(t[0]), c1(t[1]), c2(t[2]), c3(t[3]) {}
    VQ_HD float operator()(uint32_t i) const {
        const float low = (i & 1) != 0 ? c1 : c0, high = (i & 1) != 0 ? c3 : c2;
        return (i & 2) != 0 ? high : low;
    }
};

struct TqDevice {
    struct Params {
        int d = 0;
        int bits = 0;
        int stages = 0;
        int stage_bytes = 0;
        RotationParams rotation;
        const float* centroids = nullptr;   ///< [stages][2^bits]
        const float* boundaries = nullptr;  ///< [stages][2^bits - 1]
        void rebase(const uint8_t* base) {
            rotation.rebase(base);
            dev::rebase(centroids, base);
            dev::rebase(boundaries, base);
        }
    };

    /// Host: from a TurboQuantRVQCodec (throws std::invalid_argument for another codec).
    static Params build(const KeyCodec& cpu, ParamArena& arena);

    VQ_HD static int code_bytes(const Params& p) { return p.stages * p.stage_bytes; }
    VQ_HD static int num_scalars(const Params&) { return 1; }
    /// The rotated query (the codebooks are read from Params).
    VQ_HD static int state_floats(const Params& p) { return p.d; }
    /// Every stage's centroids, looked up for every index score reads.
    VQ_HD static int table_floats(const Params& p) { return p.stages << p.bits; }
    VQ_HD static const float*& table(Params& p) { return p.centroids; }
    VQ_HD static void encode(const Params& p, const float* key, int /*pos*/, uint8_t* code,
                             float* scalars, int /*stride*/) {
        const int d = p.d, levels = 1 << p.bits;
        double sq = 0.0;
        for (int j = 0; j < d; ++j) sq += static_cast<double>(key[j]) * key[j];
        const float norm = static_cast<float>(sqrt(sq));
        scalars[0] = norm;
        float u[kMaxDim];
        rotate_forward(p.rotation, key, u);
        for (int j = 0; j < d; ++j) u[j] = norm > 0.0f ? u[j] / norm : 0.0f;
        zero_bytes(code, code_bytes(p));
        for (int s = 0; s < p.stages; ++s) {
            const float* c = p.centroids + s * levels;
            const float* b = p.boundaries + s * (levels - 1);
            uint8_t* stage = code + s * p.stage_bytes;
            for (int j = 0; j < d; ++j) {
                const int idx = quantize_sorted(b, levels - 1, u[j]);
                u[j] -= c[idx];
                or_bits(stage, j, p.bits, static_cast<uint32_t>(idx));
            }
        }
    }

    VQ_HD static void decode(const Params& p, const uint8_t* code, const float* scalars,
                             int /*stride*/, int /*pos*/, float* key) {
        const int d = p.d, levels = 1 << p.bits;
        for (int j = 0; j < d; ++j) key[j] = 0.0f;
        for (int s = 0; s < p.stages; ++s)
            for (int j = 0; j < d; ++j)
                key[j] += p.centroids[s * levels + read_bits(code + s * p.stage_bytes, j, p.bits)];
        rotate_inverse_in_place(p.rotation, key);
        for (int j = 0; j < d; ++j) key[j] *= scalars[0];
    }

    VQ_HD static void prepare(const Params& p, const float* query, float* state) {
        rotate_forward(p.rotation, query, state);
    }
    template <int R>
    VQ_HD static void score(const Params& p, const float* state, const uint8_t* code,
                            const float* scalars, int /*stride*/, int /*pos*/, float (&out)[R]) {
        if (p.d % 8 == 0) {  // the common widths, cut at constant shifts
            switch (p.bits) {
                case 1:
                    return score_fixed<1, R>(p, state, code, scalars, out);
                case 2:
                    return score_fixed<2, R>(p, state, code, scalars, out);
                case 3:
                    return score_fixed<3, R>(p, state, code, scalars, out);
                case 4:
                    return score_fixed<4, R>(p, state, code, scalars, out);
                default:
                    break;
            }
        }
        const int levels = 1 << p.bits;
        float acc[R] = {};
        for (int s = 0; s < p.stages; ++s) {
            const float* c = p.centroids + s * levels;
            FieldReader indices(code + s * p.stage_bytes, code + code_bytes(p));
            for (int j = 0; j < p.d; ++j) fma_rows<R>(acc, c[indices.next(p.bits)], state + j * R);
        }
        for (int r = 0; r < R; ++r) out[r] = scalars[0] * acc[r];
    }

    // The feature form (device_common.h): f_j = sum_s C_s[i_sj], factor ||k||.
    static constexpr int kFeatureGroup = 8;
    VQ_HD static int feature_offset(const Params&) { return 0; }
    VQ_HD static int feature_count(const Params& p) { return p.d; }
    VQ_HD static bool features_usable(const Params& p) { return p.d % 8 == 0; }
    VQ_HD static float feature_factor(const float* scalars) { return scalars[0]; }
    VQ_HD static int extra_entry(const Params&, const uint8_t*) { return -1; }
    VQ_HD static void features(const Params& p, const uint8_t* code, int /*pos*/, int g, float* f) {
        switch (p.bits) {
            case 1:
                return features_fixed<1>(p, code, g, f);
            case 2:
                return features_fixed<2>(p, code, g, f);
            case 3:
                return features_fixed<3>(p, code, g, f);
            case 4:
                return features_fixed<4>(p, code, g, f);
            default:
                break;
        }
        for (int k = 0; k < 8; ++k) f[k] = 0.0f;
        for (int s = 0; s < p.stages; ++s) {
            const float* c = p.centroids + (s << p.bits);
            FieldReader indices(code + s * p.stage_bytes, code + code_bytes(p), 8 * g * p.bits);
            for (int k = 0; k < 8; ++k) f[k] += c[indices.next(p.bits)];
        }
    }

private:
    template <int B>
    VQ_HD static void features_fixed(const Params& p, const uint8_t* code, int g, float* f) {
        for (int k = 0; k < 8; ++k) f[k] = 0.0f;
        for (int s = 0; s < p.stages; ++s) {
            const float* c = p.centroids + (s << B);
            uint32_t idx[8];
            read_group8<B>(code + s * p.stage_bytes, g, idx);
            for (int k = 0; k < 8; ++k) f[k] += c[idx[k]];
        }
    }

    /// score for B-bit indices (d a multiple of 8), eight indices per group read.
    template <int B, int R>
    VQ_HD static void score_fixed(const Params& p, const float* state, const uint8_t* code,
                                  const float* scalars, float (&out)[R]) {
        float acc[R] = {};
        for (int s = 0; s < p.stages; ++s) {
            const CentroidPick<B> centroid(p.centroids + s * (1 << B));
            const uint8_t* stage = code + s * p.stage_bytes;
#if defined(__CUDA_ARCH__)
#pragma unroll 2
#endif
            for (int g = 0; g < p.d / 8; ++g) {
                uint32_t idx[8];
                read_group8<B>(stage, g, idx);
                for (int k = 0; k < 8; ++k)
                    fma_rows<R>(acc, centroid(idx[k]), state + (8 * g + k) * R);
            }
        }
        for (int r = 0; r < R; ++r) out[r] = scalars[0] * acc[r];
    }
};

}  // namespace veloxquant::dev
