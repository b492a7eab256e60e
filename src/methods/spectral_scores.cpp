#include "methods/spectral_scores.h"

#include <algorithm>

#include "core/cpu_isa.h"
#include "core/lloyd_max.h"
#include "methods/lane_fields.h"
#include "methods/spectral.h"

namespace veloxquant {
namespace {

using Group = SpectralCodec::Group;

// The reference state, summed in double: <q, mu>, then per group w_k = (U q)_{r_k} sigma_{r_k}
// for its slots k and entry v = sum_k w_k C_{b_k}[field k of v] (fields from the low bits up;
// bits past the group's width are never read, so a narrow table repeats every 2^bits entries).
void query_state_generic(const SpectralCodec& c, const float* query, float* state) {
    const int d = c.dim();
    const SpectralBasis& basis = c.basis();
    double qmu = 0.0;
    for (int j = 0; j < d; ++j) qmu += static_cast<double>(query[j]) * basis.mean[j];
    state[0] = static_cast<float>(qmu);
    for (const Group& g : c.groups()) {
        double w[4];  // a group holds one slot of 5..8 bits or at most 4 slots of 4 bits in all
        for (std::size_t i = 0; i < g.count; ++i) {
            const SpectralCodec::Slot& s = c.slots()[g.first + i];
            const float* u = &basis.basis[static_cast<std::size_t>(s.coord) * d];
            double acc = 0.0;
            for (int j = 0; j < d; ++j) acc += static_cast<double>(u[j]) * query[j];
            w[i] = acc * c.whitening_scales()[s.coord];
        }
        float* table = state + g.table_offset;
        for (unsigned v = 0; v < g.entries(); ++v) {
            double acc = 0.0;
            unsigned rest = v;
            for (std::size_t i = 0; i < g.count; ++i) {
                const int b = c.slots()[g.first + i].bits;
                acc += w[i] * c.codebook(b).centroids[rest & ((1u << b) - 1u)];
                rest >>= b;
            }
            table[v] = static_cast<float>(acc);
        }
    }
}

constexpr int kScoreBlock = 8;

// acc[u] = the table sum of token u of the block (M tokens, or m when M is 0).
template <int M>
VQ_ALWAYS_INLINE void score_block(const SpectralCodec& c, const float* state, const uint8_t* block,
                                  int m, float* acc) {
    const std::size_t cb = c.code_bytes();
    const int count = M > 0 ? M : m;
    for (int u = 0; u < count; ++u) acc[u] = 0.0f;
    for (const Group& g : c.groups()) {
        const float* table = state + g.table_offset;
        const uint8_t* field = block + (g.bit_offset >> 3);
        const unsigned shift = static_cast<unsigned>(g.bit_offset & 7u);
        const unsigned mask = (1u << g.bits) - 1u;
        // The second byte only when the field straddles one (never past the token's code).
        const std::size_t next = shift + static_cast<unsigned>(g.bits) > 8 ? 1 : 0;
        for (int u = 0; u < count; ++u) {
            const uint8_t* p = field + static_cast<std::size_t>(u) * cb;
            const unsigned word = p[0] | (static_cast<unsigned>(p[next]) << 8);
            acc[u] += table[(word >> shift) & mask];
        }
    }
}

// One row. Blocks of kScoreBlock tokens, group by group inside a block: the block's sums are
// independent and (for a full block, of compile-time size) stay in registers, and each group's
// byte, shift, mask and table are read once per block. Measured (perf samples, one core, d 64,
// 8K tokens, 3 heads): 21% less time than the token-outer loop, which reloaded every group's
// descriptor per token and chained its adds.
void score_row(const SpectralCodec& c, const float* state, const uint8_t* codes,
               const float* scalars, int n, float* scores) {
    const float qmu = state[0];
    float acc[kScoreBlock];
    for (int t0 = 0; t0 < n; t0 += kScoreBlock) {
        const int m = std::min(kScoreBlock, n - t0);
        const uint8_t* block = codes + static_cast<std::size_t>(t0) * c.code_bytes();
        if (m == kScoreBlock)
            score_block<kScoreBlock>(c, state, block, m, acc);
        else
            score_block<0>(c, state, block, m, acc);
        for (int u = 0; u < m; ++u) scores[t0 + u] = qmu + scalars[t0 + u] * acc[u];
    }
}

using RowsArgs = ScoreRowsArgs<SpectralCodec>;

// Tokens t0..n-1, row by row. Out of line, so that the SIMD builds' last tokens round as the
// generic build does (inlined into them, qmu + s * acc could become an FMA).
__attribute__((noinline)) void score_rows_from(const RowsArgs& a, int t0) {
    for (int r = 0; r < a.rows; ++r)
        score_row(a.codec, a.states + r * a.state_stride, a.codes + t0 * a.codec.code_bytes(),
                  a.scalars + t0, a.n - t0, a.scores + r * a.score_stride + t0);
}

void scores_generic(const RowsArgs& a) {
    score_rows_from(a, 0);
}

#ifdef VQ_X86_KERNELS
// <a, b> over d floats, in float: two running sums of 16 lanes.
VQ_TARGET_AVX512 VQ_ALWAYS_INLINE float dot_avx512(const float* a, const float* b, int d) {
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    int j = 0;
    for (; j + 32 <= d; j += 32) {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + j), _mm512_loadu_ps(b + j), s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + j + 16), _mm512_loadu_ps(b + j + 16), s1);
    }
    for (; j < d; j += 16) {
        const __mmask16 m = d - j >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (d - j)) - 1u);
        s0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + j), _mm512_maskz_loadu_ps(m, b + j), s0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}

