// vecinfer (VecInfer, arXiv 2510.06175) keys as a device codec. Mirrors VecInferCodec
// (methods/vecinfer.h): x = R (k / lambda), the index of subspace s is the nearest codeword of
// C[s] to x_s; q . k_hat = sum_s (R (q * lambda))_s . C[s][i_s] (paper Eq. 7: the smoothing
// cancels in the dot product).
//
// Per-query state, chosen per Params at build time (lut_state):
//  - S * C * d <= kMaxAffineFloats (small codebooks): the CPU's table LUT[s][c] =
//    (R (q * lambda))_s . C[s][c], which the backend computes in parallel as c + M q, and a
//    token's score is S table reads;
//  - otherwise (e.g. 2 bits/coordinate at d = 128: 32 x 256 x 128): the transformed query
//    q~ = R (q * lambda) [d], and a token's score reads its S codewords from the codebook in
//    global memory (sum_s q~_s . C[s][i_s]); every thread reads q~ at the same coordinate, a
//    broadcast. (The table itself, built by one thread per query row, cost more than that.)
#pragma once

#include "device_codecs/device_common.h"

namespace veloxquant {
class KeyCodec;
}

namespace veloxquant::dev {

struct VecInferDevice {
    struct Params {
        int d = 0;
        int subspaces = 0;
        int codewords = 0;
        int sub_dim = 0;
        int code_bits = 0;
        int lut_state = 0;          ///< 1: state = LUT [S][C]; 0: state = R (q * lambda) [d]
        float largest_word = 0.0f;  ///< the largest |codeword entry|
        RotationParams rotation;
        const float* codebook = nullptr;    ///< [S][C][sub_dim]
        const float* half_norm2 = nullptr;  ///< [S][C]: ||C[s][c]||^2 / 2
        const float* smooth = nullptr;      ///< [d]: lambda
        const float* inv_smooth = nullptr;  ///< [d]: 1 / lambda (as the CPU codec rounds it)
        void rebase(const uint8_t* base) {
            rotation.rebase(base);
            dev::rebase(codebook, base);
            dev::rebase(half_norm2, base);
            dev::rebase(smooth, base);
            dev::rebase(inv_smooth, base);
        }
    };

    /// Host: from a VecInferCodec (throws std::invalid_argument for another codec or a head
    /// dim above kMaxDim).
    static Params build(const KeyCodec& cpu, ParamArena& arena);

    VQ_HD static int code_bytes(const Params& p) { return packed_size(p.subspaces, p.code_bits); }
    VQ_HD static int num_scalars(const Params&) { return 0; }
    VQ_HD static int state_floats(const Params& p) {
        return p.lut_state ? p.subspaces * p.codewords : p.d;
    }

    /// Index of the codeword of subspace s nearest to x [sub_dim], as nearest_codeword
    /// (methods/vecinfer.cpp): it maximises v_c = x . c - ||c||^2 / 2, summed in the same float
    /// order (-||c||^2 / 2 + x_0 c_0 + x_1 c_1 + ...). The CPU keeps the first maximum of eight
    /// interleaved lanes and then the lowest index among equal lane maxima, which for finite
    /// v_c is the first maximum of one sequential scan.
    VQ_HD static int nearest(const Params& p, int s, const float* x) {
        float best_v = -INFINITY;
        int best = 0;
        scan_nearest(p, s, x, 0, p.codewords, &best_v, &best);
        return best;
    }

    /// nearest's scan over codewords [begin, end) of subspace s, from its state (best_v, best).
    /// The team encoder scans runs of codewords with it and folds them.
    VQ_HD static void scan_nearest(const Params& p, int s, const float* x, int begin, int end,
                                   float* best_v, int* best) {
        const int C = p.codewords, sub = p.sub_dim;
        const float* half = p.half_norm2 + s * C;
        const float* words = p.codebook + static_cast<std::size_t>(s) * C * sub;
        for (int c = begin; c < end; ++c) {
            const float* w = words + c * sub;
            float v = -half[c];
            for (int j = 0; j < sub; ++j) v += x[j] * w[j];
            if (v > *best_v) *best_v = v, *best = c;
        }
    }

