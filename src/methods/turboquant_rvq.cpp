#include "methods/turboquant_rvq.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "core/bitpack.h"
#include "core/lloyd_max.h"
#include "methods/byte_table_sums.h"
#include "methods/nibble_table_sums.h"

namespace veloxquant {
namespace {

// Checked before any member is built: a bad d must not reach the O(d^3) dense rotation.
int checked_dim(int d, int bits, int num_residuals) {
    if (bits < 1 || bits > 8)
        throw std::invalid_argument("turboquant_rvq: bits must be in 1..8, got " +
                                    std::to_string(bits));
    if (num_residuals < 1 || num_residuals > 8)
        throw std::invalid_argument("turboquant_rvq: num_residuals must be in 1..8, got " +
                                    std::to_string(num_residuals));
    if (d < 3 || d > 1024)
        throw std::invalid_argument("turboquant_rvq: head_dim must be in 3..1024, got " +
                                    std::to_string(d));
    return d;
}

// Scores for B = 3, 5, 6, 7, whose groups (G = 8 / B coordinates, G * B bits) straddle bytes.
// B is a template argument so that the shifts are constants.
template <int B>
void score_unpacked(const float* tables, const uint8_t* codes, const float* norms, int n, int d,
                    int stages, std::size_t stage_bytes, float* scores) {
    constexpr int kGroup = 8 / B;
    constexpr int kWidth = kGroup * B;
    constexpr int kEntries = 1 << kWidth;
    constexpr uint64_t kMask = kEntries - 1;
    const int groups = (d + kGroup - 1) / kGroup;
    const std::size_t code_bytes = stages * stage_bytes;
    for (int t = 0; t < n; ++t) {
        const uint8_t* code = codes + t * code_bytes;
        float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;  // four independent add chains
        for (int s = 0; s < stages; ++s) {
            const uint8_t* packed = code + s * stage_bytes;
            const float* table = tables + static_cast<std::size_t>(s) * groups * kEntries;
            int j = 0;
            // Eight coordinates (8 / G groups) fill exactly B bytes: read them as one word.
            for (; j + 8 <= d; j += 8) {
                const uint8_t* p = packed + (j / 8) * B;
                uint64_t w = 0;
                for (int b = 0; b < B; ++b) w |= static_cast<uint64_t>(p[b]) << (8 * b);
                const float* row = table + static_cast<std::size_t>(j / kGroup) * kEntries;
                for (int k = 0; k < 8 / kGroup; k += 4) {
                    a0 += row[k * kEntries + ((w >> (k * kWidth)) & kMask)];
                    a1 += row[(k + 1) * kEntries + ((w >> ((k + 1) * kWidth)) & kMask)];
                    a2 += row[(k + 2) * kEntries + ((w >> ((k + 2) * kWidth)) & kMask)];
                    a3 += row[(k + 3) * kEntries + ((w >> ((k + 3) * kWidth)) & kMask)];
                }
            }
            // Tail: whole groups, then a lone last coordinate (odd d, B = 3) read on its own
            // so that no byte past the stage is touched; its partner's table weight is 0.
            for (; j < d; j += kGroup) {
                const uint32_t v = j + kGroup <= d ? read_packed(packed, j / kGroup, kWidth)
                                                   : read_packed(packed, j, B);
                a0 += table[static_cast<std::size_t>(j / kGroup) * kEntries + v];
            }
        }
        scores[t] = norms[t] * ((a0 + a1) + (a2 + a3));
    }
}

}  // namespace

TurboQuantRVQCodec::TurboQuantRVQCodec(int d, int bits, int num_residuals, bool use_hadamard,
                                       uint64_t seed)
    : KeyCodec(checked_dim(d, bits, num_residuals)),
      bits_(bits),
      levels_(1 << bits),
      num_residuals_(num_residuals),
      stage_bytes_(packed_bytes(static_cast<std::size_t>(d), bits)),
      group_(8 / bits),
      groups_per_stage_((d + group_ - 1) / group_),
      rotation_(d, use_hadamard, seed) {
    for (int s = 0; s < num_residuals; ++s) {
        const ScalarCodebook& cb =
            s == 0 ? rotated_coordinate_codebook(d, bits) : residual_codebook(d, bits, s);
        centroids_.insert(centroids_.end(), cb.centroids.begin(), cb.centroids.end());
        boundaries_.insert(boundaries_.end(), cb.boundaries.begin(), cb.boundaries.end());
    }
}

uint8_t TurboQuantRVQCodec::quantize(int stage, float x) const {
    // Branch-light binary search: idx ends as the number of boundaries below x.
    const float* b = &boundaries_[static_cast<std::size_t>(stage) * (levels_ - 1)];
    int idx = 0;
    for (int step = levels_ >> 1; step > 0; step >>= 1) {
        if (b[idx + step - 1] < x) idx += step;
    }
    return static_cast<uint8_t>(idx);
}

void TurboQuantRVQCodec::encode(const float* keys, int n, uint8_t* codes, float* scalars,
                                std::size_t /*scalar_stride*/) const {
    const int d = dim();
    std::vector<float> u(d);
    std::vector<uint8_t> idx(d);
    for (int t = 0; t < n; ++t) {
        const float* k = keys + static_cast<std::size_t>(t) * d;
        double sq = 0.0;
        for (int j = 0; j < d; ++j) sq += static_cast<double>(k[j]) * k[j];
        const float norm = static_cast<float>(std::sqrt(sq));
        scalars[t] = norm;
        // u = R k / ||k||: by rotation invariance each coordinate of u follows the law of one
        // coordinate of a uniform unit vector (paper, Lemma 1), whatever k's direction was.
        rotation_.forward(k, u.data());
        if (norm > 0.0f) {
            for (int j = 0; j < d; ++j) u[j] /= norm;
        } else {
            std::fill(u.begin(), u.end(), 0.0f);
        }
        uint8_t* code = codes + static_cast<std::size_t>(t) * code_bytes();
        for (int s = 0; s < num_residuals_; ++s) {
            const float* c = &centroids_[static_cast<std::size_t>(s) * levels_];
            for (int j = 0; j < d; ++j) {
                idx[j] = quantize(s, u[j]);
                u[j] -= c[idx[j]];  // u now holds the residual the next stage quantizes
            }
            pack_bits(idx.data(), d, bits_, code + s * stage_bytes_);
        }
    }
}

void TurboQuantRVQCodec::decode(const uint8_t* codes, const float* scalars,
                                std::size_t /*scalar_stride*/, int n, float* keys) const {
    const int d = dim();
    std::vector<float> sum(d);
    std::vector<uint8_t> idx(d);
    for (int t = 0; t < n; ++t) {
        const uint8_t* code = codes + static_cast<std::size_t>(t) * code_bytes();
        std::fill(sum.begin(), sum.end(), 0.0f);
        for (int s = 0; s < num_residuals_; ++s) {
            unpack_bits(code + s * stage_bytes_, d, bits_, idx.data());
            const float* c = &centroids_[static_cast<std::size_t>(s) * levels_];
            for (int j = 0; j < d; ++j) sum[j] += c[idx[j]];
        }
        float* out = keys + static_cast<std::size_t>(t) * d;
        rotation_.inverse(sum.data(), out);
        const float norm = scalars[t];
        for (int j = 0; j < d; ++j) out[j] *= norm;
    }
}

std::size_t TurboQuantRVQCodec::table_entries() const {
    return std::size_t{1} << (group_ * bits_);
}

std::size_t TurboQuantRVQCodec::query_state_size() const {
    // The rotated query, the tables' kind, and the larger tables: a byte's one 256-entry table
    // holds more than its two 16-entry nibble tables.
    return static_cast<std::size_t>(dim()) + 1 +
           static_cast<std::size_t>(num_residuals_) * groups_per_stage_ * table_entries();
}

void TurboQuantRVQCodec::prepare_query(const float* query, float* state) const {
    // <q, R^T x> = <R q, x>: the query is rotated once and scored in the rotated domain.
    rotation_.forward(query, state);
    const int d = dim();
    // state[d] records which tables follow, so that score reads them right on any set.
    const bool nibbles = 4 % bits_ == 0 && nibble_tables_are_faster();
    state[d] = nibbles ? 1.0f : 0.0f;
    // A nibble holds 4 / bits coordinates; a stage's last byte may hold a nibble of padding
    // only, so a stage has 2 stage_bytes nibble tables.
    if (nibbles)
        fill_tables(state, 4 / bits_, 2 * static_cast<int>(stage_bytes_), state + d + 1);
    else
        fill_tables(state, group_, groups_per_stage_, state + d + 1);
}

void TurboQuantRVQCodec::fill_tables(const float* rotated, int group, int groups,
                                     float* table) const {
    const int d = dim();
    const std::size_t entries = std::size_t{1} << (group * bits_);
    for (int s = 0; s < num_residuals_; ++s) {
        const float* c = &centroids_[static_cast<std::size_t>(s) * levels_];
        for (int g = 0; g < groups; ++g, table += entries) {
            // After coordinate k of the group, table[v] for v < levels^(k+1) is the partial sum
            // over the group's coordinates held in the low bits of v; the next coordinate fills
            // the block of each higher index hi from the block hi = 0 (hi = 0 last, in place).
            table[0] = 0.0f;
            int size = 1;
            for (int k = 0; k < group; ++k) {
                const int j = g * group + k;
                const float q = j < d ? rotated[j] : 0.0f;  // padding past d: zero bits, weight 0
                for (int hi = levels_ - 1; hi >= 0; --hi) {
                    const float add = q * c[hi];
                    for (int lo = 0; lo < size; ++lo) table[hi * size + lo] = table[lo] + add;
                }
                size *= levels_;
            }
        }
    }
}

void TurboQuantRVQCodec::score(const float* state, const uint8_t* codes, const float* scalars,
                               std::size_t /*scalar_stride*/, int n, float* scores) const {
    const int d = dim();
    const float* tables = state + d + 1;
    if (state[d] != 0.0f) {
        nibble_table_sums(tables, 0, 1, codes, code_bytes(), code_bytes(), n, scores, 0);
    } else if (group_ * bits_ == 8) {  // 1, 2, 4, 8: one group per byte, stages in storage order
        byte_table_sums(tables, codes, code_bytes(), code_bytes(), n, 4, scores);
    } else {
        switch (bits_) {
            case 3:
                return score_unpacked<3>(tables, codes, scalars, n, d, num_residuals_, stage_bytes_,
                                         scores);
            case 5:
                return score_unpacked<5>(tables, codes, scalars, n, d, num_residuals_, stage_bytes_,
                                         scores);
            case 6:
                return score_unpacked<6>(tables, codes, scalars, n, d, num_residuals_, stage_bytes_,
                                         scores);
            default:
                return score_unpacked<7>(tables, codes, scalars, n, d, num_residuals_, stage_bytes_,
                                         scores);
        }
    }
    for (int t = 0; t < n; ++t) scores[t] *= scalars[t];
}

void TurboQuantRVQCodec::score_rows_at(const float* states, std::size_t state_stride, int rows,
                                       const uint8_t* codes, const float* scalars,
                                       std::size_t scalar_stride, int n, int pos0, float* scores,
                                       std::size_t score_stride) const {
    const int d = dim();
    for (int r = 0; r < rows; ++r)
        if (states[r * state_stride + d] == 0.0f)
            return KeyCodec::score_rows_at(states, state_stride, rows, codes, scalars,
                                           scalar_stride, n, pos0, scores, score_stride);
    nibble_table_sums(states + d + 1, state_stride, rows, codes, code_bytes(), code_bytes(), n,
                      scores, score_stride);
    for (int r = 0; r < rows; ++r)
        for (int t = 0; t < n; ++t) scores[r * score_stride + t] *= scalars[t];
}

std::size_t TurboQuantRVQCodec::parameter_bytes() const {
    return rotation_.parameter_bytes() + (centroids_.size() + boundaries_.size()) * sizeof(float);
}

}  // namespace veloxquant
