#include "methods/value_sum.h"

#include <algorithm>
#include <cstring>

#include "core/cpu_isa.h"

// The kernels use GCC's generic vectors of L floats: each ISA's entry point inlines them and
// compiles them to its own instructions (variable __builtin_shuffle -> vpermps, shifts by a vector
// -> vpsrlvd, w * v + s -> FMA), so one source serves AVX2 (L = 8) and AVX-512 (L = 16).
#pragma GCC diagnostic ignored "-Wpsabi"  // vector arguments of helpers that are always inlined

namespace veloxquant {
namespace {

template <int L>
struct Lanes {
    typedef float F __attribute__((vector_size(4 * L)));
    typedef uint32_t U __attribute__((vector_size(4 * L)));
};

// GCC's __builtin_shuffle: lane i of the result is lane index[i] mod L of a, or mod 2L of the
// concatenation (a, b). Clang has no shuffle by a variable index vector, so there (the fuzzing
// builds, scripts/fuzz.sh) it goes lane by lane.
template <typename V, typename U>
VQ_ALWAYS_INLINE V shuffle(V a, U index) {
#ifdef __clang__
    constexpr unsigned L = sizeof(V) / 4;
    V r;
    for (unsigned i = 0; i < L; ++i) r[i] = a[index[i] % L];
    return r;
#else
    return __builtin_shuffle(a, index);
#endif
}

template <typename V, typename U>
VQ_ALWAYS_INLINE V shuffle(V a, V b, U index) {
#ifdef __clang__
    constexpr unsigned L = sizeof(V) / 4;
    V r;
    for (unsigned i = 0; i < L; ++i) {
        const unsigned j = index[i] % (2 * L);
        r[i] = j < L ? a[j] : b[j - L];
    }
    return r;
#else
    return __builtin_shuffle(a, b, index);
#endif
}

// The centroids as one or two vectors for shuffle, which reads an index modulo its table's
// size (L or 2L): entry e holds centroid e mod 2^Bits, so the index bits above Bits that
// unpack leaves in a lane select nothing. Two vectors only for 16 centroids in 8 lanes.
template <int L, int Bits>
struct Table {
    static constexpr bool kTwo = (1 << Bits) > L;
    typename Lanes<L>::F lo, hi;

    VQ_ALWAYS_INLINE explicit Table(const float* centroids) {
        for (int e = 0; e < L; ++e) {
            lo[e] = centroids[e % (1 << Bits)];
            hi[e] = centroids[(L + e) % (1 << Bits)];
        }
    }

    VQ_ALWAYS_INLINE typename Lanes<L>::F operator[](typename Lanes<L>::U index) const {
        if constexpr (kTwo)
            return shuffle(lo, hi, index);
        else
            return shuffle(lo, index);
    }
};

// The centroids of L consecutive coordinates from their L * Bits / 8 code bytes: lane i takes
// the 32-bit word holding index i (the first, but the second for lanes 8..15 at 4 bits and
// L = 16) shifted right by its bit offset in that word.
template <int L, int Bits>
VQ_ALWAYS_INLINE typename Lanes<L>::F unpack(const Table<L, Bits>& table, const uint8_t* code) {
    using U = typename Lanes<L>::U;
    U shift, word;
    for (int i = 0; i < L; ++i) shift[i] = (Bits * i) % 32;
    if constexpr (L * Bits <= 32) {
        uint32_t w = 0;
        std::memcpy(&w, code, L * Bits / 8);
        word = U{} + w;
    } else {
        uint32_t w[2];
        std::memcpy(w, code, 8);
        U low = U{} + w[0], high = U{} + w[1], pick;
        for (int i = 0; i < L; ++i) pick[i] = i < L / 2 ? i : L + i;
        word = shuffle(low, high, pick);
    }
    return table[word >> shift];
}

constexpr int kBlock = 64;  // tokens per pass of the accumulators through registers

// Of a block of tokens, for up to 4 rows, the tokens with a nonzero weight in some row and their
// weights times their scales (w * scale_t: the token's value is then the bare centroids).
struct Block {
    int live[kBlock];
    int count;
    float ws[4][kBlock];

