#include "methods/nibble_table_sums.h"

#include "core/cpu_isa.h"

#ifdef VQ_X86_KERNELS
#include <immintrin.h>
#endif

namespace veloxquant {
namespace {

struct SumArgs {
    const float* tables;
    const uint8_t* codes;
    std::size_t stride, bytes;
    int n;
    float* sums;
};

// Tokens t0..n-1 one at a time: the order every build reproduces (a byte pair's four nibbles,
// low halves first, into s0..s3).
VQ_ALWAYS_INLINE void sum_tokens(const SumArgs& a, int t0) {
    for (int t = t0; t < a.n; ++t) {
        const uint8_t* code = a.codes + t * a.stride;
        float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
        std::size_t b = 0;
        for (; b + 2 <= a.bytes; b += 2) {
            const float* table = a.tables + 32 * b;
            s0 += table[code[b] & 15];
            s1 += table[16 + (code[b] >> 4)];
            s2 += table[32 + (code[b + 1] & 15)];
            s3 += table[48 + (code[b + 1] >> 4)];
        }
        if (b < a.bytes) {
            s0 += a.tables[32 * b + (code[b] & 15)];
            s1 += a.tables[32 * b + 16 + (code[b] >> 4)];
        }
        a.sums[t] = (s0 + s1) + (s2 + s3);
    }
}

using SumFn = void (*)(const SumArgs&);

void sums_generic(const SumArgs& a) {
    sum_tokens(a, 0);
}

#ifdef VQ_X86_KERNELS
// One token per lane. A gather of 32-bit words reads code bytes b..b+3 (nibbles 2b..2b+7) of
// every lane's token; a 16-entry table is one register, and vpermps looks up all lanes at
// once from the low 4 bits of each lane's index, so nibble k needs only a shift by 4k. The last
// bytes % 4 bytes come from the word that ends at the code's last byte, shifted down, so no
// read leaves a token's code.
VQ_TARGET_AVX512 VQ_ALWAYS_INLINE void add_nibbles(const float* tables, __m512i w, int count,
                                                   __m512 (&s)[4]) {
    for (int k = 0; k < count; ++k) {
        const __m512 x =
            _mm512_permutexvar_ps(_mm512_srli_epi32(w, 4 * k), _mm512_loadu_ps(tables + 16 * k));
        s[k % 4] = _mm512_add_ps(s[k % 4], x);
    }
}

VQ_TARGET_AVX512 void sums_avx512(const SumArgs& a) {
    int t = 0;
    if (a.bytes >= 4) {
        const __m512i lanes = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32(static_cast<int>(a.stride)));
        const std::size_t whole = a.bytes & ~std::size_t{3}, rest = a.bytes - whole;
        const __m128i rest_shift = _mm_cvtsi32_si128(static_cast<int>(8 * (4 - rest)));
        for (; t + 16 <= a.n; t += 16) {
            const uint8_t* base = a.codes + t * a.stride;
            __m512 s[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                           _mm512_setzero_ps()};
            for (std::size_t b = 0; b < whole; b += 4)
                add_nibbles(a.tables + 32 * b, _mm512_i32gather_epi32(lanes, base + b, 1), 8, s);
            if (rest > 0) {
                const __m512i w = _mm512_srl_epi32(
                    _mm512_i32gather_epi32(lanes, base + a.bytes - 4, 1), rest_shift);
                add_nibbles(a.tables + 32 * whole, w, static_cast<int>(2 * rest), s);
            }
            _mm512_storeu_ps(a.sums + t,
                             _mm512_add_ps(_mm512_add_ps(s[0], s[1]), _mm512_add_ps(s[2], s[3])));
        }
    }
    sum_tokens(a, t);
}
#endif

SumFn sum_kernel() {
#ifdef VQ_X86_KERNELS
    return kernel_for_isa(sums_generic, sums_generic, sums_avx512);
#else
    return sums_generic;
#endif
}

}  // namespace

void nibble_table_sums(const float* tables, const uint8_t* codes, std::size_t stride,
                       std::size_t bytes, int n, float* sums) {
    sum_kernel()({tables, codes, stride, bytes, n, sums});
}

bool nibble_tables_are_faster() {
    return cpu_isa() == CpuIsa::kAvx512;
}

}  // namespace veloxquant
