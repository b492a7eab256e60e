// Building blocks of the device codecs: plain C++ that compiles for the host (g++, tested against
// the CPU codecs in CI) and for the GPU (nvcc, one thread per token).
//
// A device codec mirrors one CPU codec (src/methods/) in a form a CUDA thread can run: a POD
// `Params` whose arrays live in one ParamArena (uploaded once), and free functions that encode,
// decode and score one token. Operations follow the CPU code's order, so codes are identical
// wherever the math is deterministic (nvcc compiles the encoders with --fmad=false).
//
// The key-codec concept (see tq_device.h for a complete example):
//   struct XDevice {
//     struct Params { ...; void rebase(const uint8_t* base); };      // POD, arena pointers
//     static Params build(const KeyCodec& cpu, ParamArena& arena);   // host, from the CPU codec
//     VQ_HD static int code_bytes(const Params&);   // == cpu.code_bytes()
//     VQ_HD static int num_scalars(const Params&);  // == cpu.num_scalars()
//     VQ_HD static int state_floats(const Params&); // <= kMaxStateFloats
//     VQ_HD static void encode(const Params&, const float* key, int pos, uint8_t* code,
//                              float* scalars, int stride);   // writes every code byte
//     VQ_HD static void decode(const Params&, const uint8_t* code, const float* scalars,
//                              int stride, int pos, float* key);
//     VQ_HD static void prepare(const Params&, const float* query, float* state);
//     template <int R>   // <q_r, decode(code)> for R query rows at once (see below)
//     VQ_HD static void score(const Params&, const float* state, const uint8_t* code,
//                             const float* scalars, int stride, int pos, float (&out)[R]);
//   };
// Scalar s of a token is scalars[s * stride] (the page's structure-of-arrays layout); pos is the
// token's position (only position-relative codecs such as commvq use it).
//
// Optionally, a codec whose score looks up a query-independent table for every field (its
// codebooks) names it, and the attention kernel keeps a copy in shared memory (HasTable):
//     VQ_HD static int table_floats(const Params&);
//     VQ_HD static const float*& table(Params&);   // the pointer score reads it through
//
// Optionally, a codec whose score is, for query row r,
//     score_r = state_r[extra] + factor * sum_{i < F} f_i state_r[offset + i]
// with features f of the token's code (and position) alone, an extra state entry picked by the
// code (or none) and a factor from its scalars, names that form, and the attention kernels then
// score tokens on tensor cores (HasFeatures): the wide prefill kernel (src/cuda/codec_prefill.cuh)
// a page of features against 64 query rows, for every codec that names it; the decode kernels
// (src/cuda/codec_feature_scores.cuh) 16 tokens against up to 8 rows, for fp16 and qjl only
// (for the others decoding features for so few rows cost more than lane scores: codec_backend.cu):
//     static constexpr int kFeatureGroup;   // features per features() call: 8 or 16
//     VQ_HD static int feature_offset(const Params&);    // state entry of feature 0
//     VQ_HD static int feature_count(const Params&);     // F
//     VQ_HD static bool features_usable(const Params&);  // whether these Params have the form
//     VQ_HD static void features(const Params&, const uint8_t* code, int pos, int group,
//                                float* f);  // f_i for i = group * kFeatureGroup + 0, 1, ...
//                                            // (those past F need not be written)
//     VQ_HD static float feature_factor(const float* scalars);   // scalars as score's
//     VQ_HD static int extra_entry(const Params&, const uint8_t* code);  // -1: none
// A codec whose code bytes are its features as fp16 (kFeaturesInPlace = true) is read in place.
// A codec whose features are always exact in fp16 (kExactHalfFeatures = true: stored halves,
// signs, small integer levels) lets the wide prefill kernel skip their low halves (the others'
// features go to it as an fp16 high half and the fp16 rounding of the rest, as the states do).
// tests/device_codec_test_helpers.h checks the form against score_one for every such codec.
//
// score takes R rows' states interleaved, entry i of row r at state[i * R + r] (R = 1: prepare's
// layout), so that one pass over a token's code serves every query row of a KV head (the
// grouped-query heads of a decode step, or a prefill chunk's queries): the unpacking and table
// lookups are paid once per token, and each state entry costs one vector load and R FMAs
// (fma_rows). Tables that do not depend on the query (codebooks) are best read from Params
// (cached, not repeated per row); score_one is the single-row form the host tests call.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "core/half.h"
#include "core/host_device.h"

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#endif

