#include "methods/polar_scores.h"

#include "core/cpu_isa.h"
#include "methods/lane_fields.h"
#include "methods/polarquant.h"

namespace veloxquant {
namespace {

constexpr int kLevels = PolarQuantCodec::kLevels, kBlock = PolarQuantCodec::kBlock;

using ScoreArgs = ScoreRowsArgs<PolarQuantCodec>;  // scalars: the tokens' norms

// Tokens t0..n-1 one at a time, each token's indices unpacked and radii read once for all rows:
// per block, <y_block, q'_block> bottom-up, the transpose of decode's expansion: each pair
// (p_{2i}, p_{2i+1}) collapses to cos(psi_i) p_{2i} + sin(psi_i) p_{2i+1}; the level-1
// collapses come from the query's tables. Out of line, so that the SIMD builds' last tokens
// round as the generic build does.
__attribute__((noinline)) void score_tokens(const ScoreArgs& a, int t0) {
    const PolarQuantCodec& c = a.codec;
    const int d = c.dim(), blocks = d / kBlock, levels1 = 1 << c.level_bits(1);
    const std::size_t cb = c.code_bytes();
    uint8_t idx[PolarQuantCodec::kMaxDim];  // the 15d/16 angle indices of one token
    float radius[PolarQuantCodec::kMaxDim / kBlock];
    for (int t = t0; t < a.n; ++t) {
        const uint8_t* code = a.codes + t * cb;
        c.unpack_indices(code, idx);
        for (int j = 0; j < blocks; ++j) radius[j] = c.relative_radius(code, j);
        for (int r = 0; r < a.rows; ++r) {
            const float* table = a.states + r * a.state_stride + d;
            float acc = 0.0f;
            for (int j = 0; j < blocks; ++j) {
                float p[kBlock / 2];
                for (int i = 0; i < kBlock / 2; ++i) {
                    const int pair = j * (kBlock / 2) + i;
                    p[i] = table[pair * levels1 + idx[pair]];
                }
                for (int level = 2, width = kBlock / 4; level <= kLevels; ++level, width /= 2) {
                    const uint8_t* ai = &idx[PolarQuantCodec::level_offset(d, level) + j * width];
                    const float* cs = c.centroid_cos(level).data();
                    const float* sn = c.centroid_sin(level).data();
                    for (int i = 0; i < width; ++i)
                        p[i] = cs[ai[i]] * p[2 * i] + sn[ai[i]] * p[2 * i + 1];
                }
                acc += radius[j] * p[0];
            }
            a.scores[r * a.score_stride + t] = a.scalars[t] * acc;
        }
    }
}

using ScoreFn = void (*)(const ScoreArgs&);

void score_generic(const ScoreArgs& a) {
    score_tokens(a, 0);
}

#ifdef VQ_X86_KERNELS
// Blocks of 16 tokens, one per lane, at `Bits` bits (level 1 at Bits + 2). Per block of 16
// coordinates, y_block = radius * (w_i cos theta_i, w_i sin theta_i)_{i<8}, w_i the product of
// the cos or sin of the level-2..4 angles on pair i's path (decode's expansion), so
// <y_block, q'_block> = sum_i w_i T[pair i][a_i] with the query's level-1 tables T: the
// weights and indices serve every row, and a row costs 8 lookups and 8 multiply-adds per block.
// Each row's running sum lives in its scores, multiplied by the norms at the end. Tokens past
// the last whole block go through score_tokens.
template <int Bits>
VQ_TARGET_AVX512 void score_bits_avx512(const ScoreArgs& a) {
    constexpr int kL1 = 1 << (Bits + 2), kL = 1 << Bits, kPadded = kL < 16 ? 16 : kL;
    constexpr int kMaxWords = (PolarQuantCodec::kMaxDim / 2 * (Bits + 2) +
                               PolarQuantCodec::kMaxDim * 7 / 16 * Bits + 31) /
                              32;
    const PolarQuantCodec& c = a.codec;
    const int d = c.dim(), blocks = d / kBlock;
    const std::size_t cb = c.code_bytes(), radii = c.radii_offset(), upper = 8 * c.level1_bytes();
    // The level-2..4 centroids' cos and sin, padded to whole registers.
    alignas(64) float cos_t[kLevels - 1][kPadded] = {}, sin_t[kLevels - 1][kPadded] = {};
    for (int level = 2; level <= kLevels; ++level)
        for (int i = 0; i < kL; ++i) {
            cos_t[level - 2][i] = c.centroid_cos(level)[i];
            sin_t[level - 2][i] = c.centroid_sin(level)[i];
        }
    const __m512i lanes = lane_offsets(cb);
    __m512i word[kMaxWords];
    int t = 0;
    for (; t + 16 <= a.n; t += 16) {
        const uint8_t* base = a.codes + t * cb;
        gather_lane_words(base, lanes, radii, cb, word);  // the index bytes
        for (int j = 0; j < blocks; ++j) {
            // Radius j, the high half of the 32-bit word that ends with it (fp16, as stored).
            const __m512i half =
                _mm512_srli_epi32(_mm512_i32gather_epi32(lanes, base + radii + 2 * j - 2, 1), 16);
            __m512 w[kBlock / 2];
            w[0] = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(half));
            // Levels 4, 3, 2: weight i splits into (w_i cos psi, w_i sin psi), from the back
            // so that unread weights stay in place.
            for (int level = kLevels, width = 1; level >= 2; --level, width *= 2) {
                const std::size_t first =
                    upper + static_cast<std::size_t>(PolarQuantCodec::level_offset(d, level) -
                                                     d / 2 + j * width) *
                                Bits;
                for (int i = width - 1; i >= 0; --i) {
                    const __m512i idx = lane_field(word, first + i * Bits, Bits);
                    w[2 * i + 1] = _mm512_mul_ps(w[i], lane_lookup<kPadded>(sin_t[level - 2], idx));
                    w[2 * i] = _mm512_mul_ps(w[i], lane_lookup<kPadded>(cos_t[level - 2], idx));
                }
            }
            __m512i idx1[kBlock / 2];
            for (int i = 0; i < kBlock / 2; ++i)
                idx1[i] =
                    lane_field(word, static_cast<std::size_t>(8 * j + i) * (Bits + 2), Bits + 2);
            for (int r = 0; r < a.rows; ++r) {
                const float* table =
                    a.states + r * a.state_stride + d + static_cast<std::size_t>(8 * j) * kL1;
                __m512 s0 = _mm512_mul_ps(w[0], lane_lookup<kL1>(table, idx1[0]));
                __m512 s1 = _mm512_mul_ps(w[1], lane_lookup<kL1>(table + kL1, idx1[1]));
                for (int i = 2; i < kBlock / 2; i += 2) {
                    s0 = _mm512_fmadd_ps(w[i], lane_lookup<kL1>(table + i * kL1, idx1[i]), s0);
                    s1 = _mm512_fmadd_ps(w[i + 1],
                                         lane_lookup<kL1>(table + (i + 1) * kL1, idx1[i + 1]), s1);
                }
                float* out = a.scores + r * a.score_stride + t;
                const __m512 sum = _mm512_add_ps(s0, s1);
                _mm512_storeu_ps(out, j == 0 ? sum : _mm512_add_ps(_mm512_loadu_ps(out), sum));
            }
        }
        const __m512 norms = _mm512_loadu_ps(a.scalars + t);
        for (int r = 0; r < a.rows; ++r) {
            float* out = a.scores + r * a.score_stride + t;
            _mm512_storeu_ps(out, _mm512_mul_ps(norms, _mm512_loadu_ps(out)));
        }
    }
    score_tokens(a, t);
}

VQ_TARGET_AVX512 void score_avx512(const ScoreArgs& a) {
    switch (a.codec.bits()) {
        case 1:
            return score_bits_avx512<1>(a);
        case 2:
            return score_bits_avx512<2>(a);
        case 3:
            return score_bits_avx512<3>(a);
        case 4:
            return score_bits_avx512<4>(a);
        case 5:
            return score_bits_avx512<5>(a);
        default:
            return score_bits_avx512<6>(a);
    }
}

// The AVX2 builds (8 tokens a register, the lane fields of lane_fields.h) convert the radii with
// F16C (vcvtph2ps on 8 halves): VQ_TARGET_AVX2_F16C.
// score_bits_avx512 with 8 tokens per block (the same weights, lookups and sums).
template <int Bits>
VQ_TARGET_AVX2_F16C void score_bits_avx2(const ScoreArgs& a) {
    constexpr int kL1 = 1 << (Bits + 2), kL = 1 << Bits, kPadded = kL < 8 ? 8 : kL;
    constexpr int kMaxWords = (PolarQuantCodec::kMaxDim / 2 * (Bits + 2) +
                               PolarQuantCodec::kMaxDim * 7 / 16 * Bits + 31) /
                              32;
    const PolarQuantCodec& c = a.codec;
    const int d = c.dim(), blocks = d / kBlock;
    const std::size_t cb = c.code_bytes(), radii = c.radii_offset(), upper = 8 * c.level1_bytes();
    alignas(32) float cos_t[kLevels - 1][kPadded] = {}, sin_t[kLevels - 1][kPadded] = {};
    for (int level = 2; level <= kLevels; ++level)
        for (int i = 0; i < kL; ++i) {
            cos_t[level - 2][i] = c.centroid_cos(level)[i];
            sin_t[level - 2][i] = c.centroid_sin(level)[i];
        }
    const __m256i lanes = lane_offsets_avx2(cb);
    __m256i word[kMaxWords];
    int t = 0;
    for (; t + 8 <= a.n; t += 8) {
        const uint8_t* base = a.codes + t * cb;
        gather_lane_words_avx2(base, lanes, radii, cb, word);
        for (int j = 0; j < blocks; ++j) {
            // Radius j: the high halves of the words that end with it, packed to 8 halves.
            const __m256i half =
                _mm256_srli_epi32(gather_lane_avx2(base + radii + 2 * j - 2, lanes), 16);
            __m256 w[kBlock / 2];
            w[0] = _mm256_cvtph_ps(
                _mm_packus_epi32(_mm256_castsi256_si128(half), _mm256_extracti128_si256(half, 1)));
            for (int level = kLevels, width = 1; level >= 2; --level, width *= 2) {
                const std::size_t first =
                    upper + static_cast<std::size_t>(PolarQuantCodec::level_offset(d, level) -
                                                     d / 2 + j * width) *
                                Bits;
                for (int i = width - 1; i >= 0; --i) {
                    const __m256i idx = lane_field_avx2(word, first + i * Bits, Bits);
                    w[2 * i + 1] =
                        _mm256_mul_ps(w[i], lane_lookup_avx2<kPadded>(sin_t[level - 2], idx));
                    w[2 * i] =
                        _mm256_mul_ps(w[i], lane_lookup_avx2<kPadded>(cos_t[level - 2], idx));
                }
            }
            __m256i idx1[kBlock / 2];
            for (int i = 0; i < kBlock / 2; ++i)
                idx1[i] = lane_field_avx2(word, static_cast<std::size_t>(8 * j + i) * (Bits + 2),
                                          Bits + 2);
            for (int r = 0; r < a.rows; ++r) {
                const float* table =
                    a.states + r * a.state_stride + d + static_cast<std::size_t>(8 * j) * kL1;
                __m256 s0 = _mm256_mul_ps(w[0], lane_lookup_avx2<kL1>(table, idx1[0]));
                __m256 s1 = _mm256_mul_ps(w[1], lane_lookup_avx2<kL1>(table + kL1, idx1[1]));
                for (int i = 2; i < kBlock / 2; i += 2) {
                    s0 = _mm256_fmadd_ps(w[i], lane_lookup_avx2<kL1>(table + i * kL1, idx1[i]), s0);
                    s1 = _mm256_fmadd_ps(
                        w[i + 1], lane_lookup_avx2<kL1>(table + (i + 1) * kL1, idx1[i + 1]), s1);
                }
                float* out = a.scores + r * a.score_stride + t;
                const __m256 sum = _mm256_add_ps(s0, s1);
                _mm256_storeu_ps(out, j == 0 ? sum : _mm256_add_ps(_mm256_loadu_ps(out), sum));
            }
        }
        const __m256 norms = _mm256_loadu_ps(a.scalars + t);
        for (int r = 0; r < a.rows; ++r) {
            float* out = a.scores + r * a.score_stride + t;
            _mm256_storeu_ps(out, _mm256_mul_ps(norms, _mm256_loadu_ps(out)));
        }
    }
    score_tokens(a, t);
}

VQ_TARGET_AVX2_F16C void score_avx2(const ScoreArgs& a) {
    switch (a.codec.bits()) {
        case 1:
            return score_bits_avx2<1>(a);
        case 2:
            return score_bits_avx2<2>(a);
        case 3:
            return score_bits_avx2<3>(a);
        case 4:
            return score_bits_avx2<4>(a);
        case 5:
            return score_bits_avx2<5>(a);
        default:
            return score_bits_avx2<6>(a);
    }
}
#endif

ScoreFn score_kernel() {
    return VQ_KERNEL_FOR_ISA_F16C(score_generic, score_avx2, score_avx512);
}

}  // namespace

void polar_scores(const PolarQuantCodec& codec, const float* states, std::size_t state_stride,
                  int rows, const uint8_t* codes, const float* norms, int n, float* scores,
                  std::size_t score_stride) {
    score_kernel()({codec, states, state_stride, rows, codes, norms, n, scores, score_stride});
}

}  // namespace veloxquant
