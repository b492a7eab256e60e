#include "methods/nibble_table_sums.h"

#include <algorithm>

#include "core/cpu_isa.h"
#include "core/x86_intrinsics.h"

namespace veloxquant {
namespace {

struct SumArgs {
    const float* tables;
    std::size_t table_stride;
    int rows;
    const uint8_t* codes;
    std::size_t stride, bytes;
    int n;
    float* sums;
    std::size_t sum_stride;
};

// Tokens t0..n-1 one at a time: the order every build reproduces (a byte pair's four nibbles,
// low halves first, into s0..s3).
VQ_ALWAYS_INLINE void sum_tokens(const SumArgs& a, int t0) {
    for (int r = 0; r < a.rows; ++r) {
        const float* tables = a.tables + r * a.table_stride;
        for (int t = t0; t < a.n; ++t) {
            const uint8_t* code = a.codes + t * a.stride;
            float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
            std::size_t b = 0;
            for (; b + 2 <= a.bytes; b += 2) {
                const float* table = tables + 32 * b;
                s0 += table[code[b] & 15];
                s1 += table[16 + (code[b] >> 4)];
                s2 += table[32 + (code[b + 1] & 15)];
                s3 += table[48 + (code[b + 1] >> 4)];
            }
            if (b < a.bytes) {
                s0 += tables[32 * b + (code[b] & 15)];
                s1 += tables[32 * b + 16 + (code[b] >> 4)];
            }
            a.sums[r * a.sum_stride + t] = (s0 + s1) + (s2 + s3);
        }
    }
}

using SumFn = void (*)(const SumArgs&);

void sums_generic(const SumArgs& a) {
    sum_tokens(a, 0);
}

#ifdef VQ_X86_KERNELS
// Adds the lookups of the nibbles of one 32-bit word of 16 tokens (count nibbles, 8 but for a
// last partial word) to the running sums of Rows rows, whose tables for the word's first nibble
// are tables[r] + offset.
template <int Rows>
VQ_TARGET_AVX512 VQ_ALWAYS_INLINE void add_word(__m512i word, int count, const float* const* tables,
                                                std::size_t offset, __m512 (&s)[Rows][4]) {
    __m512i idx[8];
    for (int k = 0; k < 8; ++k) idx[k] = _mm512_srli_epi32(word, 4 * k);
    for (int r = 0; r < Rows; ++r)
        for (int k = 0; k < count; ++k)
            s[r][k % 4] = _mm512_add_ps(
                s[r][k % 4],
                _mm512_permutexvar_ps(idx[k], _mm512_loadu_ps(tables[r] + offset + 16 * k)));
}

// One token per lane, Rows rows at once. A gather of 32-bit words reads code bytes b..b+3
// (nibbles 2b..2b+7) of every lane's token, and the word shifted by 4k holds nibble k in the
// low 4 bits of each lane, all vpermps reads of its index: a 16-entry table is one register,
// looked up for all lanes at once, and the shifted words serve every row. The last bytes % 4
// bytes come from the word that ends at the code's last byte, shifted down, so no read leaves
// a token's code.
template <int Rows>
VQ_TARGET_AVX512 VQ_ALWAYS_INLINE void sum_rows(const SumArgs& a, int r0, int t) {
    const __m512i lanes =
        _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                           _mm512_set1_epi32(static_cast<int>(a.stride)));
    const uint8_t* base = a.codes + t * a.stride;
    const float* tables[Rows];
    __m512 s[Rows][4];
    for (int r = 0; r < Rows; ++r) {
        tables[r] = a.tables + (r0 + r) * a.table_stride;
        for (__m512& x : s[r]) x = _mm512_setzero_ps();
    }
    const std::size_t whole = a.bytes / 4, rest = a.bytes % 4;
    for (std::size_t w = 0; w < whole; ++w)
        add_word<Rows>(_mm512_i32gather_epi32(lanes, base + 4 * w, 1), 8, tables, 128 * w, s);
    if (rest > 0) {
        const __m512i last = _mm512_srl_epi32(_mm512_i32gather_epi32(lanes, base + a.bytes - 4, 1),
                                              _mm_cvtsi32_si128(static_cast<int>(8 * (4 - rest))));
        add_word<Rows>(last, static_cast<int>(2 * rest), tables, 128 * whole, s);
    }
    for (int r = 0; r < Rows; ++r)
        _mm512_storeu_ps(
            a.sums + (r0 + r) * a.sum_stride + t,
            _mm512_add_ps(_mm512_add_ps(s[r][0], s[r][1]), _mm512_add_ps(s[r][2], s[r][3])));
}

// Blocks of 16 tokens, rows four at a time (4 x 4 running sums and 8 shifted words fill 24 of
// the 32 registers); tokens past the last block (and codes under 4 bytes) go through
// sum_tokens.
VQ_TARGET_AVX512 void sums_avx512(const SumArgs& a) {
    int t = 0;
    if (a.bytes >= 4) {
        for (; t + 16 <= a.n; t += 16) {
            for (int r0 = 0; r0 < a.rows; r0 += 4) {
                switch (std::min(4, a.rows - r0)) {
                    case 1:
                        sum_rows<1>(a, r0, t);
                        break;
                    case 2:
                        sum_rows<2>(a, r0, t);
                        break;
                    case 3:
                        sum_rows<3>(a, r0, t);
                        break;
                    default:
                        sum_rows<4>(a, r0, t);
                }
            }
        }
    }
    sum_tokens(a, t);
}

// The AVX2 build: 8 tokens per ymm, a 16-entry table two registers. vpermps reads the low 3
// bits of each lane's index, so one lookup per table half, and a blend on the nibble's bit 3
// (moved to the sign bit by shifting the word left) picks the half.
template <int Rows>
VQ_TARGET_AVX2 VQ_ALWAYS_INLINE void add_word_avx2(__m256i word, int count,
                                                   const float* const* tables, std::size_t offset,
                                                   __m256 (&s)[Rows][4]) {
    for (int k = 0; k < count; ++k) {
        const __m256i idx = _mm256_srli_epi32(word, 4 * k);
        const __m256 high = _mm256_castsi256_ps(_mm256_slli_epi32(word, 28 - 4 * k));
        for (int r = 0; r < Rows; ++r) {
            const float* table = tables[r] + offset + 16 * k;
            const __m256 lo = _mm256_permutevar8x32_ps(_mm256_loadu_ps(table), idx);
            const __m256 hi = _mm256_permutevar8x32_ps(_mm256_loadu_ps(table + 8), idx);
            s[r][k % 4] = _mm256_add_ps(s[r][k % 4], _mm256_blendv_ps(lo, hi, high));
        }
    }
}

// sum_rows with 8 lanes: the same gathered words, the same last word.
template <int Rows>
VQ_TARGET_AVX2 VQ_ALWAYS_INLINE void sum_rows_avx2(const SumArgs& a, int r0, int t) {
    const __m256i lanes = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                             _mm256_set1_epi32(static_cast<int>(a.stride)));
    const uint8_t* base = a.codes + t * a.stride;
    const float* tables[Rows];
    __m256 s[Rows][4];
    for (int r = 0; r < Rows; ++r) {
        tables[r] = a.tables + (r0 + r) * a.table_stride;
        for (__m256& x : s[r]) x = _mm256_setzero_ps();
    }
    const std::size_t whole = a.bytes / 4, rest = a.bytes % 4;
    for (std::size_t w = 0; w < whole; ++w)
        add_word_avx2<Rows>(
            _mm256_i32gather_epi32(reinterpret_cast<const int*>(base + 4 * w), lanes, 1), 8, tables,
            128 * w, s);
    if (rest > 0) {
        const __m256i last = _mm256_srl_epi32(
            _mm256_i32gather_epi32(reinterpret_cast<const int*>(base + a.bytes - 4), lanes, 1),
            _mm_cvtsi32_si128(static_cast<int>(8 * (4 - rest))));
        add_word_avx2<Rows>(last, static_cast<int>(2 * rest), tables, 128 * whole, s);
    }
    for (int r = 0; r < Rows; ++r)
        _mm256_storeu_ps(
            a.sums + (r0 + r) * a.sum_stride + t,
            _mm256_add_ps(_mm256_add_ps(s[r][0], s[r][1]), _mm256_add_ps(s[r][2], s[r][3])));
}