// query_state_generic in float: a narrow group's 16 entries are one vector, each slot's
// centroids spread over them by a vpermps of the entry numbers' field and added with an FMA.
VQ_TARGET_AVX512 void query_state_avx512(const SpectralCodec& c, const float* query, float* state) {
    const int d = c.dim();
    const SpectralBasis& basis = c.basis();
    state[0] = dot_avx512(query, basis.mean.data(), d);
    const __m512i entry = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (const Group& g : c.groups()) {
        float* table = state + g.table_offset;
        __m512 sum = _mm512_setzero_ps();
        int shift = 0;
        for (std::size_t i = 0; i < g.count; ++i) {
            const SpectralCodec::Slot& s = c.slots()[g.first + i];
            const float* u = &basis.basis[static_cast<std::size_t>(s.coord) * d];
            const __m512 w = _mm512_set1_ps(dot_avx512(u, query, d) *
                                            static_cast<float>(c.whitening_scales()[s.coord]));
            const float* centroids = c.codebook(s.bits).centroids.data();
            if (g.bits > 4) {  // one slot, 2^bits entries
                for (std::size_t v = 0; v < g.entries(); v += 16)
                    _mm512_storeu_ps(table + v, _mm512_mul_ps(w, _mm512_loadu_ps(centroids + v)));
                break;
            }
            const __m512i field =
                _mm512_and_si512(_mm512_srl_epi32(entry, _mm_cvtsi32_si128(shift)),
                                 _mm512_set1_epi32((1 << s.bits) - 1));
            const __m512 levels = _mm512_maskz_loadu_ps(
                static_cast<__mmask16>((1u << (1u << s.bits)) - 1u), centroids);
            sum = _mm512_fmadd_ps(w, _mm512_permutexvar_ps(field, levels), sum);
            shift += s.bits;
        }
        if (g.bits <= 4) _mm512_storeu_ps(table, sum);
    }
}