    VQ_HD static void encode(const Params& p, const float* key, int /*pos*/, uint8_t* code,
                             float* /*scalars*/, int /*stride*/) {
        float x[kMaxDim];
        rotate_forward(p.rotation, key, x, p.inv_smooth);
        zero_bytes(code, code_bytes(p));
        for (int s = 0; s < p.subspaces; ++s)
            or_bits(code, s, p.code_bits, static_cast<uint32_t>(nearest(p, s, x + s * p.sub_dim)));
    }

    VQ_HD static void decode(const Params& p, const uint8_t* code, const float* /*scalars*/,
                             int /*stride*/, int /*pos*/, float* key) {
        const int sub = p.sub_dim;
        for (int s = 0; s < p.subspaces; ++s) {
            const float* w = codeword(p, s, read_bits(code, s, p.code_bits));
            for (int j = 0; j < sub; ++j) key[s * sub + j] = w[j];
        }
        rotate_inverse_in_place(p.rotation, key);
        for (int j = 0; j < p.d; ++j) key[j] *= p.smooth[j];
    }

    VQ_HD static void prepare(const Params& p, const float* query, float* state) {
        // q~ = R (q * lambda), then (LUT form) its dot with every codeword in the CPU's order.
        float scratch[kMaxDim];
        float* q = p.lut_state ? scratch : state;
        rotate_forward(p.rotation, query, q, p.smooth);
        if (!p.lut_state) return;
        const int C = p.codewords, sub = p.sub_dim;
        for (int s = 0; s < p.subspaces; ++s) {
            const float* qs = q + s * sub;
            for (int c = 0; c < C; ++c) {
                const float* w = codeword(p, s, c);
                float dot = 0.0f;
                for (int j = 0; j < sub; ++j) dot += qs[j] * w[j];
                state[s * C + c] = dot;
            }
        }
    }

    template <int R>
    VQ_HD static void score(const Params& p, const float* state, const uint8_t* code,
                            const float* /*scalars*/, int /*stride*/, int /*pos*/,
                            float (&out)[R]) {
        float acc[R] = {};
        FieldReader indices(code, code + code_bytes(p));
        if (p.lut_state) {
            for (int s = 0; s < p.subspaces; ++s) {
                float x[R];
                load_rows<R>(state + (s * p.codewords + indices.next(p.code_bits)) * R, x);
                for (int r = 0; r < R; ++r) acc[r] += x[r];
            }
        } else {
            const int sub = p.sub_dim;
            for (int s = 0; s < p.subspaces; ++s) {
                const float* w = codeword(p, s, indices.next(p.code_bits));
                for (int j = 0; j < sub; ++j) fma_rows<R>(acc, w[j], state + (s * sub + j) * R);
            }
        }
        for (int r = 0; r < R; ++r) out[r] = acc[r];
    }

    // The feature form (device_common.h), for the codeword state (lut_state 0): the token's
    // codewords back to back, factor 1.
    static constexpr int kFeatureGroup = 8;
    VQ_HD static int feature_offset(const Params&) { return 0; }
    VQ_HD static int feature_count(const Params& p) { return p.subspaces * p.sub_dim; }
    /// (The features are the codewords: the device's fp16 tile must hold them.)
    VQ_HD static bool features_usable(const Params& p) {
        return !p.lut_state && p.largest_word < kFeatureHalfLimit;
    }
    VQ_HD static float feature_factor(const float*) { return 1.0f; }
    VQ_HD static int extra_entry(const Params&, const uint8_t*) { return -1; }
    VQ_HD static void features(const Params& p, const uint8_t* code, int /*pos*/, int g, float* f) {
        for (int k = 0, i = 8 * g; k < 8 && i < p.subspaces * p.sub_dim; ++k, ++i) {
            const int s = i / p.sub_dim;
            f[k] = codeword(p, s, read_bits(code, s, p.code_bits))[i - s * p.sub_dim];
        }
    }

private:
    VQ_HD static const float* codeword(const Params& p, int s, uint32_t c) {
        return p.codebook + (static_cast<std::size_t>(s) * p.codewords + c) * p.sub_dim;
    }
};

}  // namespace veloxquant::dev
