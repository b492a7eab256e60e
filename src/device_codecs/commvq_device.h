// commvq keys as a device codec. Mirrors CommVQCodec (methods/commvq.h; Li et al., arXiv
// 2506.18879): additive VQ per group of RoPE pairs with complex-scalar codewords, so the key of
// position p is coded before RoPE (pair i turned by -p w_i) and the query turns instead at score
// time: <q, RoPE_p(z)> = sum_i Re(conj(q_i exp(-j p w_i)) z_i). No per-token scalars.
//
// Phases. As CommVQCodec::phases: cos, sin of p w_i are exp(j p_b w_i) (double, exact angle)
// times a table exp(j t w_i), t = p - p_b < 64, rounded to float, where p_b is p rounded down to
// a multiple of 64; they depend only on the position, so codes equal the CPU's for any run. On
// the GPU, CUDA's double cos/sin may differ from glibc's in the last ulp, so a near-tie of the
// code search may (rarely) go the other way.
#pragma once

#include "device_codecs/device_common.h"

namespace veloxquant {
class KeyCodec;
}

namespace veloxquant::dev {

struct CommVQDevice {
    /// Positions per phase block (CommVQCodec's table size; equals kTokensPerPage).
    static constexpr int kPhaseBlock = 64;
    /// ICM sweeps after the greedy search, as the CPU codec's encoder (commvq.cpp).
    static constexpr int kEncodeSweeps = 1;
    /// Most additive stages (CommVQCodec's limit); sizes the per-thread index scratch.
    static constexpr int kMaxStages = 64;

    struct Params {
        int d = 0;
        int stages = 0;
        int groups = 0;
        int codewords = 0;
        int group_dim = 0;
        int index_bits = 0;
        int pairs = 0;                     ///< rotated RoPE pairs (0: positions ignored)
        float largest_word = 0.0f;         ///< the largest |codeword entry|
        const float* words = nullptr;      ///< [stages][groups][codewords][group_dim]
        const float* norms2 = nullptr;     ///< [stages][groups][codewords]
        const float* bounds = nullptr;     ///< [stages][groups][1 + group_dim]: search_bounds()
        const double* inv_freq = nullptr;  ///< [pairs]
        const float* steps = nullptr;      ///< [kPhaseBlock][pairs][2]: cos, sin of t w_i
        void rebase(const uint8_t* base) {
            dev::rebase(words, base);
            dev::rebase(norms2, base);
            dev::rebase(bounds, base);
            dev::rebase(inv_freq, base);
            dev::rebase(steps, base);
        }
    };

    /// Host: from a CommVQCodec (throws std::invalid_argument for another codec or
    /// head_dim > kMaxDim).
    static Params build(const KeyCodec& cpu, ParamArena& arena);

    VQ_HD static int code_bytes(const Params& p) {
        return packed_size(p.stages * p.groups, p.index_bits);
    }
    VQ_HD static int num_scalars(const Params&) { return 0; }
    /// The query. The codebooks (S * d * C floats, 128K at d = 128, 4 bits) stay in the arena.
    VQ_HD static int state_floats(const Params& p) { return p.d; }

    /// cos, sin of pos * w_i as CommVQCodec::phases makes them: two double-precision cos/sin
    /// per call.
    VQ_HD static void phase(const Params& p, int pos, int i, float* c, float* s) {
        const int t = pos % kPhaseBlock;
        const double pb = static_cast<double>(pos - t);
        const double bc = cos(pb * p.inv_freq[i]), bs = sin(pb * p.inv_freq[i]);
        const float* st = p.steps + (t * p.pairs + i) * 2;
        const double sc = st[0], ss = st[1];
        *c = static_cast<float>(bc * sc - bs * ss);
        *s = static_cast<float>(bc * ss + bs * sc);
    }

    /// Index of the codeword nearest to x (commvq_nearest: ||w||^2 - 2 <x, w> accumulated over
    /// the coordinates in order, the first index of the minimum; NaNs are skipped, and a group
    /// of nothing but NaNs takes the last index).
    VQ_HD static int nearest(const float* x, const float* words, const float* norms2, int n,
                             int dim) {
        float m = INFINITY;
        int best = -1;
        scan_nearest(x, words, norms2, 0, n, dim, &m, &best);
        return best < 0 ? n - 1 : best;
    }

