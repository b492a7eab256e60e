#include "methods/commvq_scores.h"

#include <algorithm>
#include <cmath>

#include "core/cpu_isa.h"
#include "core/x86_intrinsics.h"
#include "methods/commvq.h"

namespace veloxquant {
namespace {

constexpr int kPhaseBlock = CommVQCodec::kPhaseBlock, kMaxDim = CommVQCodec::kMaxDim;
// Rows per pass over the codes: their block-turned queries, and the SIMD accumulators.
constexpr int kRowChunk = 4;

struct ScoreArgs {
    const CommVQCodec& codec;
    const float* queries;
    std::size_t query_stride;
    int rows;
    const uint8_t* codes;
    int n, pos0;
    float* scores;
    std::size_t score_stride;
};

// Tokens [t0, t1) of one block, rows r0 .. r0 + rows - 1, whose queries turned by -p_b are
// qb [rows][d]; token t's step row is offset + t - t0.
using TokenFn = void (*)(const ScoreArgs& a, const float* qb, int r0, int rows, int t0, int t1,
                         int offset);

void tokens_generic(const ScoreArgs& a, const float* qb, int r0, int rows, int t0, int t1,
                    int offset) {
    const CommVQCodec& c = a.codec;
    const int d = c.dim(), pairs = static_cast<int>(c.rope_inv_freq().size());
    float z[kMaxDim];
    for (int t = t0; t < t1; ++t) {
        c.reconstruct(a.codes + t * c.code_bytes(), z);
        // z_i exp(j t w_i), as decode_at turns a key.
        const float* st = &c.phase_steps()[static_cast<std::size_t>(offset + t - t0) * pairs * 2];
        for (int i = 0; i < pairs; ++i) {
            const float cs = st[2 * i], sn = st[2 * i + 1], z0 = z[2 * i], z1 = z[2 * i + 1];
            z[2 * i] = z0 * cs - z1 * sn;
            z[2 * i + 1] = z0 * sn + z1 * cs;
        }
        for (int r = 0; r < rows; ++r) {
            const float* q = qb + r * d;
            float acc = 0.0f;
            for (int j = 0; j < d; ++j) acc += q[j] * z[j];
            a.scores[(r0 + r) * a.score_stride + t] = acc;
        }
    }
}

#ifdef VQ_X86_KERNELS
// 16 coordinates at a time, two groups of 8: the codeword sum in one register, turned by
// t w_i (lanes past the RoPE pairs keep their value), then one FMA per row. Bytes: 256
// codewords, one index per code byte, read in line.
template <int R, bool Bytes>
VQ_TARGET_AVX512 void tokens_rows_avx512(const ScoreArgs& a, const float* qb, int r0, int t0,
                                         int t1, int offset) {
    const CommVQCodec& c = a.codec;
    const int d = c.dim(), S = c.stages(), G = c.groups();
    const int pairs = static_cast<int>(c.rope_inv_freq().size());
    const std::size_t group_floats = static_cast<std::size_t>(c.codewords()) * 8;
    const float* words = c.codebook().data();
    const __m512 ones = _mm512_set1_ps(1.0f);
    for (int t = t0; t < t1; ++t) {
        const uint8_t* code = a.codes + t * c.code_bytes();
        const float* st = &c.phase_steps()[static_cast<std::size_t>(offset + t - t0) * pairs * 2];
        __m512 acc[R];
        for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
        for (int k = 0; k < d / 16; ++k) {
            __m512 z = _mm512_setzero_ps();
            for (int s = 0; s < S; ++s) {
                const float* w = words + (static_cast<std::size_t>(s) * G + 2 * k) * group_floats;
                const int m = s * G + 2 * k;
                const int i0 = Bytes ? code[m] : c.index(code, m);
                const int i1 = Bytes ? code[m + 1] : c.index(code, m + 1);
                const __m256 lo = _mm256_loadu_ps(w + i0 * 8);
                const __m256 hi = _mm256_loadu_ps(w + group_floats + i1 * 8);
                z = _mm512_add_ps(
                    z, _mm512_castpd_ps(_mm512_insertf64x4(
                           _mm512_castpd256_pd512(_mm256_castps_pd(lo)), _mm256_castps_pd(hi), 1)));
            }
            const int turned = std::min(16, 2 * pairs - 16 * k);
            if (turned > 0) {
                // (z0, z1) -> (z0 cos - z1 sin, z1 cos + z0 sin): fmaddsub subtracts in even lanes.
                const __mmask16 m = static_cast<__mmask16>((1u << turned) - 1u);
                const __m512 cs = _mm512_maskz_loadu_ps(m, st + 16 * k);
                const __m512 cos2 = _mm512_mask_blend_ps(m, ones, _mm512_moveldup_ps(cs));
                const __m512 sin2 = _mm512_movehdup_ps(cs);
                z = _mm512_fmaddsub_ps(z, cos2, _mm512_mul_ps(_mm512_permute_ps(z, 0xB1), sin2));
            }
            for (int r = 0; r < R; ++r)
                acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(qb + r * d + 16 * k), z, acc[r]);
        }
        for (int r = 0; r < R; ++r)
            a.scores[(r0 + r) * a.score_stride + t] = _mm512_reduce_add_ps(acc[r]);
    }
}

template <bool Bytes>
VQ_TARGET_AVX512 void tokens_bytes_avx512(const ScoreArgs& a, const float* qb, int r0, int rows,
                                          int t0, int t1, int offset) {
    switch (rows) {
        case 1:
            return tokens_rows_avx512<1, Bytes>(a, qb, r0, t0, t1, offset);
        case 2:
            return tokens_rows_avx512<2, Bytes>(a, qb, r0, t0, t1, offset);
        case 3:
            return tokens_rows_avx512<3, Bytes>(a, qb, r0, t0, t1, offset);
        default:
            return tokens_rows_avx512<kRowChunk, Bytes>(a, qb, r0, t0, t1, offset);
    }
}

VQ_TARGET_AVX512 void tokens_avx512(const ScoreArgs& a, const float* qb, int r0, int rows, int t0,
                                    int t1, int offset) {
    if (a.codec.group_dim() != 8 || a.codec.dim() % 16 != 0)
        return tokens_generic(a, qb, r0, rows, t0, t1, offset);
    if (a.codec.index_bits() == 8)
        return tokens_bytes_avx512<true>(a, qb, r0, rows, t0, t1, offset);
    tokens_bytes_avx512<false>(a, qb, r0, rows, t0, t1, offset);
}
#endif

#ifdef VQ_X86_KERNELS
VQ_TARGET_AVX2 VQ_ALWAYS_INLINE float hsum_avx2(__m256 v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}

// tokens_rows_avx512 with 8 coordinates (one group) at a time.
template <int R, bool Bytes>
VQ_TARGET_AVX2 void tokens_rows_avx2(const ScoreArgs& a, const float* qb, int r0, int t0, int t1,
                                     int offset) {
    const CommVQCodec& c = a.codec;
    const int d = c.dim(), S = c.stages(), G = c.groups();
    const int pairs = static_cast<int>(c.rope_inv_freq().size());
    const std::size_t group_floats = static_cast<std::size_t>(c.codewords()) * 8;
    const float* words = c.codebook().data();
    const __m256 ones = _mm256_set1_ps(1.0f);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int t = t0; t < t1; ++t) {
        const uint8_t* code = a.codes + t * c.code_bytes();
        const float* st = &c.phase_steps()[static_cast<std::size_t>(offset + t - t0) * pairs * 2];
        __m256 acc[R];
        for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
        for (int k = 0; k < G; ++k) {
            __m256 z = _mm256_setzero_ps();
            for (int s = 0; s < S; ++s) {
                const int m = s * G + k;
                const int i = Bytes ? code[m] : c.index(code, m);
                z = _mm256_add_ps(z, _mm256_loadu_ps(words + m * group_floats + i * 8));
            }
            const int turned = std::min(8, 2 * pairs - 8 * k);
            if (turned > 0) {
                // As in tokens_rows_avx512; lanes >= turned load 0 (sin) and take cos = 1.
                const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(turned), lane);
                const __m256 cs = _mm256_maskload_ps(st + 8 * k, m);
                const __m256 cos2 =
                    _mm256_blendv_ps(ones, _mm256_moveldup_ps(cs), _mm256_castsi256_ps(m));
                const __m256 sin2 = _mm256_movehdup_ps(cs);
                z = _mm256_fmaddsub_ps(z, cos2, _mm256_mul_ps(_mm256_permute_ps(z, 0xB1), sin2));
            }
            for (int r = 0; r < R; ++r)
                acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(qb + r * d + 8 * k), z, acc[r]);
        }
        for (int r = 0; r < R; ++r) a.scores[(r0 + r) * a.score_stride + t] = hsum_avx2(acc[r]);
    }
}

