#include "methods/byte_table_sums.h"

#include <stdexcept>
#include <string>

#include "core/cpu_isa.h"
#include "core/x86_intrinsics.h"

namespace veloxquant {
namespace {

struct SumArgs {
    const float* tables;
    const uint8_t* codes;
    std::size_t stride, bytes;
    int n;
    float* sums;
};

// Tokens t0..n-1 one at a time: the order every build reproduces.
template <int Chains>
VQ_ALWAYS_INLINE void sum_tokens(const SumArgs& a, int t0) {
    for (int t = t0; t < a.n; ++t) {
        const uint8_t* code = a.codes + t * a.stride;
        float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
        std::size_t b = 0;
        if (Chains == 4) {
            for (; b + 4 <= a.bytes; b += 4) {
                s0 += a.tables[b * 256 + code[b]];
                s1 += a.tables[(b + 1) * 256 + code[b + 1]];
                s2 += a.tables[(b + 2) * 256 + code[b + 2]];
                s3 += a.tables[(b + 3) * 256 + code[b + 3]];
            }
        }
        for (; b < a.bytes; ++b) s0 += a.tables[b * 256 + code[b]];
        a.sums[t] = Chains == 4 ? (s0 + s1) + (s2 + s3) : s0;
    }
}

using SumFn = void (*)(const SumArgs&);

template <int Chains>
void sums_generic(const SumArgs& a) {
    sum_tokens<Chains>(a, 0);
}

#ifdef VQ_X86_KERNELS
// One running sum, one token per lane: a gather of 32-bit words reads code bytes b..b+3 of
// every lane's token, and each byte, masked out of its word, indexes a gather from its table.
// The last bytes % 4 bytes come from the word that ends at the code's last byte, shifted down,
// so no read leaves a token's code. Tokens past the last whole vector (and codes under 4
// bytes) go through sum_tokens.
VQ_TARGET_AVX512 void sums_avx512(const SumArgs& a) {
    int t = 0;
    if (a.bytes >= 4) {
        const __m512i lanes = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32(static_cast<int>(a.stride)));
        const __m512i byte = _mm512_set1_epi32(0xFF);
        const std::size_t whole = a.bytes & ~std::size_t{3}, rest = a.bytes - whole;
        const __m128i rest_shift = _mm_cvtsi32_si128(static_cast<int>(8 * (4 - rest)));
        for (; t + 16 <= a.n; t += 16) {
            const uint8_t* base = a.codes + t * a.stride;
            __m512 s = _mm512_setzero_ps();
            for (std::size_t b = 0; b < whole + rest; b += 4) {
                // Past the whole words: the last word, its first 4 - rest bytes shifted out.
                const bool last = b == whole;
                __m512i w = _mm512_i32gather_epi32(lanes, base + (last ? a.bytes - 4 : b), 1);
                if (last) w = _mm512_srl_epi32(w, rest_shift);
                const std::size_t count = last ? rest : 4;
                for (std::size_t k = 0; k < count; ++k) {
                    const __m512i idx = _mm512_and_si512(
                        _mm512_srl_epi32(w, _mm_cvtsi32_si128(static_cast<int>(8 * k))), byte);
                    s = _mm512_add_ps(s, _mm512_i32gather_ps(idx, a.tables + (b + k) * 256, 4));
                }
            }
            _mm512_storeu_ps(a.sums + t, s);
        }
    }
    sum_tokens<1>(a, t);
}

// sums_avx512 with eight lanes (AVX2 gathers take the base address first).
VQ_TARGET_AVX2 void sums_avx2(const SumArgs& a) {
    int t = 0;
    if (a.bytes >= 4) {
        const __m256i lanes = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                                 _mm256_set1_epi32(static_cast<int>(a.stride)));
        const __m256i byte = _mm256_set1_epi32(0xFF);
        const std::size_t whole = a.bytes & ~std::size_t{3}, rest = a.bytes - whole;
        const __m128i rest_shift = _mm_cvtsi32_si128(static_cast<int>(8 * (4 - rest)));
        for (; t + 8 <= a.n; t += 8) {
            const uint8_t* base = a.codes + t * a.stride;
            __m256 s = _mm256_setzero_ps();
            for (std::size_t b = 0; b < whole + rest; b += 4) {
                const bool last = b == whole;
                __m256i w = _mm256_i32gather_epi32(
                    reinterpret_cast<const int*>(base + (last ? a.bytes - 4 : b)), lanes, 1);
                if (last) w = _mm256_srl_epi32(w, rest_shift);
                const std::size_t count = last ? rest : 4;
                for (std::size_t k = 0; k < count; ++k) {
                    const __m256i idx = _mm256_and_si256(
                        _mm256_srl_epi32(w, _mm_cvtsi32_si128(static_cast<int>(8 * k))), byte);
                    s = _mm256_add_ps(s, _mm256_i32gather_ps(a.tables + (b + k) * 256, idx, 4));
                }
            }
            _mm256_storeu_ps(a.sums + t, s);
        }
    }
    sum_tokens<1>(a, t);
}
#endif

}  // namespace

void byte_table_sums(const float* tables, const uint8_t* codes, std::size_t stride,
                     std::size_t bytes, int n, int chains, float* sums) {
    const SumArgs a{tables, codes, stride, bytes, n, sums};
    // Four scalar chains keep the three load ports of recent x86 cores as busy as gathers do
    // (measured: no faster with them), so only the single chain, bound by the add latency,
    // has SIMD builds.
    if (chains == 4) return sums_generic<4>(a);
    if (chains != 1)
        throw std::invalid_argument("byte_table_sums: chains must be 1 or 4, got " +
                                    std::to_string(chains));
    VQ_KERNEL_FOR_ISA(sums_generic<1>, sums_avx2, sums_avx512)(a);
}

}  // namespace veloxquant