namespace veloxquant {
class Rotation;
}

namespace veloxquant::dev {

/// Largest head dim of the device codecs (per-thread scratch is sized by it).
constexpr int kMaxDim = 256;
/// Largest per-query state of a device key codec, in floats (it lives in shared memory).
constexpr int kMaxStateFloats = 8192;
/// Largest query-state matrix (state floats x d) per head whose affine form state = c + M q
/// the device backend precomputes and evaluates in parallel (src/cuda/affine_state.h); a
/// larger state is built by one thread per query row, serially.
constexpr int kMaxAffineFloats = 65536;

/// Host side: the parameter arrays of a cache's codecs, packed into one buffer. add() returns
/// the array's offset disguised as a pointer; Params::rebase(base) turns every such offset into
/// base + offset once the buffer's final address (host or device) is known.
class ParamArena {
public:
    template <class T>
    const T* add(const T* data, std::size_t n) {
        const std::size_t at = (bytes_.size() + 15) / 16 * 16;
        bytes_.resize(at + n * sizeof(T));
        if (n > 0) std::memcpy(bytes_.data() + at, data, n * sizeof(T));
        return reinterpret_cast<const T*>(at);
    }
    template <class T>
    const T* add(const std::vector<T>& v) {
        return add(v.data(), v.size());
    }
    const std::vector<uint8_t>& bytes() const { return bytes_; }

private:
    std::vector<uint8_t> bytes_;
};

template <class T>
inline void rebase(const T*& p, const uint8_t* base) {
    p = reinterpret_cast<const T*>(base + reinterpret_cast<std::uintptr_t>(p));
}

// ---------------------------------------------------------------------------------------------
// Bit packing (src/core/bitpack.h): LSB-first streams of fields of 1..16 bits (a field then
// touches at most three bytes, e.g. vecinfer's 11-bit indices).

/// The `bits`-bit field that starts at bit `bit` of the stream (widths may vary along it).
VQ_HD uint32_t read_field(const uint8_t* packed, int bit, int bits) {
    const int byte = bit >> 3, shift = bit & 7;
    uint32_t word = packed[byte];
    if (shift + bits > 8) word |= static_cast<uint32_t>(packed[byte + 1]) << 8;
    if (shift + bits > 16) word |= static_cast<uint32_t>(packed[byte + 2]) << 16;
    return (word >> shift) & ((1u << bits) - 1u);
}

/// ORs a `bits`-bit field at bit `bit` into a zeroed stream.
VQ_HD void or_field(uint8_t* packed, int bit, int bits, uint32_t v) {
    const int byte = bit >> 3, shift = bit & 7;
    const uint32_t w = v << shift;
    packed[byte] |= static_cast<uint8_t>(w & 0xffu);
    if (shift + bits > 8) packed[byte + 1] |= static_cast<uint8_t>((w >> 8) & 0xffu);
    if (shift + bits > 16) packed[byte + 2] |= static_cast<uint8_t>(w >> 16);
}

/// Index i of a stream of `bits`-bit indices.
VQ_HD uint32_t read_bits(const uint8_t* packed, int i, int bits) {
    return read_field(packed, i * bits, bits);
}

/// ORs index i into a zeroed stream.
VQ_HD void or_bits(uint8_t* packed, int i, int bits, uint32_t v) {
    or_field(packed, i * bits, bits, v);
}

VQ_HD void zero_bytes(uint8_t* p, int n) {
    for (int i = 0; i < n; ++i) p[i] = 0;
}

VQ_HD int packed_size(int n, int bits) {
    return (n * bits + 7) / 8;
}

/// Index of the nearest of ascending centroids given the n - 1 midpoints between them: the
/// first boundary >= x (ScalarCodebook::quantize; ties go to the lower cell).
VQ_HD int quantize_sorted(const float* boundaries, int n_boundaries, float x) {
    int lo = 0, hi = n_boundaries;
    while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        if (boundaries[mid] < x)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/// The N <= 4 bytes at p as a little-endian word: on the device one load where p is aligned to
/// N (2 or 4; the kernels' staged rows are 4-byte aligned), else byte by byte.
template <int N>
VQ_HD uint32_t load_bytes_le(const uint8_t* p) {
    static_assert(N >= 1 && N <= 4, "at most one 32-bit word");
#if defined(__CUDA_ARCH__)
    if constexpr (N == 2 || N == 4)
        if ((reinterpret_cast<std::uintptr_t>(p) & (N - 1)) == 0)
            return N == 4 ? *reinterpret_cast<const uint32_t*>(p)
                          : *reinterpret_cast<const uint16_t*>(p);
#endif
    uint32_t w = 0;
    for (int i = 0; i < N; ++i) w |= static_cast<uint32_t>(p[i]) << (8 * i);
    return w;
}

/// Fields 8 g .. 8 g + 7 of a stream of B-bit fields, B in 1..4 known at compile time: group g
/// is the B bytes starting at byte g B, read once and cut at constant shifts.
template <int B>
VQ_HD void read_group8(const uint8_t* packed, int g, uint32_t (&f)[8]) {
    static_assert(B >= 1 && B <= 4, "eight fields of at most 4 bits fit one 32-bit word");
    const uint32_t w = load_bytes_le<B>(packed + g * B);
    for (int k = 0; k < 8; ++k) f[k] = (w >> (k * B)) & ((1u << B) - 1u);
}

/// Reads consecutive fields of 1..16 bits (widths may vary) from an LSB-first stream that ends at
/// `end`, loading each byte once: the sequential form of read_field for the scoring loops. Once
/// the read position is 4-byte aligned with a word left before `end` (staged code rows are
/// aligned) the buffer takes 32 bits at a time, one load and one branch for every 32 bits of
/// fields; before that and in the last three bytes it takes single bytes. It never reads at or
/// past `end` (the caller reads only the fields its stream holds).
struct FieldReader {
    const uint8_t* next_byte;
    const uint8_t* end;
    uint64_t buffer = 0;  ///< the not yet consumed bits, LSB first
    int held = 0;         ///< how many bits buffer holds (under 16 + 32 between calls)

    /// A reader positioned at bit `bit` of the stream [packed, end).
    VQ_HD FieldReader(const uint8_t* packed, const uint8_t* stream_end, int bit = 0)
        : next_byte(packed + (bit >> 3)), end(stream_end) {
        if ((bit & 7) != 0) {
            buffer = static_cast<uint64_t>(*next_byte++ >> (bit & 7));
            held = 8 - (bit & 7);
        }
    }
    VQ_HD uint32_t next(int bits) {
        while (held < bits) {  // held < 16: room for a word
            if (end - next_byte >= 4 && (reinterpret_cast<std::uintptr_t>(next_byte) & 3) == 0) {
                buffer |= static_cast<uint64_t>(load_bytes_le<4>(next_byte)) << held;
                next_byte += 4;
                held += 32;
            } else {
                buffer |= static_cast<uint64_t>(*next_byte++) << held;
                held += 8;
            }
        }
        const uint32_t v = static_cast<uint32_t>(buffer) & ((1u << bits) - 1u);
        buffer >>= bits;
        held -= bits;
        return v;
    }
};

// ---------------------------------------------------------------------------------------------
// Several query rows at once (the score concept above): entry i of row r at state[i * R + r].

/// x[r] = rows[r]: the R rows' values of one state entry (rows = state + i * R), or any R floats
/// at a 16-byte aligned address (a commvq codeword). On the device a multiple of 4 is read as
/// float4 (the kernels keep states 16-byte aligned).
template <int R>
VQ_HD void load_rows(const float* rows, float (&x)[R]) {
#if defined(__CUDA_ARCH__)
    if constexpr (R % 4 == 0) {
#pragma unroll
        for (int r = 0; r < R; r += 4) {
            const float4 v = *reinterpret_cast<const float4*>(rows + r);
            x[r] = v.x, x[r + 1] = v.y, x[r + 2] = v.z, x[r + 3] = v.w;
        }
    } else
#endif
    {
        for (int r = 0; r < R; ++r) x[r] = rows[r];
    }
}

/// a * b + c, fused on the device even where the file is compiled with --fmad=false (which
/// keeps the encoders' rounding the CPU's): scoring and attention sums want the one instruction.
VQ_HD float fmadd(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
    return __fmaf_rn(a, b, c);
#else
    return a * b + c;
#endif
}

/// acc[r] += x * rows[r] for each row (x is the token's factor of that state entry).
template <int R>
VQ_HD void fma_rows(float (&acc)[R], float x, const float* rows) {
    float s[R];
    load_rows<R>(rows, s);
    for (int r = 0; r < R; ++r) acc[r] = fmadd(x, s[r], acc[r]);
}

/// Whether Codec names a table for shared memory (table_floats and table, see above).
template <class Codec, class = void>
struct HasTable : std::false_type {};
template <class Codec>
struct HasTable<Codec, std::void_t<decltype(Codec::table_floats(
                           std::declval<const typename Codec::Params&>()))>> : std::true_type {};

/// Features whose magnitude may reach this are not offered to the fp16 tile (features_usable):
/// the largest finite half is 65504.
constexpr float kFeatureHalfLimit = 65504.0f;

/// Whether Codec names the feature form of its score (see above).
template <class Codec, class = void>
struct HasFeatures : std::false_type {};
template <class Codec>
struct HasFeatures<Codec, std::void_t<decltype(Codec::kFeatureGroup)>> : std::true_type {};

/// Whether Codec's features are exact in fp16 (see above).
template <class Codec, class = void>
struct ExactHalfFeatures : std::false_type {};
template <class Codec>
struct ExactHalfFeatures<Codec, std::void_t<decltype(Codec::kExactHalfFeatures)>>
    : std::bool_constant<Codec::kExactHalfFeatures> {};

/// Floats of Codec's table (0 without one).
template <class Codec>
VQ_HD int table_floats_of(const typename Codec::Params& p) {
    if constexpr (HasTable<Codec>::value)
        return Codec::table_floats(p);
    else
        return 0;
}

/// The score of one query row (prepare's state layout).
template <class Codec>
VQ_HD float score_one(const typename Codec::Params& p, const float* state, const uint8_t* code,
                      const float* scalars, int stride, int pos) {
    float out[1];
    Codec::template score<1>(p, state, code, scalars, stride, pos, out);
    return out[0];
}

// ---------------------------------------------------------------------------------------------
// fp16 (round to nearest even), as src/core/half.h.

#if defined(__CUDACC__)
// Not inlined on purpose: inlined, the compiler (CUDA 13.0, sm_90; also with the conversion as
// inline PTX, so the fold is in ptxas) turns __half_as_ushort(__float2half_rn(f)) & 0xff into one
// float -> u8 conversion of f, so a half written byte by byte came out wrong (measured on the
// H200: 1.0f gave the bytes 01 3c). A call keeps the conversion whole.
static __device__ __noinline__ uint16_t device_float_to_half(float f) {
    return __half_as_ushort(__float2half_rn(f));
}
#endif

VQ_HD uint16_t float_to_half_bits(float f) {
#if defined(__CUDA_ARCH__)
    return device_float_to_half(f);
#else
    return float_to_half(f);
#endif
}

VQ_HD float half_bits_to_float(uint16_t h) {
#if defined(__CUDA_ARCH__)
    return __half2float(__ushort_as_half(h));
#else
    return half_to_float(h);
#endif
}

// ---------------------------------------------------------------------------------------------
// Rotations (src/core/rotation.h): the randomized Walsh-Hadamard transform or a dense matrix,
// with the CPU's operation order.

struct RotationParams {
    int d = 0;
    int hadamard = 0;
    const float* signs = nullptr;   ///< [d] (Hadamard)
    const float* matrix = nullptr;  ///< [d][d] row-major (dense)
    void rebase(const uint8_t* base) { dev::rebase(hadamard ? signs : matrix, base); }
};

/// Host: the arrays of a CPU rotation.
RotationParams build_rotation(const Rotation& rotation, ParamArena& arena);

/// fwht_orthonormal: butterflies of length 1, 2, 4, ... (a + b, a - b), then 1 / sqrt(n).
VQ_HD void fwht(float* x, int n) {
    for (int len = 1; len < n; len <<= 1)
        for (int i = 0; i < n; i += len << 1)
            for (int j = i; j < i + len; ++j) {
                const float a = x[j], b = x[j + len];
                x[j] = a + b;
                x[j + len] = a - b;
            }
    const float scale = 1.0f / sqrtf(static_cast<float>(n));
    for (int i = 0; i < n; ++i) x[i] *= scale;
}

// The rotations read x and write y as separate arrays, so that a one-thread encoder's stack
// holds no copy of its vector: the driver reserves every kernel's largest per-thread stack for
// all 2048 threads of every SM (1 KB of stack = 264 MiB on the H200). The _in_place forms keep
// that copy for the callers that rotate a vector into itself.

/// y = R (x * s) (s null: y = R x), each product rounded to float first; x and y distinct.
VQ_HD void rotate_forward(const RotationParams& r, const float* x, float* y,
                          const float* s = nullptr) {
    const int d = r.d;
    if (r.hadamard) {
        for (int i = 0; i < d; ++i) y[i] = (s != nullptr ? x[i] * s[i] : x[i]) * r.signs[i];
        fwht(y, d);
        return;
    }
    for (int i = 0; i < d; ++i) {
        const float* row = r.matrix + static_cast<std::size_t>(i) * d;
        float acc = 0.0f;
        for (int k = 0; k < d; ++k) acc += row[k] * (s != nullptr ? x[k] * s[k] : x[k]);
        y[i] = acc;
    }
}

/// x = R^T y; x and y distinct.
VQ_HD void rotate_inverse(const RotationParams& r, const float* y, float* x) {
    const int d = r.d;
    if (r.hadamard) {
        for (int i = 0; i < d; ++i) x[i] = y[i];
        fwht(x, d);
        for (int i = 0; i < d; ++i) x[i] *= r.signs[i];
        return;
    }
    for (int k = 0; k < d; ++k) x[k] = 0.0f;
    for (int i = 0; i < d; ++i) {
        const float* row = r.matrix + static_cast<std::size_t>(i) * d;
        const float yi = y[i];
        for (int k = 0; k < d; ++k) x[k] += row[k] * yi;
    }
}

/// x = R^T x.
VQ_HD void rotate_inverse_in_place(const RotationParams& r, float* x) {
    if (r.hadamard) {
        fwht(x, r.d);
        for (int i = 0; i < r.d; ++i) x[i] *= r.signs[i];
        return;
    }
    float copy[kMaxDim];
    for (int i = 0; i < r.d; ++i) copy[i] = x[i];
    rotate_inverse(r, copy, x);
}

}  // namespace veloxquant::dev
