// Bit fields of 16 tokens' codes, one token per AVX-512 lane (or 8 per AVX2 register), for the
// key scorers that read LSB-first bit streams (core/bitpack.h) a register of tokens at a time
// (polarquant, spectral): every
// lane's code bytes gathered once as 32-bit words, then any field of up to 31 bits taken out of
// them with shifts, for all lanes at once.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "core/cpu_isa.h"
#include "core/x86_intrinsics.h"

#ifdef VQ_X86_KERNELS
namespace veloxquant {

/// Byte offsets of 16 consecutive tokens' codes, stride bytes apart.
VQ_TARGET_AVX512 VQ_ALWAYS_INLINE __m512i lane_offsets(std::size_t stride) {
    return _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(static_cast<int>(stride)));
}

/// words[k] = bytes 4k..4k+3 of each lane's code (lane i's at base + offsets[i]) for
/// 4k < bytes, bytes <= code_bytes, code_bytes >= 4. A word that would read past the code is
/// read where it ends at the code's end and shifted down, so no read leaves a token's code.
VQ_TARGET_AVX512 VQ_ALWAYS_INLINE void gather_lane_words(const uint8_t* base, __m512i offsets,
                                                         std::size_t bytes, std::size_t code_bytes,
                                                         __m512i* words) {
    for (std::size_t k = 0; 4 * k < bytes; ++k) {
        const std::size_t at = std::min(4 * k, code_bytes - 4);
        words[k] = _mm512_srl_epi32(_mm512_i32gather_epi32(offsets, base + at, 1),
                                    _mm_cvtsi32_si128(static_cast<int>(8 * (4 * k - at))));
    }
}

/// The width-bit field (width < 32) at bit `bit` of every lane's code, from its words, in the
/// low width bits of each lane, any bits above them (for a lookup that reads only the low bits,
/// as vpermps reads 4); a field may straddle two words.
VQ_TARGET_AVX512 VQ_ALWAYS_INLINE __m512i lane_field_low(const __m512i* words, std::size_t bit,
                                                         int width) {
    const std::size_t k = bit / 32;
    const int s = static_cast<int>(bit % 32);
    __m512i v = _mm512_srl_epi32(words[k], _mm_cvtsi32_si128(s));
    if (s + width > 32)
        v = _mm512_or_si512(v, _mm512_sll_epi32(words[k + 1], _mm_cvtsi32_si128(32 - s)));
    return v;
}

/// lane_field_low with the bits above the field cleared.
VQ_TARGET_AVX512 VQ_ALWAYS_INLINE __m512i lane_field(const __m512i* words, std::size_t bit,
                                                     int width) {
    return _mm512_and_si512(lane_field_low(words, bit, width), _mm512_set1_epi32((1 << width) - 1));
}

/// Each lane's entry idx of a table of L floats (L a power of two, at least 8; idx below L, but
/// for 16 and 32 entries the bits above log2 L are ignored): one vpermps up to 16 entries (8:
/// only 8 floats read), vpermt2ps on two registers for 32 (it reads the index's low 5 bits), for
/// 64 the two halves' lookups blended on bit 5, a gather beyond (on the build VM's AVX-512 core,
/// 4-bit polarquant at d=128 and 32K tokens: 41.6 ms gathering, 25.6 ms blending; at 5 and 6
/// bits the blends of 4 and 8 permutes were slower than the gather).
template <int L>
VQ_TARGET_AVX512 VQ_ALWAYS_INLINE __m512 lane_lookup(const float* table, __m512i idx) {
    static_assert(L >= 8, "tables of fewer than 8 floats are padded");
    if constexpr (L == 8)
        return _mm512_permutexvar_ps(idx, _mm512_castps256_ps512(_mm256_loadu_ps(table)));
    else if constexpr (L == 16)
        return _mm512_permutexvar_ps(idx, _mm512_loadu_ps(table));
    else if constexpr (L == 32)
        return _mm512_permutex2var_ps(_mm512_loadu_ps(table), idx, _mm512_loadu_ps(table + 16));
    else if constexpr (L == 64)
        return _mm512_mask_blend_ps(_mm512_test_epi32_mask(idx, _mm512_set1_epi32(32)),
                                    lane_lookup<32>(table, idx), lane_lookup<32>(table + 32, idx));
    else
        return _mm512_i32gather_ps(idx, table, 4);
}