// Blocks of 8 tokens, rows three at a time: 3 x 4 running sums leave 4 registers for the word,
// index, blend mask and lookups, a few spilled to the idle load ports. Measured (4 rows, 64-byte
// codes) two rows at a time is 18% slower, four 6%.
VQ_TARGET_AVX2 void sums_avx2(const SumArgs& a) {
    int t = 0;
    if (a.bytes >= 4) {
        for (; t + 8 <= a.n; t += 8) {
            for (int r0 = 0; r0 < a.rows; r0 += 3) {
                switch (std::min(3, a.rows - r0)) {
                    case 1:
                        sum_rows_avx2<1>(a, r0, t);
                        break;
                    case 2:
                        sum_rows_avx2<2>(a, r0, t);
                        break;
                    default:
                        sum_rows_avx2<3>(a, r0, t);
                }
            }
        }
    }
    sum_tokens(a, t);
}
#endif

SumFn sum_kernel() {
    return VQ_KERNEL_FOR_ISA(sums_generic, sums_avx2, sums_avx512);
}

}  // namespace

void nibble_table_sums(const float* tables, std::size_t table_stride, int rows,
                       const uint8_t* codes, std::size_t stride, std::size_t bytes, int n,
                       float* sums, std::size_t sum_stride) {
    sum_kernel()({tables, table_stride, rows, codes, stride, bytes, n, sums, sum_stride});
}

bool nibble_tables_are_faster() {
    return cpu_isa() != CpuIsa::kGeneric;
}

}  // namespace veloxquant