    /// nearest's scan over codewords [begin, end), from its state (m, best): best < 0 while no
    /// codeword was taken. The team encoder scans runs of codewords with it and folds them.
    VQ_HD static void scan_nearest(const float* x, const float* words, const float* norms2,
                                   int begin, int end, int dim, float* m, int* best) {
        for (int c = begin; c < end; ++c) {
            const float* w = words + c * dim;
            float v = norms2[c];
            for (int j = 0; j < dim; ++j) v += -2.0f * x[j] * w[j];
            if (v < *m) {
                *m = v;
                *best = c;
            } else if (*best < 0 && v == *m) {
                *best = c;
            }
        }
    }

    /// Group by group: un-rotate the key's pairs by -pos w_i, then the greedy residual search
    /// and one ICM sweep (Babenko & Lempitsky, CVPR 2014) of CommVQCodec::quantize.
    VQ_HD static void encode(const Params& p, const float* key, int pos, uint8_t* code,
                             float* /*scalars*/, int /*stride*/) {
        const int gd = p.group_dim, C = p.codewords;
        zero_bytes(code, code_bytes(p));
        float r[kMaxDim];
        uint8_t idx[kMaxStages];  // codewords <= 256
        for (int g = 0; g < p.groups; ++g) {
            const float* k = key + g * gd;
            for (int j = 0; j < gd; ++j) r[j] = k[j];
            for (int j = 0; j < gd; j += 2) {
                const int i = (g * gd + j) / 2;
                if (i >= p.pairs) break;
                float c, s;
                phase(p, pos, i, &c, &s);
                r[j] = k[j] * c + k[j + 1] * s;
                r[j + 1] = k[j + 1] * c - k[j] * s;
            }
            const auto words = [&](int st) { return p.words + (st * p.groups + g) * C * gd; };
            const auto norms = [&](int st) { return p.norms2 + (st * p.groups + g) * C; };
            for (int st = 0; st < p.stages; ++st) {
                idx[st] = static_cast<uint8_t>(nearest(r, words(st), norms(st), C, gd));
                const float* w = words(st) + idx[st] * gd;
                for (int j = 0; j < gd; ++j) r[j] -= w[j];
            }
            for (int sweep = 0; sweep < kEncodeSweeps && p.stages > 1; ++sweep)
                for (int st = 0; st < p.stages; ++st) {
                    const float* old = words(st) + idx[st] * gd;
                    for (int j = 0; j < gd; ++j) r[j] += old[j];
                    idx[st] = static_cast<uint8_t>(nearest(r, words(st), norms(st), C, gd));
                    const float* w = words(st) + idx[st] * gd;
                    for (int j = 0; j < gd; ++j) r[j] -= w[j];
                }
            for (int st = 0; st < p.stages; ++st)
                or_bits(code, st * p.groups + g, p.index_bits, static_cast<uint32_t>(idx[st]));
        }
    }

    VQ_HD static void decode(const Params& p, const uint8_t* code, const float* /*scalars*/,
                             int /*stride*/, int pos, float* key) {
        const int gd = p.group_dim;
        for (int j = 0; j < p.d; ++j) key[j] = 0.0f;
        for (int st = 0; st < p.stages; ++st)
            for (int g = 0; g < p.groups; ++g) {
                const float* w = codeword(p, code, st, g);
                for (int j = 0; j < gd; ++j) key[g * gd + j] += w[j];
            }
        for (int i = 0; i < p.pairs; ++i) {
            float c, s;
            phase(p, pos, i, &c, &s);
            const float z0 = key[2 * i], z1 = key[2 * i + 1];
            key[2 * i] = z0 * c - z1 * s;
            key[2 * i + 1] = z0 * s + z1 * c;
        }
    }

    VQ_HD static void prepare(const Params& p, const float* query, float* state) {
        for (int j = 0; j < p.d; ++j) state[j] = query[j];
    }