// The same for 8 tokens, one per AVX2 lane (lane_offsets_avx2 and so on).

VQ_TARGET_AVX2 VQ_ALWAYS_INLINE __m256i lane_offsets_avx2(std::size_t stride) {
    return _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                              _mm256_set1_epi32(static_cast<int>(stride)));
}

/// The 32-bit word at `at` of each lane's code (lane i's at at + offsets[i]).
VQ_TARGET_AVX2 VQ_ALWAYS_INLINE __m256i gather_lane_avx2(const uint8_t* at, __m256i offsets) {
    return _mm256_i32gather_epi32(reinterpret_cast<const int*>(at), offsets, 1);
}

VQ_TARGET_AVX2 VQ_ALWAYS_INLINE void gather_lane_words_avx2(const uint8_t* base, __m256i offsets,
                                                            std::size_t bytes,
                                                            std::size_t code_bytes,
                                                            __m256i* words) {
    for (std::size_t k = 0; 4 * k < bytes; ++k) {
        const std::size_t at = std::min(4 * k, code_bytes - 4);
        words[k] = _mm256_srl_epi32(gather_lane_avx2(base + at, offsets),
                                    _mm_cvtsi32_si128(static_cast<int>(8 * (4 * k - at))));
    }
}

VQ_TARGET_AVX2 VQ_ALWAYS_INLINE __m256i lane_field_low_avx2(const __m256i* words, std::size_t bit,
                                                            int width) {
    const std::size_t k = bit / 32;
    const int s = static_cast<int>(bit % 32);
    __m256i v = _mm256_srl_epi32(words[k], _mm_cvtsi32_si128(s));
    if (s + width > 32)
        v = _mm256_or_si256(v, _mm256_sll_epi32(words[k + 1], _mm_cvtsi32_si128(32 - s)));
    return v;
}

VQ_TARGET_AVX2 VQ_ALWAYS_INLINE __m256i lane_field_avx2(const __m256i* words, std::size_t bit,
                                                        int width) {
    return _mm256_and_si256(lane_field_low_avx2(words, bit, width),
                            _mm256_set1_epi32((1 << width) - 1));
}

/// lane_lookup on 8 lanes (idx below L; bits above log2 L ignored up to 64 entries): one vpermps
/// (it reads 3 bits) for 8 entries, for 16, 32 and 64 the two halves' lookups blended on the
/// index's top bit (moved to the sign bit), a gather beyond. On the build VM's core in its AVX2
/// set, at d=128 and 32K tokens: spectral's 5- and 6-bit groups 64.4-65.4 ms gathering, 35.5
/// blending; 4-bit polarquant's 64-entry tables 43.6-43.8 and 44.1 (no faster, no slower).
template <int L>
VQ_TARGET_AVX2 VQ_ALWAYS_INLINE __m256 lane_lookup_avx2(const float* table, __m256i idx) {
    static_assert(L >= 8, "tables of fewer than 8 floats are padded");
    if constexpr (L == 8) {
        return _mm256_permutevar8x32_ps(_mm256_loadu_ps(table), idx);
    } else if constexpr (L <= 64) {
        constexpr int kTopBit = L == 16 ? 3 : L == 32 ? 4 : 5;
        return _mm256_blendv_ps(lane_lookup_avx2<L / 2>(table, idx),
                                lane_lookup_avx2<L / 2>(table + L / 2, idx),
                                _mm256_castsi256_ps(_mm256_slli_epi32(idx, 31 - kTopBit)));
    } else {
        return _mm256_i32gather_ps(table, idx, 4);
    }
}

}  // namespace veloxquant

#endif
