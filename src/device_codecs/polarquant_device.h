// polarquant as a device codec. Mirrors PolarQuantCodec (methods/polarquant.h, Han et al.,
// arXiv 2502.02617): y = R k, then a 4-level recursive polar transform of each 16-coordinate
// block of y; the 15 angles of a block are quantized with fixed per-level codebooks and its
// final radius is stored relative to ||k|| in fp16.
//
// The state is the rotated query R q. score expands each block of the code once (decode's
// top-down expansion through the cos / sin tables of the levels' centroids, unit norm) and
// takes every query row's inner product with it.
#pragma once

#include "device_codecs/device_common.h"

namespace veloxquant {
class KeyCodec;
}

namespace veloxquant::dev {

struct PolarQuantDevice {
    static constexpr int kLevels = 4;
    static constexpr int kBlock = 1 << kLevels;  ///< coordinates per final radius
    static constexpr double kTwoPi = 6.283185307179586476925;

    struct Params {
        int d = 0;
        int bits = 0;          ///< bits of the level 2..4 indices (level 1 has bits + 2)
        int level1_bytes = 0;  ///< packed level-1 indices
        int upper_bytes = 0;   ///< packed level 2..4 indices
        RotationParams rotation;
        /// Level l's cos table starts at tables + table_offset[l - 1], its sin table right after.
        int table_offset[kLevels] = {};
        /// Level l's 2^level_bits - 1 ascending boundaries start at boundary_offset[l - 1].
        int boundary_offset[kLevels] = {};
        int table_floats = 0;  ///< floats of tables
        const float* tables = nullptr;
        const float* boundaries = nullptr;
        void rebase(const uint8_t* base) {
            rotation.rebase(base);
            dev::rebase(tables, base);
            dev::rebase(boundaries, base);
        }
    };

    /// Host: from a PolarQuantCodec (throws std::invalid_argument for another codec or
    /// d > kMaxDim).
    static Params build(const KeyCodec& cpu, ParamArena& arena);

    VQ_HD static int code_bytes(const Params& p) {
        return p.level1_bytes + p.upper_bytes + 2 * (p.d / kBlock);
    }
    VQ_HD static int num_scalars(const Params&) { return 1; }
    /// R q, then the cos / sin tables (laid out as Params::tables).
    VQ_HD static int state_floats(const Params& p) { return p.d; }
    /// The cos / sin tables of every level, two lookups per angle.
    VQ_HD static int table_floats(const Params& p) { return p.table_floats; }
    VQ_HD static const float*& table(Params& p) { return p.tables; }

    VQ_HD static int level_bits(const Params& p, int level) {
        return level == 1 ? p.bits + 2 : p.bits;
    }
    VQ_HD static int levels(const Params& p, int level) { return 1 << level_bits(p, level); }

    // Device atan2 / hypot may round differently from glibc's: codes may then differ from the
    // CPU's for angles at exact cell boundaries (and radii at fp16 rounding ties).
    VQ_HD static void encode(const Params& p, const float* key, int /*pos*/, uint8_t* code,
                             float* scalars, int /*stride*/) {
        const int d = p.d;
        double norm2 = 0.0;
        for (int j = 0; j < d; ++j) norm2 += static_cast<double>(key[j]) * key[j];
        const double norm = sqrt(norm2);
        scalars[0] = static_cast<float>(norm);
        float y[kMaxDim];
        rotate_forward(p.rotation, key, y);
        zero_bytes(code, code_bytes(p));

        // Block by block (each block's transform is its own; the fields are ORed in, so the code
        // is the CPU's whatever the order), with the radii of one block on the stack, not d / 2.
        const float* b1 = p.boundaries + p.boundary_offset[0];
        uint8_t* upper = code + p.level1_bytes;
        uint8_t* radii = upper + p.upper_bytes;
        const double inv = norm > 0.0 ? 1.0 / norm : 0.0;
        for (int blk = 0; blk < d / kBlock; ++blk) {
            // Level 1: full-circle angles of coordinate pairs, in [0, 2pi).
            double r[kBlock / 2];
            for (int i = 0; i < kBlock / 2; ++i) {
                const int j = blk * (kBlock / 2) + i;
                const double a = y[2 * j], b = y[2 * j + 1];
                double theta = atan2(b, a);
                if (theta < 0.0) theta += kTwoPi;
                const int idx = quantize_sorted(b1, levels(p, 1) - 1, static_cast<float>(theta));
                or_bits(code, j, level_bits(p, 1), static_cast<uint32_t>(idx));
                r[i] = hypot(a, b);
            }
            // Levels 2..4: angles of pairs of non-negative radii, in [0, pi/2]; r shrinks in
            // place. Level l's d / 2^l angles follow the lower levels' in the upper stream.
            for (int level = 2, first = 0, len = d / 4; level <= kLevels;
                 first += len, ++level, len /= 2) {
                const float* bl = p.boundaries + p.boundary_offset[level - 1];
                const int count = kBlock >> level;
                for (int i = 0; i < count; ++i) {
                    const float angle = static_cast<float>(atan2(r[2 * i + 1], r[2 * i]));
                    const int idx = quantize_sorted(bl, levels(p, level) - 1, angle);
                    or_bits(upper, first + blk * count + i, p.bits, static_cast<uint32_t>(idx));
                    r[i] = hypot(r[2 * i], r[2 * i + 1]);
                }
            }
            // The final radius relative to ||k||, in [0, 1], as fp16.
            const uint16_t h = float_to_half_bits(static_cast<float>(r[0] * inv));
            radii[2 * blk] = static_cast<uint8_t>(h & 0xffu);
            radii[2 * blk + 1] = static_cast<uint8_t>(h >> 8);
        }
    }

