#include "model/matmul.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/cpu_isa.h"
#include "model/dequant.h"

namespace veloxquant {
namespace {

#if !defined(__GNUC__)
#error "matmul.cpp needs GCC or Clang (vector extensions, target attributes)"
#endif
// Every kernel helper is inlined (VQ_ALWAYS_INLINE) into the per-ISA entry points below, so it
// is compiled for that entry point's target (core/cpu_isa.h).

constexpr int kTileRows = 16;     // weight rows per work unit and per register tile
constexpr int kMinTiledVecs = 4;  // from this many vectors on, a tile is dequantized once
constexpr int kScaleGroup = 64;   // blocks whose fp16 scales are converted together

// IEEE half to float without data-dependent branches (F. Giesen, half_to_float_fast5,
// https://gist.github.com/rygorous/2144712): move exponent and mantissa into place, rebias the
// exponent with one multiply by 2^112 (which also normalises subnormals), then patch Inf/NaN.
VQ_ALWAYS_INLINE float fp16(const uint8_t* p) {
    uint16_t h;
    std::memcpy(&h, p, sizeof h);
    uint32_t bits = static_cast<uint32_t>(h & 0x7FFFu) << 13;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    f *= 0x1p+112f;
    std::memcpy(&bits, &f, sizeof f);
    if (f >= 65536.0f) bits |= 0x7F800000u;  // was Inf/NaN: maximum exponent again
    bits |= static_cast<uint32_t>(h & 0x8000u) << 16;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

// GCC/Clang vector extensions: L lanes of each element type. The kernels are instantiated with
// L = 4 (SSE2, or another ISA's 128-bit vectors), 8 (AVX2) and 16 (AVX-512). Vectors are passed
// by reference only, so no function signature depends on the vector ABI.
template <int L>
struct Vec {
    typedef float F __attribute__((vector_size(4 * L)));
    typedef int32_t I __attribute__((vector_size(4 * L)));
    typedef uint32_t U __attribute__((vector_size(4 * L)));
    typedef uint16_t U16 __attribute__((vector_size(2 * L)));
};
typedef uint8_t U8x16 __attribute__((vector_size(16)));
typedef uint64_t U64x2 __attribute__((vector_size(16)));

template <int L>
VQ_ALWAYS_INLINE void load(typename Vec<L>::F& v, const float* p) {
    std::memcpy(&v, p, sizeof v);
}

template <int L>
VQ_ALWAYS_INLINE void store(float* p, const typename Vec<L>::F& v) {
    std::memcpy(p, &v, sizeof v);
}

// The 32 bytes of a block, unsigned (u8) or signed (s8), as 32 / L float vectors. The bytes are
// widened through an int32 array, which compilers turn into one zero/sign-extending load.
template <int L, bool kSigned>
VQ_ALWAYS_INLINE void widen(typename Vec<L>::F* out, const uint8_t* q) {
    using V = Vec<L>;
    for (int c = 0; c < kQK / L; ++c) {
        int32_t wide[L];
        for (int j = 0; j < L; ++j) {
            const uint8_t b = q[c * L + j];
            wide[j] = kSigned ? static_cast<int8_t>(b) : static_cast<int32_t>(b);
        }
        typename V::I iv;
        std::memcpy(&iv, wide, sizeof iv);
        out[c] = __builtin_convertvector(iv, typename V::F);
    }
}

// kBit4[b] spreads the 8 bits of b over 8 bytes, bit i -> 0x10 in byte i (little-endian), so the
// fifth bits of Q5_x elements 8k .. 8k + 7 (bits 8k .. 8k + 7 of qh) come from one lookup; the
// same table trick as ggml's table_b2b (src/ggml-cpu/ggml-cpu-impl.h).
struct Bit4Table {
    uint64_t v[256];
    constexpr Bit4Table() : v() {
        for (int b = 0; b < 256; ++b)
            for (int i = 0; i < 8; ++i)
                if (b & (1 << i)) v[b] |= uint64_t{0x10} << (8 * i);
    }
};
constexpr Bit4Table kBit4{};

// The 32 codes of a Q4_x / Q5_x block in element order: byte j of qs holds element j (low
// nibble) and element j + 16 (high nibble); with qh (Q5_x), bit j of qh is element j's fifth
// bit. Everything stays in vector registers until the two 16-byte stores (a narrower store read
// back by a wider load would defeat store forwarding).
VQ_ALWAYS_INLINE void block_nibbles(uint8_t* nib, const uint8_t* qs, const uint8_t* qh) {
    U8x16 q;
    std::memcpy(&q, qs, sizeof q);
    U8x16 lo = q & 0x0F;
    U8x16 hi = q >> 4;
    if (qh != nullptr) {
        const U64x2 fifth_lo = {kBit4.v[qh[0]], kBit4.v[qh[1]]};
        const U64x2 fifth_hi = {kBit4.v[qh[2]], kBit4.v[qh[3]]};
        U8x16 bits;
        std::memcpy(&bits, &fifth_lo, sizeof bits);
        lo |= bits;
        std::memcpy(&bits, &fifth_hi, sizeof bits);
        hi |= bits;
    }
    std::memcpy(nib, &lo, sizeof lo);
    std::memcpy(nib + 16, &hi, sizeof hi);
}

template <int L>
VQ_ALWAYS_INLINE void f16_row(float* w, const uint8_t* src, int64_t n) {
    using V = Vec<L>;
    int64_t c = 0;
    for (; c + L <= n; c += L) {  // fp16() above, lane-wise
        typename V::U16 h;
        std::memcpy(&h, src + 2 * c, sizeof h);
        const typename V::U u = __builtin_convertvector(h, typename V::U);
        typename V::U bits = (u & 0x7FFFu) << 13;
        typename V::F f;
        std::memcpy(&f, &bits, sizeof f);
        f *= 0x1p+112f;
        const typename V::I was_infnan = f >= 65536.0f;  // all-ones lanes
        typename V::U infnan;
        std::memcpy(&infnan, &was_infnan, sizeof infnan);
        std::memcpy(&bits, &f, sizeof f);
        bits |= (infnan & 0x7F800000u) | ((u & 0x8000u) << 16);
        std::memcpy(w + c, &bits, sizeof bits);
    }
    for (; c < n; ++c) w[c] = fp16(src + 2 * c);
}

// The legacy block types, all of the form x = q * d + m within a block of 32.
enum class Kind { kQ4_0, kQ4_1, kQ5_0, kQ5_1, kQ8_0, kOther };

Kind kind_of(GGMLType type) {
    switch (type) {
        case GGMLType::Q4_0:
            return Kind::kQ4_0;
        case GGMLType::Q4_1:
            return Kind::kQ4_1;
        case GGMLType::Q5_0:
            return Kind::kQ5_0;
        case GGMLType::Q5_1:
            return Kind::kQ5_1;
        case GGMLType::Q8_0:
            return Kind::kQ8_0;
        default:
            return Kind::kOther;
    }
}

bool has_native_dot(GGMLType type) {
    return kind_of(type) != Kind::kOther || type == GGMLType::F32 || type == GGMLType::F16;
}

// Field offsets of each kind's block (dequant.h); kNone where the field does not exist.
constexpr std::size_t kNone = ~std::size_t{0};
template <Kind K>
struct Layout;
template <>
struct Layout<Kind::kQ4_0> {
    using Block = BlockQ4_0;
    static constexpr std::size_t m = kNone, qh = kNone;
};
template <>
struct Layout<Kind::kQ4_1> {
    using Block = BlockQ4_1;
    static constexpr std::size_t m = offsetof(BlockQ4_1, m), qh = kNone;
};
template <>
struct Layout<Kind::kQ5_0> {
    using Block = BlockQ5_0;
    static constexpr std::size_t m = kNone, qh = offsetof(BlockQ5_0, qh);
};
template <>
struct Layout<Kind::kQ5_1> {
    using Block = BlockQ5_1;
    static constexpr std::size_t m = offsetof(BlockQ5_1, m), qh = offsetof(BlockQ5_1, qh);
};
template <>
struct Layout<Kind::kQ8_0> {
    using Block = BlockQ8_0;
    static constexpr std::size_t m = kNone, qh = kNone;
};

// The fp16 field at byte `offset` of g consecutive blocks, converted together (lane-wise).
template <int L>
VQ_ALWAYS_INLINE void block_scales(const uint8_t* blocks, std::size_t block_bytes,
                                   std::size_t offset, int g, float* out) {
    uint16_t h[kScaleGroup];
    for (int i = 0; i < g; ++i) std::memcpy(&h[i], blocks + i * block_bytes + offset, sizeof h[i]);
    f16_row<L>(out, reinterpret_cast<const uint8_t*>(h), g);
}

// d and m of g consecutive blocks such that x = q * d + m: the symmetric kinds centre their
// codes with m = -8d (Q4_0) or -16d (Q5_0), exact in float since q * d and 8d are.
template <int L, Kind K>
VQ_ALWAYS_INLINE void block_affine(const uint8_t* blocks, int g, float* d, float* m) {
    using B = typename Layout<K>::Block;
    block_scales<L>(blocks, sizeof(B), offsetof(B, d), g, d);
    if constexpr (Layout<K>::m != kNone) {
        block_scales<L>(blocks, sizeof(B), Layout<K>::m, g, m);
    } else {
        const float centre = K == Kind::kQ4_0 ? -8.0f : K == Kind::kQ5_0 ? -16.0f : 0.0f;
        for (int i = 0; i < g; ++i) m[i] = centre * d[i];
    }
}

// The 32 codes q of one block as float vectors, in element order.
template <int L, Kind K>
VQ_ALWAYS_INLINE void block_codes(const uint8_t* block, typename Vec<L>::F* q) {
    using B = typename Layout<K>::Block;
    if constexpr (K == Kind::kQ8_0) {
        widen<L, true>(q, block + offsetof(B, qs));
    } else {
        uint8_t nib[kQK];
        const uint8_t* qh = nullptr;
        if constexpr (Layout<K>::qh != kNone) qh = block + Layout<K>::qh;
        block_nibbles(nib, block + offsetof(B, qs), qh);
        widen<L, false>(q, nib);
    }
}

template <int L, Kind K>
VQ_ALWAYS_INLINE void dequant_blocks(const uint8_t* row, float* w, int64_t nb) {
    using B = typename Layout<K>::Block;
    float d[kScaleGroup], m[kScaleGroup];
    for (int64_t b0 = 0; b0 < nb; b0 += kScaleGroup) {
        const int g = static_cast<int>(std::min<int64_t>(kScaleGroup, nb - b0));
        const uint8_t* blk = row + b0 * static_cast<int64_t>(sizeof(B));
        block_affine<L, K>(blk, g, d, m);
        for (int i = 0; i < g; ++i, blk += sizeof(B)) {
            typename Vec<L>::F q[kQK / L];
            block_codes<L, K>(blk, q);
            for (int c = 0; c < kQK / L; ++c)
                store<L>(w + (b0 + i) * kQK + c * L, q[c] * d[i] + m[i]);
        }
    }
}

// One row of `cols` elements to floats: vector code for the native types, else dequantize_row.
template <int L>
VQ_ALWAYS_INLINE void dequant(GGMLType type, const uint8_t* row, float* w, int64_t cols) {
    const int64_t nb = cols / kQK;
    switch (kind_of(type)) {
        case Kind::kQ4_0:
            dequant_blocks<L, Kind::kQ4_0>(row, w, nb);
            return;
        case Kind::kQ4_1:
            dequant_blocks<L, Kind::kQ4_1>(row, w, nb);
            return;
        case Kind::kQ5_0:
            dequant_blocks<L, Kind::kQ5_0>(row, w, nb);
            return;
        case Kind::kQ5_1:
            dequant_blocks<L, Kind::kQ5_1>(row, w, nb);
            return;
        case Kind::kQ8_0:
            dequant_blocks<L, Kind::kQ8_0>(row, w, nb);
            return;
        case Kind::kOther:
            break;
    }
    if (type == GGMLType::F32) {
        std::memcpy(w, row, static_cast<std::size_t>(cols) * sizeof(float));
    } else if (type == GGMLType::F16) {
        f16_row<L>(w, row, cols);
    } else {
        dequantize_row(type, row, w, cols);
    }
}

// Dot products of one row of kind K with N vectors x[v], straight on the blocks:
// sum_b (d_b sum_j q_bj x_bj + m_b xs_b), where xs[v][b] is the sum of x[v] over block b. Each
// block's codes are widened once for all N vectors.
template <int L, Kind K, int N>
VQ_ALWAYS_INLINE void block_dots(const uint8_t* row, int64_t nb, const float* const* x,
                                 const float* const* xs, float* out) {
    using B = typename Layout<K>::Block;
    using F = typename Vec<L>::F;
    constexpr int C = kQK / L;
    F acc[N] = {};
    float offsets[N] = {};
    float d[kScaleGroup], m[kScaleGroup];
    for (int64_t b0 = 0; b0 < nb; b0 += kScaleGroup) {
        const int g = static_cast<int>(std::min<int64_t>(kScaleGroup, nb - b0));
        const uint8_t* blk = row + b0 * static_cast<int64_t>(sizeof(B));
        block_affine<L, K>(blk, g, d, m);
        for (int i = 0; i < g; ++i, blk += sizeof(B)) {
            F q[C];
            block_codes<L, K>(blk, q);
            const int64_t b = b0 + i;
            for (int v = 0; v < N; ++v) {
                F s = {};
                for (int c = 0; c < C; ++c) {
                    F xc;  // one vector at a time: an array here is copied through the stack
                    load<L>(xc, x[v] + b * kQK + c * L);
                    s += q[c] * xc;
                }
                acc[v] += d[i] * s;
                if constexpr (K != Kind::kQ8_0) offsets[v] += m[i] * xs[v][b];
            }
        }
    }
    for (int v = 0; v < N; ++v) {
        float sum = 0.0f;
        for (int j = 0; j < L; ++j) sum += acc[v][j];
        out[v] = sum + offsets[v];
    }
}

// sum_c w[c] x[c] with 4 vector accumulators, then a fixed-order lane sum.
template <int L>
VQ_ALWAYS_INLINE float dot(const float* w, const float* x, int64_t n) {
    using F = typename Vec<L>::F;
    F a0 = {}, a1 = {}, a2 = {}, a3 = {};
    int64_t c = 0;
    for (; c + 4 * L <= n; c += 4 * L) {
        F w0, w1, w2, w3, x0, x1, x2, x3;
        load<L>(w0, w + c), load<L>(w1, w + c + L), load<L>(w2, w + c + 2 * L);
        load<L>(w3, w + c + 3 * L);
        load<L>(x0, x + c), load<L>(x1, x + c + L), load<L>(x2, x + c + 2 * L);
        load<L>(x3, x + c + 3 * L);
        a0 += w0 * x0, a1 += w1 * x1, a2 += w2 * x2, a3 += w3 * x3;
    }
    for (; c + L <= n; c += L) {
        F w0, x0;
        load<L>(w0, w + c), load<L>(x0, x + c);
        a0 += w0 * x0;
    }
    a0 = (a0 + a1) + (a2 + a3);
    float s = 0.0f;
    for (int j = 0; j < L; ++j) s += a0[j];
    for (; c < n; ++c) s += w[c] * x[c];
    return s;
}

// Everything one matmul() call shares with its work units.
struct Task {
    static constexpr int kMaxOuts = 8;
    const MatmulOut* outs;
    int n_outs;
    const float* x;
    int64_t ldx;
    int n;
    const float* xsums;       // [n][cols / 32] block sums of x, for block_dots (n < kMinTiledVecs)
    int64_t tiles[kMaxOuts];  // 16-row tiles of each output
};

// Per-thread scratch, reused across calls (OpenMP keeps its worker threads alive): 0 and 1 for
// the work units (a dequantized row or tile, the transposed tile), 2 for the caller's block sums.
float* thread_scratch(int which, std::size_t n) {
    thread_local std::vector<float> bufs[3];
    if (bufs[which].size() < n) bufs[which].resize(n);
    return bufs[which].data();
}

template <int L, Kind K>
VQ_ALWAYS_INLINE void rows_block_dots(const Task& t, const MatmulOut& o, int64_t r0, int64_t r1) {
    const int64_t nb = o.w->cols / kQK;
    const float* x[kMinTiledVecs];
    const float* xs[kMinTiledVecs];
    for (int v = 0; v < t.n; ++v) x[v] = t.x + v * t.ldx, xs[v] = t.xsums + v * nb;
    for (int64_t r = r0; r < r1; ++r) {
        const uint8_t* row = o.w->data + r * static_cast<int64_t>(o.w->row_bytes);
        float out[kMinTiledVecs];
        static_assert(kMinTiledVecs == 4, "block_dots instantiations cover n = 1, 2, 3");
        switch (t.n) {
            case 1:
                block_dots<L, K, 1>(row, nb, x, xs, out);
                break;
            case 2:
                block_dots<L, K, 2>(row, nb, x, xs, out);
                break;
            default:
                block_dots<L, K, 3>(row, nb, x, xs, out);
                break;
        }
        for (int v = 0; v < t.n; ++v) o.y[v * o.ldy + r] = out[v];
    }
}

// Rows [r0, r1) of one output for few vectors: block-wise dot products for the legacy quantized
// kinds; other types are dequantized a row at a time into L1 and dotted with every vector.
template <int L>
VQ_ALWAYS_INLINE void unit_dots(const Task& t, const MatmulOut& o, int64_t r0, int64_t r1) {
    switch (kind_of(o.w->type)) {
        case Kind::kQ4_0:
            rows_block_dots<L, Kind::kQ4_0>(t, o, r0, r1);
            return;
        case Kind::kQ4_1:
            rows_block_dots<L, Kind::kQ4_1>(t, o, r0, r1);
            return;
        case Kind::kQ5_0:
            rows_block_dots<L, Kind::kQ5_0>(t, o, r0, r1);
            return;
        case Kind::kQ5_1:
            rows_block_dots<L, Kind::kQ5_1>(t, o, r0, r1);
            return;
        case Kind::kQ8_0:
            rows_block_dots<L, Kind::kQ8_0>(t, o, r0, r1);
            return;
        case Kind::kOther:
            break;
    }
    const QMatrix& w = *o.w;
    float* row = thread_scratch(0, static_cast<std::size_t>(w.cols));
    for (int64_t r = r0; r < r1; ++r) {
        dequant<L>(w.type, w.data + r * static_cast<int64_t>(w.row_bytes), row, w.cols);
        for (int v = 0; v < t.n; ++v) o.y[v * o.ldy + r] = dot<L>(row, t.x + v * t.ldx, w.cols);
    }
}

// Register tile: V vectors times 16 weight rows, transposed as wt[k][16]; each output is summed
// over k in order. The shape follows the BLIS micro-kernel (broadcast one activation, multiply a
// column of weights).
template <int L, int V>
VQ_ALWAYS_INLINE void micro_tile(const float* wt, int64_t K, const float* x, int64_t ldx, float* y,
                                 int64_t ldy, int nr) {
    using F = typename Vec<L>::F;
    constexpr int R = kTileRows / L;
    F acc[V][R] = {};
    for (int64_t k = 0; k < K; ++k) {
        F w[R];
        for (int i = 0; i < R; ++i) load<L>(w[i], wt + k * kTileRows + i * L);
        for (int v = 0; v < V; ++v) {
            const float xv = x[v * ldx + k];
            for (int i = 0; i < R; ++i) acc[v][i] += xv * w[i];
        }
    }
    for (int v = 0; v < V; ++v) {
        float out[kTileRows];
        for (int i = 0; i < R; ++i) store<L>(out + i * L, acc[v][i]);
        for (int i = 0; i < nr; ++i) y[v * ldy + i] = out[i];
    }
}

// The last n < V vectors of a tile.
template <int L, int V>
VQ_ALWAYS_INLINE void micro_tail(int n, const float* wt, int64_t K, const float* x, int64_t ldx,
                                 float* y, int64_t ldy, int nr) {
    if constexpr (V > 1) {
        if (n == V - 1) {
            micro_tile<L, V - 1>(wt, K, x, ldx, y, ldy, nr);
        } else {
            micro_tail<L, V - 1>(n, wt, K, x, ldx, y, ldy, nr);
        }
    }
}

// Rows [r0, r1) (at most 16) of one output for many vectors: dequantize and transpose the tile
// once, then run register tiles of V vectors over all n.
template <int L, int V>
VQ_ALWAYS_INLINE void unit_tiles(const Task& t, const MatmulOut& o, int64_t r0, int64_t r1) {
    const QMatrix& w = *o.w;
    const int64_t K = w.cols;
    const int nr = static_cast<int>(r1 - r0);
    const std::size_t need = static_cast<std::size_t>(K) * kTileRows;
    float* rows = thread_scratch(0, need);
    float* wt = thread_scratch(1, need);
    for (int i = 0; i < nr; ++i)
        dequant<L>(w.type, w.data + (r0 + i) * static_cast<int64_t>(w.row_bytes), rows + i * K, K);
    for (int64_t k = 0; k < K; ++k)
        for (int i = 0; i < kTileRows; ++i) wt[k * kTileRows + i] = i < nr ? rows[i * K + k] : 0.0f;
    int v = 0;
    for (; v + V <= t.n; v += V)
        micro_tile<L, V>(wt, K, t.x + v * t.ldx, t.ldx, o.y + v * o.ldy + r0, o.ldy, nr);
    if (v < t.n)
        micro_tail<L, V>(t.n - v, wt, K, t.x + v * t.ldx, t.ldx, o.y + v * o.ldy + r0, o.ldy, nr);
}

template <int L, int V>
VQ_ALWAYS_INLINE void run_unit(const Task& t, int64_t unit) {
    int j = 0;
    while (unit >= t.tiles[j]) unit -= t.tiles[j++];
    const MatmulOut& o = t.outs[j];
    const int64_t r0 = unit * kTileRows;
    const int64_t r1 = std::min(r0 + kTileRows, o.w->rows);
    if (t.n >= kMinTiledVecs) {
        unit_tiles<L, V>(t, o, r0, r1);
    } else {
        unit_dots<L>(t, o, r0, r1);
    }
}

using UnitFn = void (*)(const Task&, int64_t);

// 128-bit vectors: 2 vectors x 4 rows of accumulators leave room in 16 SSE registers.
void run_unit_generic(const Task& t, int64_t unit) {
    run_unit<4, 2>(t, unit);
}

#ifdef VQ_X86_KERNELS
// The same code for 256-bit vectors with FMA (4 x 2 accumulators) and for 512-bit vectors
// (8 x 1 accumulators); only called when the CPU (and OS) report the features.
VQ_TARGET_AVX2 void run_unit_avx2(const Task& t, int64_t unit) {
    run_unit<8, 4>(t, unit);
}

VQ_TARGET_AVX512 void run_unit_avx512(const Task& t, int64_t unit) {
    run_unit<16, 8>(t, unit);
}
#endif

// The kernel of the CPU kernel set in use.
UnitFn unit_kernel() {
    return VQ_KERNEL_FOR_ISA(run_unit_generic, run_unit_avx2, run_unit_avx512);
}

[[noreturn]] void fail(const std::string& msg) {
    throw std::invalid_argument("matmul: " + msg);
}

}  // namespace

bool matmul_supports(GGMLType type) {
    return has_native_dot(type) || ggml_can_dequantize(type);
}

QMatrix QMatrix::from_tensor(const GGUFTensor& tensor) {
    if (tensor.dims.size() != 2) {
        fail("tensor '" + tensor.name + "' has " + std::to_string(tensor.dims.size()) +
             " dimensions, a weight matrix needs 2");
    }
    if (!matmul_supports(tensor.type)) {
        fail("tensor '" + tensor.name + "' has type " + ggml_type_name(tensor.type) +
             ", which matmul does not support");
    }
    QMatrix m;
    m.type = tensor.type;
    m.data = tensor.data;
    m.cols = tensor.dims[0];
    m.rows = tensor.dims[1];
    m.row_bytes = ggml_row_bytes(tensor.type, m.cols);
    if (m.nbytes() != tensor.nbytes) fail("tensor '" + tensor.name + "' has an inconsistent size");
    return m;
}

void matmul(const MatmulOut* outs, int n_outs, const float* x, int64_t ldx, int n) {
    if (outs == nullptr || n_outs < 1 || n_outs > Task::kMaxOuts)
        fail("need 1 to " + std::to_string(Task::kMaxOuts) + " outputs");
    if (x == nullptr || n < 1) fail("need a non-null input of at least one vector");
    if (outs[0].w == nullptr) fail("null weight matrix");
    const int64_t cols = outs[0].w->cols;
    if (ldx < cols)
        fail("input stride " + std::to_string(ldx) + " < columns " + std::to_string(cols));
    Task t{outs, n_outs, x, ldx, n, nullptr, {}};
    int64_t units = 0;
    bool block_kinds = false;
    for (int j = 0; j < n_outs; ++j) {
        const MatmulOut& o = outs[j];
        if (o.w == nullptr || o.y == nullptr) fail("null weight matrix or output");
        if (o.w->cols != cols) fail("outputs sharing an input must have equal column counts");
        if (o.ldy < o.w->rows) fail("output stride smaller than the row count");
        if (!matmul_supports(o.w->type))
            fail(std::string("unsupported weight type ") + ggml_type_name(o.w->type));
        if (o.w->row_bytes != ggml_row_bytes(o.w->type, cols)) fail("inconsistent row size");
        block_kinds = block_kinds || kind_of(o.w->type) != Kind::kOther;
        t.tiles[j] = (o.w->rows + kTileRows - 1) / kTileRows;
        units += t.tiles[j];
    }
    if (block_kinds && n < kMinTiledVecs) {  // cols is a multiple of 32 for these kinds
        const int64_t nb = cols / kQK;
        float* xs = thread_scratch(2, static_cast<std::size_t>(n * nb));
        for (int v = 0; v < n; ++v)
            for (int64_t b = 0; b < nb; ++b) {
                float sum = 0.0f;
                for (int i = 0; i < kQK; ++i) sum += x[v * ldx + b * kQK + i];
                xs[v * nb + b] = sum;
            }
        t.xsums = xs;
    }
    const UnitFn fn = unit_kernel();
    // Dynamic: a thread that loses its core (a busy machine) delays its current unit, not half.
#pragma omp parallel for schedule(dynamic) if (units > 1)
    for (int64_t u = 0; u < units; ++u) fn(t, u);
}

void matmul(const QMatrix& w, const float* x, int n, float* y) {
    const MatmulOut out{&w, y, w.rows};
    matmul(&out, 1, x, w.cols, n);
}

}  // namespace veloxquant
