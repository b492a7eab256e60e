#include "methods/polarquant.h"

#include <cmath>
#include <stdexcept>
#include <string>

#include "core/bitpack.h"
#include "core/half.h"
#include "methods/polar_scores.h"

namespace veloxquant {
namespace {

constexpr double kTwoPi = 6.283185307179586476925;

int validated_dim(int d, int bits) {
    if (d < PolarQuantCodec::kBlock || d > PolarQuantCodec::kMaxDim ||
        d % PolarQuantCodec::kBlock != 0)
        throw std::invalid_argument("polarquant: head dim " + std::to_string(d) +
                                    " must be a multiple of 16 in 16..1024 (4 polar levels)");
    if (bits < PolarQuantCodec::kMinBits || bits > PolarQuantCodec::kMaxBits)
        throw std::invalid_argument("polarquant: bits must be in 1..6, got " +
                                    std::to_string(bits));
    return d;
}

}  // namespace

PolarQuantCodec::PolarQuantCodec(int d, int bits, bool use_hadamard, uint64_t seed)
    : KeyCodec(validated_dim(d, bits)),
      bits_(bits),
      rotation_(d, use_hadamard, seed),
      level1_bytes_(packed_bytes(d / 2, bits + 2)),
      upper_bytes_(packed_bytes(d / 4 + d / 8 + d / 16, bits)) {
    for (int level = 1; level <= kLevels; ++level) {
        codebooks_[level - 1] = &polar_angle_codebook(level, level_bits(level));
        for (float c : codebooks_[level - 1]->centroids) {
            cos_[level - 1].push_back(static_cast<float>(std::cos(static_cast<double>(c))));
            sin_[level - 1].push_back(static_cast<float>(std::sin(static_cast<double>(c))));
        }
    }
}

std::size_t PolarQuantCodec::code_bytes() const {
    return level1_bytes_ + upper_bytes_ + 2 * static_cast<std::size_t>(dim() / kBlock);
}

void PolarQuantCodec::encode(const float* keys, int n, uint8_t* codes, float* scalars,
                             std::size_t /*scalar_stride: one scalar, at scalars[t]*/) const {
    const int d = dim();
    const std::size_t cb = code_bytes();
    std::vector<float> y(d);
    std::vector<double> r(d / 2);
    std::vector<uint8_t> idx(level_offset(d, kLevels + 1));
    for (int t = 0; t < n; ++t) {
        const float* k = keys + static_cast<std::size_t>(t) * d;
        uint8_t* code = codes + t * cb;
        double norm2 = 0.0;
        for (int j = 0; j < d; ++j) norm2 += static_cast<double>(k[j]) * k[j];
        const double norm = std::sqrt(norm2);
        scalars[t] = static_cast<float>(norm);
        rotation_.forward(k, y.data());

        // Level 1: full-circle angles of coordinate pairs.
        const ScalarCodebook& cb1 = *codebooks_[0];
        for (int j = 0; j < d / 2; ++j) {
            const double a = y[2 * j], b = y[2 * j + 1];
            double theta = std::atan2(b, a);
            if (theta < 0.0) theta += kTwoPi;
            idx[j] = cb1.quantize(static_cast<float>(theta));
            r[j] = std::hypot(a, b);
        }
        // Levels 2..4: angles of pairs of non-negative radii, in [0, pi/2]; r shrinks in place.
        for (int level = 2, len = d / 4; level <= kLevels; ++level, len /= 2) {
            const ScalarCodebook& cbl = *codebooks_[level - 1];
            uint8_t* out = &idx[level_offset(d, level)];
            for (int j = 0; j < len; ++j) {
                out[j] = cbl.quantize(static_cast<float>(std::atan2(r[2 * j + 1], r[2 * j])));
                r[j] = std::hypot(r[2 * j], r[2 * j + 1]);
            }
        }
        pack_bits(idx.data(), d / 2, bits_ + 2, code);
        pack_bits(&idx[d / 2], level_offset(d, kLevels + 1) - d / 2, bits_, code + level1_bytes_);
        // Radii relative to ||k|| lie in [0, 1], where fp16 keeps ~3 significant digits.
        uint8_t* radii = code + level1_bytes_ + upper_bytes_;
        const double inv = norm > 0.0 ? 1.0 / norm : 0.0;
        for (int j = 0; j < d / kBlock; ++j) {
            const uint16_t h = float_to_half(static_cast<float>(r[j] * inv));
            radii[2 * j] = static_cast<uint8_t>(h & 0xFFu);
            radii[2 * j + 1] = static_cast<uint8_t>(h >> 8);
        }
    }
}

void PolarQuantCodec::unpack_indices(const uint8_t* code, uint8_t* indices) const {
    const int d = dim();
    unpack_bits(code, d / 2, bits_ + 2, indices);
    unpack_bits(code + level1_bytes_, level_offset(d, kLevels + 1) - d / 2, bits_, indices + d / 2);
}

float PolarQuantCodec::relative_radius(const uint8_t* code, int j) const {
    const uint8_t* radii = code + level1_bytes_ + upper_bytes_;
    return half_to_float(static_cast<uint16_t>(radii[2 * j] | (radii[2 * j + 1] << 8)));
}

void PolarQuantCodec::decode(const uint8_t* codes, const float* scalars,
                             std::size_t /*scalar_stride*/, int n, float* keys) const {
    const int d = dim();
    const std::size_t cb = code_bytes();
    std::vector<uint8_t> idx(level_offset(d, kLevels + 1));
    std::vector<float> y(d);
    for (int t = 0; t < n; ++t) {
        const uint8_t* code = codes + t * cb;
        unpack_indices(code, idx.data());
        for (int j = 0; j < d / kBlock; ++j) {
            // Inverse polar transform of one block, top-down: each radius splits into
            // (r cos psi, r sin psi); expanding in place from the back keeps unread entries.
            float* r = &y[static_cast<std::size_t>(j) * kBlock];
            r[0] = scalars[t] * relative_radius(code, j);
            for (int level = kLevels, width = 1; level >= 1; --level, width *= 2) {
                const uint8_t* a = &idx[level_offset(d, level) + j * width];
                const float* c = cos_[level - 1].data();
                const float* s = sin_[level - 1].data();
                for (int i = width - 1; i >= 0; --i) {
                    const float v = r[i];
                    r[2 * i] = v * c[a[i]];
                    r[2 * i + 1] = v * s[a[i]];
                }
            }
        }
        rotation_.inverse(y.data(), keys + static_cast<std::size_t>(t) * d);
    }
}

std::size_t PolarQuantCodec::query_state_size() const {
    const std::size_t d = static_cast<std::size_t>(dim());
    return d + d / 2 * (std::size_t{1} << level_bits(1));
}

void PolarQuantCodec::prepare_query(const float* query, float* state) const {
    rotation_.forward(query, state);
    const int levels1 = 1 << level_bits(1);
    const float* c = cos_[0].data();
    const float* s = sin_[0].data();
    float* table = state + dim();
    for (int i = 0; i < dim() / 2; ++i)
        for (int a = 0; a < levels1; ++a)
            table[i * levels1 + a] = c[a] * state[2 * i] + s[a] * state[2 * i + 1];
}

void PolarQuantCodec::score(const float* state, const uint8_t* codes, const float* scalars,
                            std::size_t scalar_stride, int n, float* scores) const {
    score_rows_at(state, 0, 1, codes, scalars, scalar_stride, n, 0, scores, 0);
}

void PolarQuantCodec::score_rows_at(const float* states, std::size_t state_stride, int rows,
                                    const uint8_t* codes, const float* scalars,
                                    std::size_t /*scalar_stride*/, int n, int /*pos0*/,
                                    float* scores, std::size_t score_stride) const {
    polar_scores(*this, states, state_stride, rows, codes, scalars, n, scores, score_stride);
}

std::size_t PolarQuantCodec::parameter_bytes() const {
    std::size_t table_floats = 0;
    for (int l = 0; l < kLevels; ++l) table_floats += cos_[l].size() + sin_[l].size();
    return rotation_.parameter_bytes() + table_floats * sizeof(float);
}

}  // namespace veloxquant
