#include "methods/fp16_codec.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

#include "core/cpu_isa.h"
#include "core/half.h"
#include "core/x86_intrinsics.h"

namespace veloxquant {
namespace {

struct ScoreArgs {
    const float* states;
    std::size_t state_stride;
    int rows;
    const uint8_t* codes;
    int d, n;
    float* scores;
    std::size_t score_stride;
};

// Row by row, token by token, each half through the fp16 -> float table.
void score_generic(const ScoreArgs& a) {
    const float* table = half_table();
    for (int r = 0; r < a.rows; ++r) {
        const float* state = a.states + r * a.state_stride;
        for (int t = 0; t < a.n; ++t) {
            const uint16_t* in =
                reinterpret_cast<const uint16_t*>(a.codes) + static_cast<std::size_t>(t) * a.d;
            float s = 0.0f;
#pragma omp simd reduction(+ : s)
            for (int j = 0; j < a.d; ++j) s += state[j] * table[in[j]];
            a.scores[r * a.score_stride + t] = s;
        }
    }
}

#ifdef VQ_X86_KERNELS
// Token t for Rows rows: its halves converted 16 at a time (vcvtph2ps, exact like the table)
// once for all the rows, each row's products summed in 16 lanes, then across them.
template <int Rows>
VQ_TARGET_AVX512 VQ_ALWAYS_INLINE void score_token(const ScoreArgs& a, int r0, int t) {
    const uint16_t* in =
        reinterpret_cast<const uint16_t*>(a.codes) + static_cast<std::size_t>(t) * a.d;
    __m512 s[Rows];
    for (int r = 0; r < Rows; ++r) s[r] = _mm512_setzero_ps();
    for (int j = 0; j < a.d; j += 16) {
        const __m512 k =
            _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + j)));
        for (int r = 0; r < Rows; ++r)
            s[r] =
                _mm512_fmadd_ps(k, _mm512_loadu_ps(a.states + (r0 + r) * a.state_stride + j), s[r]);
    }
    for (int r = 0; r < Rows; ++r)
        a.scores[(r0 + r) * a.score_stride + t] = _mm512_reduce_add_ps(s[r]);
}

// Head dims divisible by 16; rows four at a time.
VQ_TARGET_AVX512 void score_avx512(const ScoreArgs& a) {
    if (a.d % 16 != 0) return score_generic(a);
    for (int t = 0; t < a.n; ++t)
        for (int r0 = 0; r0 < a.rows; r0 += 4) switch (std::min(4, a.rows - r0)) {
                case 1:
                    score_token<1>(a, r0, t);
                    break;
                case 2:
                    score_token<2>(a, r0, t);
                    break;
                case 3:
                    score_token<3>(a, r0, t);
                    break;
                default:
                    score_token<4>(a, r0, t);
            }
}

// score_token with 8 lanes: 8 halves per conversion, each row's products summed in 8 lanes,
// then the two halves of the register, then pairs, then the last two.
template <int Rows>
VQ_TARGET_AVX2_F16C VQ_ALWAYS_INLINE void score_token_avx2(const ScoreArgs& a, int r0, int t) {
    const uint16_t* in =
        reinterpret_cast<const uint16_t*>(a.codes) + static_cast<std::size_t>(t) * a.d;
    __m256 s[Rows];
    for (int r = 0; r < Rows; ++r) s[r] = _mm256_setzero_ps();
    for (int j = 0; j < a.d; j += 8) {
        const __m256 k = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + j)));
        for (int r = 0; r < Rows; ++r)
            s[r] =
                _mm256_fmadd_ps(k, _mm256_loadu_ps(a.states + (r0 + r) * a.state_stride + j), s[r]);
    }
    for (int r = 0; r < Rows; ++r) {
        __m128 x = _mm_add_ps(_mm256_castps256_ps128(s[r]), _mm256_extractf128_ps(s[r], 1));
        x = _mm_add_ps(x, _mm_movehl_ps(x, x));
        x = _mm_add_ss(x, _mm_movehdup_ps(x));
        a.scores[(r0 + r) * a.score_stride + t] = _mm_cvtss_f32(x);
    }
}

// Head dims divisible by 8; rows four at a time.
VQ_TARGET_AVX2_F16C void score_avx2(const ScoreArgs& a) {
    if (a.d % 8 != 0) return score_generic(a);
    for (int t = 0; t < a.n; ++t)
        for (int r0 = 0; r0 < a.rows; r0 += 4) switch (std::min(4, a.rows - r0)) {
                case 1:
                    score_token_avx2<1>(a, r0, t);
                    break;
                case 2:
                    score_token_avx2<2>(a, r0, t);
                    break;
                case 3:
                    score_token_avx2<3>(a, r0, t);
                    break;
                default:
                    score_token_avx2<4>(a, r0, t);
            }
}

#endif

void score_rows(const ScoreArgs& a) {
    VQ_KERNEL_FOR_ISA_F16C(score_generic, score_avx2, score_avx512)(a);
}

}  // namespace

FP16Codec::FP16Codec(int d) : KeyCodec(d) {
    if (d < 1 || d > 1024)
        throw std::invalid_argument("fp16: head_dim must be in 1..1024, got " + std::to_string(d));
}

void FP16Codec::encode(const float* keys, int n, uint8_t* codes, float*, std::size_t) const {
    const int d = dim();
    for (int t = 0; t < n; ++t) {
        uint16_t* out =
            reinterpret_cast<uint16_t*>(codes + static_cast<std::size_t>(t) * code_bytes());
        for (int j = 0; j < d; ++j)
            out[j] = float_to_half(keys[static_cast<std::size_t>(t) * d + j]);
    }
}

void FP16Codec::decode(const uint8_t* codes, const float*, std::size_t, int n, float* keys) const {
    const int d = dim();
    const float* table = half_table();
    for (int t = 0; t < n; ++t) {
        const uint16_t* in =
            reinterpret_cast<const uint16_t*>(codes + static_cast<std::size_t>(t) * code_bytes());
        for (int j = 0; j < d; ++j) keys[static_cast<std::size_t>(t) * d + j] = table[in[j]];
    }
}

void FP16Codec::prepare_query(const float* query, float* state) const {
    std::memcpy(state, query, sizeof(float) * dim());
}

void FP16Codec::score(const float* state, const uint8_t* codes, const float*, std::size_t, int n,
                      float* scores) const {
    score_rows({state, 0, 1, codes, dim(), n, scores, 0});
}

void FP16Codec::score_rows_at(const float* states, std::size_t state_stride, int rows,
                              const uint8_t* codes, const float*, std::size_t, int n, int,
                              float* scores, std::size_t score_stride) const {
    score_rows({states, state_stride, rows, codes, dim(), n, scores, score_stride});
}

void FP16Codec::check_codes(const uint8_t* codes, int n) const {
    if (!halves_finite(codes, static_cast<std::size_t>(n) * dim()))
        throw std::runtime_error("corrupted fp16 keys: an infinity or NaN");
}

}  // namespace veloxquant