    // The feature form (device_common.h): the key, RoPE_pos(z) (decode's), factor 1.
    static constexpr int kFeatureGroup = 8;
    VQ_HD static int feature_offset(const Params&) { return 0; }
    VQ_HD static int feature_count(const Params& p) { return p.d; }
    /// (A turned pair's entries are at most sqrt(2) times the largest sum of S codeword
    /// entries: the device's fp16 tile must hold them.)
    VQ_HD static bool features_usable(const Params& p) {
        return p.d % 8 == 0 && p.group_dim % 2 == 0 &&
               1.4143f * static_cast<float>(p.stages) * p.largest_word < kFeatureHalfLimit;
    }
    VQ_HD static float feature_factor(const float*) { return 1.0f; }
    VQ_HD static int extra_entry(const Params&, const uint8_t*) { return -1; }
    VQ_HD static void features(const Params& p, const uint8_t* code, int pos, int g, float* f) {
        const int gd = p.group_dim;
        for (int k = 0; k < 8; ++k) {
            const int i = 8 * g + k, grp = i / gd, j = i - grp * gd;
            float z = 0.0f;
            for (int st = 0; st < p.stages; ++st) {
                const int m = st * p.groups + grp;
                z += p.words[(m * p.codewords + read_bits(code, m, p.index_bits)) * gd + j];
            }
            f[k] = z;
        }
        for (int k = 0; k < 8; k += 2) {
            const int i = (8 * g + k) / 2;  // the pair
            if (i >= p.pairs) break;
            float c, s;
            phase(p, pos, i, &c, &s);
            const float z0 = f[k], z1 = f[k + 1];
            f[k] = z0 * c - z1 * s;
            f[k + 1] = z0 * s + z1 * c;
        }
    }

    /// Per group: the codeword sum z_g (S * group_dim adds, codewords read from the arena),
    /// turned by pos w_i pair by pair (the key's RoPE) and dotted with every row's query. The
    /// turn costs each token a double-precision cos and sin per rotated pair (phase()), since
    /// every thread has its own position; the CPU's score_at shares the block's part of that work
    /// (sharing it across a warp's chunk was no faster on the H200: the gathers dominate).
    /// Groups of 8 coordinates (calibration's default, 4 pairs) are summed in registers from
    /// float4 loads (arena arrays and 8-float codewords are 16-byte aligned); other widths take
    /// the loop over a per-thread scratch. Both add the same terms in the same order.
    template <int R>
    VQ_HD static void score(const Params& p, const float* state, const uint8_t* code,
                            const float* /*scalars*/, int /*stride*/, int pos, float (&out)[R]) {
        float acc[R] = {};
        if (p.group_dim == 8) {
            for (int g = 0; g < p.groups; ++g) {
                float z[8];
                sum_codewords<8>(p, code, g, z);
                add_group_score<R>(p, state, z, g * 8, 8, pos, acc);
            }
        } else {
            const int gd = p.group_dim;
            float z[kMaxDim];
            for (int g = 0; g < p.groups; ++g) {
                for (int j = 0; j < gd; ++j) z[j] = 0.0f;
                for (int st = 0; st < p.stages; ++st) {
                    const float* w = codeword(p, code, st, g);
                    for (int j = 0; j < gd; ++j) z[j] += w[j];
                }
                add_group_score<R>(p, state, z, g * gd, gd, pos, acc);
            }
        }
        for (int r = 0; r < R; ++r) out[r] = acc[r];
    }

private:
    /// Stage st's codeword of group g in the code.
    VQ_HD static const float* codeword(const Params& p, const uint8_t* code, int st, int g) {
        const int m = st * p.groups + g;
        return p.words + (m * p.codewords + read_bits(code, m, p.index_bits)) * p.group_dim;
    }

    /// z = the sum of group g's codewords over the stages, in stage order (GD = group_dim).
    template <int GD>
    VQ_HD static void sum_codewords(const Params& p, const uint8_t* code, int g, float (&z)[GD]) {
        for (int j = 0; j < GD; ++j) z[j] = 0.0f;
        for (int st = 0; st < p.stages; ++st) {
            float w[GD];
            load_rows<GD>(codeword(p, code, st, g), w);
            for (int j = 0; j < GD; ++j) z[j] += w[j];
        }
    }

    /// acc[r] += <row r's query, the group's key>: z (the group's n = group_dim coordinates
    /// from j0) turned pair by pair by pos w_i where pair i is rotated.
    template <int R>
    VQ_HD static void add_group_score(const Params& p, const float* state, const float* z, int j0,
                                      int n, int pos, float (&acc)[R]) {
        for (int j = 0; j < n; j += 2) {
            const int i = (j0 + j) / 2;
            float k0 = z[j], k1 = z[j + 1];  // the key's pair (z0 c - z1 s, z0 s + z1 c)
            if (i < p.pairs) {
                float c, s;
                phase(p, pos, i, &c, &s);
                k0 = z[j] * c - z[j + 1] * s;
                k1 = z[j] * s + z[j + 1] * c;
            }
            fma_rows<R>(acc, k0, state + (j0 + j) * R);
            fma_rows<R>(acc, k1, state + (j0 + j + 1) * R);
        }
    }
};

}  // namespace veloxquant::dev