// 16 tokens (one per lane, their code words gathered) for Rows rows: per group, its field
// once for all the rows, then a lookup in each row's table (lane_lookup for the wide groups,
// which come first: permutes for 5 and 6 bits, a gather for 7 and 8; a vpermps of the 16-entry
// table in a register for the rest), added in group order as score_block.
template <int Rows>
VQ_TARGET_AVX512 VQ_ALWAYS_INLINE void score_lanes(const RowsArgs& a, std::size_t wide,
                                                   const __m512i* words, int r0, int t) {
    const float* states[Rows];
    __m512 acc[Rows];
    for (int r = 0; r < Rows; ++r) {
        states[r] = a.states + (r0 + r) * a.state_stride;
        acc[r] = _mm512_setzero_ps();
    }
    const std::vector<Group>& groups = a.codec.groups();
    for (std::size_t i = 0; i < wide; ++i) {
        const Group& g = groups[i];
        const __m512i idx = lane_field(words, g.bit_offset, g.bits);
        for (int r = 0; r < Rows; ++r) {
            const float* table = states[r] + g.table_offset;
            const __m512 entry = g.bits == 5   ? lane_lookup<32>(table, idx)
                                 : g.bits == 6 ? lane_lookup<64>(table, idx)
                                               : lane_lookup<256>(table, idx);
            acc[r] = _mm512_add_ps(acc[r], entry);
        }
    }
    for (std::size_t i = wide; i < groups.size(); ++i) {
        const Group& g = groups[i];
        const __m512i idx = lane_field_low(words, g.bit_offset, g.bits);
        for (int r = 0; r < Rows; ++r)
            acc[r] = _mm512_add_ps(
                acc[r], _mm512_permutexvar_ps(idx, _mm512_loadu_ps(states[r] + g.table_offset)));
    }
    // qmu + s * acc rounded twice as score_row does: the explicitly rounded product is not
    // contracted into an FMA.
    const __m512 scale = _mm512_loadu_ps(a.scalars + t);
    for (int r = 0; r < Rows; ++r)
        _mm512_storeu_ps(
            a.scores + (r0 + r) * a.score_stride + t,
            _mm512_add_ps(
                _mm512_set1_ps(states[r][0]),
                _mm512_mul_round_ps(scale, acc[r], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
}

// The groups wider than 4 bits (a table of their own, looked up by a gather): the first ones.
std::size_t wide_groups(const SpectralCodec& codec) {
    const std::vector<Group>& groups = codec.groups();
    return static_cast<std::size_t>(
        std::partition_point(groups.begin(), groups.end(),
                             [](const Group& g) { return g.bits > 4; }) -
        groups.begin());
}

// Blocks of 16 tokens, rows four at a time; the last n % 16 tokens (and codes under 4 bytes)
// through score_rows_from.
VQ_TARGET_AVX512 void scores_avx512(const RowsArgs& a) {
    const std::size_t cb = a.codec.code_bytes();
    const std::size_t wide = wide_groups(a.codec);
    int t = 0;
    if (cb >= 4) {
        const __m512i lanes = lane_offsets(cb);
        __m512i words[1024 * 8 / 32];  // d <= 1024 coordinates of <= 8 bits
        for (; t + 16 <= a.n; t += 16) {
            gather_lane_words(a.codes + t * cb, lanes, cb, cb, words);
            for (int r0 = 0; r0 < a.rows; r0 += 4) switch (std::min(4, a.rows - r0)) {
                    case 1:
                        score_lanes<1>(a, wide, words, r0, t);
                        break;
                    case 2:
                        score_lanes<2>(a, wide, words, r0, t);
                        break;
                    case 3:
                        score_lanes<3>(a, wide, words, r0, t);
                        break;
                    default:
                        score_lanes<4>(a, wide, words, r0, t);
                }
        }
    }
    score_rows_from(a, t);
}

// <a, b> over d floats, in float: two running sums of 8 lanes, the last d % 8 masked.
VQ_TARGET_AVX2 VQ_ALWAYS_INLINE float dot_avx2(const float* a, const float* b, int d) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int j = 0;
    for (; j + 16 <= d; j += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 8), _mm256_loadu_ps(b + j + 8), s1);
    }
    for (; j < d; j += 8) {
        const __m256i m =
            _mm256_cmpgt_epi32(_mm256_set1_epi32(d - j), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        s0 = _mm256_fmadd_ps(_mm256_maskload_ps(a + j, m), _mm256_maskload_ps(b + j, m), s0);
    }
    const __m256 s = _mm256_add_ps(s0, s1);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

// query_state_avx512 on 8 lanes: a narrow group's 16 entries are two vectors, each slot's
// centroids gathered by the entry numbers' field.
VQ_TARGET_AVX2 void query_state_avx2(const SpectralCodec& c, const float* query, float* state) {
    const int d = c.dim();
    const SpectralBasis& basis = c.basis();
    state[0] = dot_avx2(query, basis.mean.data(), d);
    const __m256i entry_lo = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i entry_hi = _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15);
    for (const Group& g : c.groups()) {
        float* table = state + g.table_offset;
        __m256 sum_lo = _mm256_setzero_ps(), sum_hi = _mm256_setzero_ps();
        int shift = 0;
        for (std::size_t i = 0; i < g.count; ++i) {
            const SpectralCodec::Slot& s = c.slots()[g.first + i];
            const float* u = &basis.basis[static_cast<std::size_t>(s.coord) * d];
            const __m256 w = _mm256_set1_ps(dot_avx2(u, query, d) *
                                            static_cast<float>(c.whitening_scales()[s.coord]));
            const float* centroids = c.codebook(s.bits).centroids.data();
            if (g.bits > 4) {  // one slot, 2^bits entries
                for (std::size_t v = 0; v < g.entries(); v += 8)
                    _mm256_storeu_ps(table + v, _mm256_mul_ps(w, _mm256_loadu_ps(centroids + v)));
                break;
            }
            const __m128i by = _mm_cvtsi32_si128(shift);
            const __m256i mask = _mm256_set1_epi32((1 << s.bits) - 1);
            const __m256i f_lo = _mm256_and_si256(_mm256_srl_epi32(entry_lo, by), mask);
            const __m256i f_hi = _mm256_and_si256(_mm256_srl_epi32(entry_hi, by), mask);
            sum_lo = _mm256_fmadd_ps(w, _mm256_i32gather_ps(centroids, f_lo, 4), sum_lo);
            sum_hi = _mm256_fmadd_ps(w, _mm256_i32gather_ps(centroids, f_hi, 4), sum_hi);
            shift += s.bits;
        }
        if (g.bits <= 4) {
            _mm256_storeu_ps(table, sum_lo);
            _mm256_storeu_ps(table + 8, sum_hi);
        }
    }
}

// The AVX2 build of scores_avx512: 8 tokens per ymm, the lane fields and lookups of
// methods/lane_fields.h on 8 lanes. A narrow group's 16-entry table is read with the bits above
// its field (lane_field_low_avx2): they do not matter, as the table repeats every 2^bits entries.
template <int Rows>
VQ_TARGET_AVX2 VQ_ALWAYS_INLINE void score_lanes_avx2(const RowsArgs& a, std::size_t wide,
                                                      const __m256i* words, int r0, int t) {
    const float* states[Rows];
    __m256 acc[Rows];
    for (int r = 0; r < Rows; ++r) {
        states[r] = a.states + (r0 + r) * a.state_stride;
        acc[r] = _mm256_setzero_ps();
    }
    const std::vector<Group>& groups = a.codec.groups();
    for (std::size_t i = 0; i < wide; ++i) {
        const Group& g = groups[i];
        const __m256i idx = lane_field_avx2(words, g.bit_offset, g.bits);
        for (int r = 0; r < Rows; ++r) {
            const float* table = states[r] + g.table_offset;
            const __m256 entry = g.bits == 5   ? lane_lookup_avx2<32>(table, idx)
                                 : g.bits == 6 ? lane_lookup_avx2<64>(table, idx)
                                               : lane_lookup_avx2<256>(table, idx);
            acc[r] = _mm256_add_ps(acc[r], entry);
        }
    }
    for (std::size_t i = wide; i < groups.size(); ++i) {
        const Group& g = groups[i];
        const __m256i idx = lane_field_low_avx2(words, g.bit_offset, g.bits);
        for (int r = 0; r < Rows; ++r)
            acc[r] = _mm256_add_ps(acc[r], lane_lookup_avx2<16>(states[r] + g.table_offset, idx));
    }
    // qmu + s * acc rounded twice as score_row does: the empty asm keeps the product from being
    // contracted into an FMA.
    const __m256 scale = _mm256_loadu_ps(a.scalars + t);
    for (int r = 0; r < Rows; ++r) {
        __m256 product = _mm256_mul_ps(scale, acc[r]);
        asm("" : "+x"(product));
        _mm256_storeu_ps(a.scores + (r0 + r) * a.score_stride + t,
                         _mm256_add_ps(_mm256_set1_ps(states[r][0]), product));
    }
}

// Blocks of 8 tokens, rows four at a time; the last n % 8 tokens (and codes under 4 bytes)
// through score_rows_from.
VQ_TARGET_AVX2 void scores_avx2(const RowsArgs& a) {
    const std::size_t cb = a.codec.code_bytes();
    const std::size_t wide = wide_groups(a.codec);
    int t = 0;
    if (cb >= 4) {
        const __m256i lanes = lane_offsets_avx2(cb);
        __m256i words[1024 * 8 / 32];  // d <= 1024 coordinates of <= 8 bits
        for (; t + 8 <= a.n; t += 8) {
            gather_lane_words_avx2(a.codes + t * cb, lanes, cb, cb, words);
            for (int r0 = 0; r0 < a.rows; r0 += 4) switch (std::min(4, a.rows - r0)) {
                    case 1:
                        score_lanes_avx2<1>(a, wide, words, r0, t);
                        break;
                    case 2:
                        score_lanes_avx2<2>(a, wide, words, r0, t);
                        break;
                    case 3:
                        score_lanes_avx2<3>(a, wide, words, r0, t);
                        break;
                    default:
                        score_lanes_avx2<4>(a, wide, words, r0, t);
                }
        }
    }
    score_rows_from(a, t);
}
#endif

}  // namespace

void spectral_query_state(const SpectralCodec& codec, const float* query, float* state) {
    VQ_KERNEL_FOR_ISA(query_state_generic, query_state_avx2, query_state_avx512)
    (codec, query, state);
}

void spectral_scores(const SpectralCodec& codec, const float* states, std::size_t state_stride,
                     int rows, const uint8_t* codes, const float* scalars, int n, float* scores,
                     std::size_t score_stride) {
    VQ_KERNEL_FOR_ISA(scores_generic, scores_avx2, scores_avx512)
    ({codec, states, state_stride, rows, codes, scalars, n, scores, score_stride});
}

void spectral_scores_reference(const SpectralCodec& codec, const float* states,
                               std::size_t state_stride, int rows, const uint8_t* codes,
                               const float* scalars, int n, float* scores,
                               std::size_t score_stride) {
    scores_generic({codec, states, state_stride, rows, codes, scalars, n, scores, score_stride});
}

}  // namespace veloxquant