    // Tokens [t0, t0 + m) for rows [r0, r0 + rows) of a.
    VQ_ALWAYS_INLINE void gather(const ValueSumArgs& a, int t0, int m, int r0, int rows) {
        int nonzero = 0;
        for (int r = 0; r < rows; ++r) {
            const float* w = a.weights + (r0 + r) * a.weight_stride + t0;
            // A zero weight adds exactly zero, as a skipped token would (even where the scale is
            // not finite).
            for (int i = 0; i < m; ++i) ws[r][i] = w[i] == 0.0f ? 0.0f : w[i] * a.scalars[t0 + i];
        }
        for (int i = 0; i < m; ++i) {
            bool any = false;
            for (int r = 0; r < rows; ++r) any |= ws[r][i] != 0.0f;
            nonzero += any;
        }
        count = 0;
        if (nonzero == m) {  // all of them (decode, but for the causal mask's last page)
            for (int i = 0; i < m; ++i) live[i] = t0 + i;
            count = m;
            return;
        }
        for (int i = 0; i < m; ++i) {
            bool any = false;
            for (int r = 0; r < rows; ++r) any |= ws[r][i] != 0.0f;
            if (!any) continue;
            for (int r = 0; r < rows; ++r) ws[r][count] = ws[r][i];
            live[count++] = t0 + i;
        }
    }
};

// acc[r][j, j + D L) += sum_i ws[r][i] * centroids of token live[i], for R rows: the R * D
// accumulators stay in registers over the block, the D vectors of each token's centroids are
// unpacked once for all R rows. Per coordinate the adds run in token order.
template <int L, int Bits, int R, int D>
VQ_ALWAYS_INLINE void sum_dims(const ValueSumArgs& a, const Table<L, Bits>& table, const Block& b,
                               float* const* acc, int j) {
    using F = typename Lanes<L>::F;
    F s[R][D];
    for (int r = 0; r < R; ++r)
        for (int d = 0; d < D; ++d) std::memcpy(&s[r][d], acc[r] + j + d * L, sizeof(F));
    for (int i = 0; i < b.count; ++i) {
        const uint8_t* code = a.codes + b.live[i] * a.code_bytes + j * Bits / 8;
        F v[D];
        for (int d = 0; d < D; ++d) v[d] = unpack<L, Bits>(table, code + d * L * Bits / 8);
        for (int r = 0; r < R; ++r) {
            const float w = b.ws[r][i];
            for (int d = 0; d < D; ++d) s[r][d] += w * v[d];
        }
    }
    for (int r = 0; r < R; ++r)
        for (int d = 0; d < D; ++d) std::memcpy(acc[r] + j + d * L, &s[r][d], sizeof(F));
}

// All coordinates for R rows: D vectors at a time (4 of 16 floats: 16 of the 32 AVX-512
// registers hold 4 rows' accumulators; 2 of 8 floats of AVX2's 16), then one.
template <int L, int Bits, int R>
VQ_ALWAYS_INLINE void sum_rows(const ValueSumArgs& a, const Table<L, Bits>& table, const Block& b,
                               float* const* acc) {
    constexpr int D = L == 16 ? 4 : 2;
    int j = 0;
    for (; j + D * L <= a.dim; j += D * L) sum_dims<L, Bits, R, D>(a, table, b, acc, j);
    for (; j < a.dim; j += L) sum_dims<L, Bits, R, 1>(a, table, b, acc, j);
}

template <int L, int Bits>
VQ_ALWAYS_INLINE void sum_codes(const ValueSumArgs& a) {
    const Table<L, Bits> table(a.centroids);
    Block b;
    for (int t0 = 0; t0 < a.n; t0 += kBlock) {
        const int m = std::min(kBlock, a.n - t0);
        for (int r0 = 0; r0 < a.rows; r0 += 4) {
            const int rows = std::min(4, a.rows - r0);
            b.gather(a, t0, m, r0, rows);
            float* const* acc = a.acc + r0;
            switch (rows) {
                case 1:
                    sum_rows<L, Bits, 1>(a, table, b, acc);
                    break;
                case 2:
                    sum_rows<L, Bits, 2>(a, table, b, acc);
                    break;
                case 3:
                    sum_rows<L, Bits, 3>(a, table, b, acc);
                    break;
                default:
                    sum_rows<L, Bits, 4>(a, table, b, acc);
            }
        }
    }
}

template <int L>
VQ_ALWAYS_INLINE bool sum_lanes(const ValueSumArgs& a) {
    if (a.dim % L != 0) return false;
    switch (a.bits) {
        case 1:
            sum_codes<L, 1>(a);
            return true;
        case 2:
            sum_codes<L, 2>(a);
            return true;
        case 4:
            sum_codes<L, 4>(a);
            return true;
        default:
            return false;
    }
}

bool sum_generic(const ValueSumArgs&) {
    return false;
}

#ifdef VQ_X86_KERNELS
VQ_TARGET_AVX2 bool sum_avx2(const ValueSumArgs& a) {
    return sum_lanes<8>(a);
}
VQ_TARGET_AVX512 bool sum_avx512(const ValueSumArgs& a) {
    return sum_lanes<16>(a);
}
#endif

}  // namespace

bool sum_packed_values(const ValueSumArgs& a) {
    return VQ_KERNEL_FOR_ISA(sum_generic, sum_avx2, sum_avx512)(a);
}

}  // namespace veloxquant