template <bool Bytes>
VQ_TARGET_AVX2 void tokens_bytes_avx2(const ScoreArgs& a, const float* qb, int r0, int rows, int t0,
                                      int t1, int offset) {
    switch (rows) {
        case 1:
            return tokens_rows_avx2<1, Bytes>(a, qb, r0, t0, t1, offset);
        case 2:
            return tokens_rows_avx2<2, Bytes>(a, qb, r0, t0, t1, offset);
        case 3:
            return tokens_rows_avx2<3, Bytes>(a, qb, r0, t0, t1, offset);
        default:
            return tokens_rows_avx2<kRowChunk, Bytes>(a, qb, r0, t0, t1, offset);
    }
}

VQ_TARGET_AVX2 void tokens_avx2(const ScoreArgs& a, const float* qb, int r0, int rows, int t0,
                                int t1, int offset) {
    if (a.codec.group_dim() != 8) return tokens_generic(a, qb, r0, rows, t0, t1, offset);
    if (a.codec.index_bits() == 8) return tokens_bytes_avx2<true>(a, qb, r0, rows, t0, t1, offset);
    tokens_bytes_avx2<false>(a, qb, r0, rows, t0, t1, offset);
}
#endif

// Per block of positions, every chunk of rows turned by -p_b w_i (as the angle in double, the
// cos / sin computed once for all rows), then the block's tokens.
void score_blocks(const ScoreArgs& a, TokenFn tokens) {
    const CommVQCodec& c = a.codec;
    const std::vector<double>& w = c.rope_inv_freq();
    const int d = c.dim(), pairs = static_cast<int>(w.size());
    double base[kMaxDim];  // cos, sin of p_b w_i
    float qb[kRowChunk * kMaxDim];
    for (int t0 = 0; t0 < a.n;) {
        const int p = a.pos0 + t0, offset = p % kPhaseBlock;
        const int t1 = std::min(a.n, t0 + kPhaseBlock - offset);
        const double pb = static_cast<double>(p - offset);
        for (int i = 0; i < pairs; ++i) {
            base[2 * i] = std::cos(pb * w[i]);
            base[2 * i + 1] = std::sin(pb * w[i]);
        }
        for (int r0 = 0; r0 < a.rows; r0 += kRowChunk) {
            const int rows = std::min(kRowChunk, a.rows - r0);
            for (int r = 0; r < rows; ++r) {
                const float* q = a.queries + (r0 + r) * a.query_stride;
                float* o = qb + r * d;
                for (int i = 0; i < pairs; ++i) {
                    const double cs = base[2 * i], sn = base[2 * i + 1];
                    o[2 * i] = static_cast<float>(q[2 * i] * cs + q[2 * i + 1] * sn);
                    o[2 * i + 1] = static_cast<float>(q[2 * i + 1] * cs - q[2 * i] * sn);
                }
                std::copy(q + 2 * pairs, q + d, o + 2 * pairs);
            }
            tokens(a, qb, r0, rows, t0, t1, offset);
        }
        t0 = t1;
    }
}

}  // namespace

void commvq_rope_scores(const CommVQCodec& codec, const float* queries, std::size_t query_stride,
                        int rows, const uint8_t* codes, int n, int pos0, float* scores,
                        std::size_t score_stride) {
    score_blocks({codec, queries, query_stride, rows, codes, n, pos0, scores, score_stride},
                 VQ_KERNEL_FOR_ISA(tokens_generic, tokens_avx2, tokens_avx512));
}

}  // namespace veloxquant
