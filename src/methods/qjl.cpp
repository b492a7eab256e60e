#include "methods/qjl.h"

#include <cmath>
#include <stdexcept>
#include <string>

#include "core/bitpack.h"
#include "core/rng.h"
#include "methods/byte_table_sums.h"
#include "methods/nibble_table_sums.h"

namespace veloxquant {
namespace {

constexpr double kSqrtHalfPi = 1.2533141373155002512;  // sqrt(pi / 2)

int validated_dim(int d, int sketch_dim) {
    if (d < QJLCodec::kMinDim || d > QJLCodec::kMaxDim)
        throw std::invalid_argument("qjl: head dim must be in 2..1024, got " + std::to_string(d));
    if (sketch_dim < 1 || sketch_dim > QJLCodec::kMaxSketchDim)
        throw std::invalid_argument("qjl: sketch_dim must be in 1..8192, got " +
                                    std::to_string(sketch_dim));
    return d;
}

}  // namespace

QJLCodec::QJLCodec(int d, int sketch_dim, uint64_t seed)
    : KeyCodec(validated_dim(d, sketch_dim)),
      m_(sketch_dim),
      sketch_(static_cast<std::size_t>(sketch_dim) * d) {
    Rng rng(seed);
    for (auto& s : sketch_) s = static_cast<float>(rng.normal());
}

std::size_t QJLCodec::code_bytes() const {
    return packed_bytes(m_, 1);
}

void QJLCodec::encode(const float* keys, int n, uint8_t* codes, float* scalars,
                      std::size_t /*scalar_stride: one scalar, at scalars[t]*/) const {
    const int d = dim();
    const std::size_t cb = code_bytes();
    for (int t = 0; t < n; ++t) {
        const float* k = keys + static_cast<std::size_t>(t) * d;
        uint8_t* code = codes + t * cb;
        double norm2 = 0.0;
        for (int j = 0; j < d; ++j) norm2 += static_cast<double>(k[j]) * k[j];
        scalars[t] = static_cast<float>(std::sqrt(norm2));
        for (std::size_t b = 0; b < cb; ++b) code[b] = 0;
        // Four rows at a time: four independent sums (each over j in order), so the additions'
        // latency overlaps; the operations are one row's.
        const auto sign_bit = [&](int i, double acc) {
            if (acc >= 0.0) code[i >> 3] |= static_cast<uint8_t>(1u << (i & 7));
        };
        int i = 0;
        for (; i + 4 <= m_; i += 4) {
            const float* r0 = &sketch_[static_cast<std::size_t>(i) * d];
            const float *r1 = r0 + d, *r2 = r1 + d, *r3 = r2 + d;
            double a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0;
            for (int j = 0; j < d; ++j) {
                const double kj = k[j];
                a0 += static_cast<double>(r0[j]) * kj;
                a1 += static_cast<double>(r1[j]) * kj;
                a2 += static_cast<double>(r2[j]) * kj;
                a3 += static_cast<double>(r3[j]) * kj;
            }
            sign_bit(i, a0);
            sign_bit(i + 1, a1);
            sign_bit(i + 2, a2);
            sign_bit(i + 3, a3);
        }
        for (; i < m_; ++i) {
            const float* row = &sketch_[static_cast<std::size_t>(i) * d];
            double acc = 0.0;
            for (int j = 0; j < d; ++j) acc += static_cast<double>(row[j]) * k[j];
            sign_bit(i, acc);
        }
    }
}

void QJLCodec::decode(const uint8_t* codes, const float* scalars, std::size_t /*scalar_stride*/,
                      int n, float* keys) const {
    const int d = dim();
    const std::size_t cb = code_bytes();
    const float scale = static_cast<float>(kSqrtHalfPi / m_);
    for (int t = 0; t < n; ++t) {
        const uint8_t* code = codes + t * cb;
        float* out = keys + static_cast<std::size_t>(t) * d;
        for (int j = 0; j < d; ++j) out[j] = 0.0f;
        // S^T sign(S k), accumulated row by row.
        for (int i = 0; i < m_; ++i) {
            const float s = (code[i >> 3] >> (i & 7)) & 1u ? 1.0f : -1.0f;
            const float* row = &sketch_[static_cast<std::size_t>(i) * d];
            for (int j = 0; j < d; ++j) out[j] += s * row[j];
        }
        const float f = scalars[t] * scale;
        for (int j = 0; j < d; ++j) out[j] *= f;
    }
}

std::size_t QJLCodec::query_state_size() const {
    return 1 + code_bytes() * 256;  // the tables' kind, then the byte tables (the larger kind)
}

void QJLCodec::prepare_query(const float* query, float* state) const {
    const int d = dim();
    const double scale = kSqrtHalfPi / m_;
    const std::size_t cb = code_bytes();
    // A table per nibble (16 entries, nibble_table_sums) where that has a SIMD build, else per
    // byte (256 entries, byte_table_sums). With v[b] = scale * (S q)_i for the table's rows i
    // (rows past m, the last byte's padding, contribute nothing): LUT[0] = -sum of v, and
    // setting bit b flips term b from -v[b] to +v[b].
    const bool nibbles = nibble_tables_are_faster();
    state[0] = nibbles ? 1.0f : 0.0f;
    const int bits = nibbles ? 4 : 8, entries = 1 << bits;
    for (std::size_t p = 0; p < cb * 8 / bits; ++p) {
        float vp[8] = {};
        for (int b = 0; b < bits; ++b) {
            const int i = static_cast<int>(p) * bits + b;
            if (i >= m_) break;
            const float* row = &sketch_[static_cast<std::size_t>(i) * d];
            double acc = 0.0;
            for (int j = 0; j < d; ++j) acc += static_cast<double>(row[j]) * query[j];
            vp[b] = static_cast<float>(scale * acc);
        }
        float* lut = state + 1 + p * entries;
        float base = 0.0f;
        for (int b = 0; b < bits; ++b) base -= vp[b];
        lut[0] = base;
        for (int code = 1; code < entries; ++code) {
            const int low = code & -code;
            lut[code] = lut[code ^ low] + 2.0f * vp[__builtin_ctz(static_cast<unsigned>(code))];
        }
    }
}

void QJLCodec::score(const float* state, const uint8_t* codes, const float* scalars,
                     std::size_t scalar_stride, int n, float* scores) const {
    score_rows_at(state, 0, 1, codes, scalars, scalar_stride, n, 0, scores, 0);
}

void QJLCodec::score_rows_at(const float* states, std::size_t state_stride, int rows,
                             const uint8_t* codes, const float* scalars,
                             std::size_t /*scalar_stride*/, int n, int /*pos0*/, float* scores,
                             std::size_t score_stride) const {
    const std::size_t cb = code_bytes();
    bool all_nibbles = true;
    for (int r = 0; r < rows && all_nibbles; ++r) all_nibbles = states[r * state_stride] != 0.0f;
    if (all_nibbles)  // the rows' nibbles taken out of the codes once
        nibble_table_sums(states + 1, state_stride, rows, codes, cb, cb, n, scores, score_stride);
    else
        for (int r = 0; r < rows; ++r)
            byte_table_sums(states + r * state_stride + 1, codes, cb, cb, n, 1,
                            scores + r * score_stride);
    for (int r = 0; r < rows; ++r)
        for (int t = 0; t < n; ++t) scores[r * score_stride + t] *= scalars[t];
}

std::size_t QJLCodec::parameter_bytes() const {
    return sketch_.size() * sizeof(float);
}

}  // namespace veloxquant