    VQ_HD static void decode(const Params& p, const uint8_t* code, const float* scalars,
                             int /*stride*/, int /*pos*/, float* key) {
        float y[kMaxDim];
        for (int j = 0; j < p.d / kBlock; ++j)
            expand_block(p, code, j, scalars[0] * relative_radius(p, code, j), y + j * kBlock);
        rotate_inverse(p.rotation, y, key);
    }

    VQ_HD static void prepare(const Params& p, const float* query, float* state) {
        rotate_forward(p.rotation, query, state);
    }

    /// <R q, y> block by block: each block's y (unit ||k||) is expanded once for every row.
    template <int R>
    VQ_HD static void score(const Params& p, const float* state, const uint8_t* code,
                            const float* scalars, int /*stride*/, int /*pos*/, float (&out)[R]) {
        float acc[R] = {};
        for (int j = 0; j < p.d / kBlock; ++j) {
            float y[kBlock];
            expand_block(p, code, j, relative_radius(p, code, j), y);
            for (int i = 0; i < kBlock; ++i) fma_rows<R>(acc, y[i], state + (j * kBlock + i) * R);
        }
        for (int r = 0; r < R; ++r) out[r] = scalars[0] * acc[r];
    }

    // The feature form (device_common.h): block j's y (unit ||k||, expand_block), factor ||k||.
    static constexpr int kFeatureGroup = kBlock;
    VQ_HD static int feature_offset(const Params&) { return 0; }
    VQ_HD static int feature_count(const Params& p) { return p.d; }
    VQ_HD static bool features_usable(const Params&) { return true; }
    VQ_HD static float feature_factor(const float* scalars) { return scalars[0]; }
    VQ_HD static int extra_entry(const Params&, const uint8_t*) { return -1; }
    VQ_HD static void features(const Params& p, const uint8_t* code, int /*pos*/, int j, float* f) {
        expand_block(p, code, j, relative_radius(p, code, j), f);
    }

private:
    /// Angles of one block (2^kLevels - 1): level l's 2^(kLevels - l) start at 2^(kLevels - l) - 1.
    static constexpr int kBlockAngles = kBlock - 1;

    /// The angle indices of block j, each level's at its width - 1 (expand_block's order). With
    /// 2-bit upper levels (level 1: 4 bits) a block's level-1 indices are one 32-bit word and
    /// its level 2, 3 and 4 indices a byte, a nibble and a 2-bit field: four loads instead of
    /// fifteen read_bits (bench/cuda/decode_tuning.md, session q).
    VQ_HD static void block_indices(const Params& p, const uint8_t* code, int j,
                                    uint32_t (&idx)[kBlockAngles]) {
        if (p.bits == 2) {
            const uint32_t l1 = load_bytes_le<4>(code + 4 * j);
            const uint8_t* upper = code + p.level1_bytes;
            const int d = p.d;
            const uint32_t l2 = upper[j];
            const uint32_t l3 = upper[(d / 2 + 4 * j) >> 3] >> ((4 * j) & 7);
            const int at4 = 3 * d / 4 + 2 * j;
            idx[0] = (upper[at4 >> 3] >> (at4 & 7)) & 3u;
            for (int k = 0; k < 2; ++k) idx[1 + k] = (l3 >> (2 * k)) & 3u;
            for (int k = 0; k < 4; ++k) idx[3 + k] = (l2 >> (2 * k)) & 3u;
            for (int k = 0; k < 8; ++k) idx[7 + k] = (l1 >> (4 * k)) & 15u;
            return;
        }
        for (int level = kLevels, width = 1; level >= 1; --level, width *= 2)
            for (int i = 0; i < width; ++i)
                idx[width - 1 + i] = angle_index(p, code, level, j * width + i);
    }

    /// Inverse polar transform of block j, top-down from its radius: each radius splits into
    /// (r cos psi, r sin psi); expanding in place from the back keeps unread entries.
    VQ_HD static void expand_block(const Params& p, const uint8_t* code, int j, float radius,
                                   float* r) {
        uint32_t idx[kBlockAngles];
        block_indices(p, code, j, idx);
        r[0] = radius;
        for (int level = kLevels, width = 1; level >= 1; --level, width *= 2) {
            const float* c = p.tables + p.table_offset[level - 1];
            const float* s = c + levels(p, level);
            for (int i = width - 1; i >= 0; --i) {
                const uint32_t a = idx[width - 1 + i];
                const float v = r[i];
                r[2 * i] = v * c[a];
                r[2 * i + 1] = v * s[a];
            }
        }
    }

    /// Index i of level l's angles: level 1 has its own stream; levels 2, 3, 4 follow each
    /// other in the second one (level l starts at d/2 - d/2^(l-1) there).
    VQ_HD static uint32_t angle_index(const Params& p, const uint8_t* code, int level, int i) {
        if (level == 1) return read_bits(code, i, p.bits + 2);
        return read_bits(code + p.level1_bytes, p.d / 2 - (p.d >> (level - 1)) + i, p.bits);
    }

    /// Final radius j of the code, relative to ||k||.
    VQ_HD static float relative_radius(const Params& p, const uint8_t* code, int j) {
        const uint8_t* radii = code + p.level1_bytes + p.upper_bytes;
        return half_bits_to_float(static_cast<uint16_t>(radii[2 * j] | (radii[2 * j + 1] << 8)));
    }
};

}  // namespace veloxquant::dev
