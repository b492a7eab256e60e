// turboquant_rvq: TurboQuant (arXiv 2504.19874, Algorithm 1, TurboQuant_mse) with residual
// stages. The key's norm is stored as a float; the unit key is randomly rotated so that every
// coordinate follows the known law of a coordinate of a uniform unit vector, and each coordinate
// is scalar-quantized with a Lloyd-Max codebook for that law; every further stage quantizes what
// the previous stages left, with a codebook fitted to that residual's law.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/rotation.h"
#include "methods/key_codec.h"

namespace veloxquant {

/// Per token: one float32 scalar n = ||k||, and num_residuals stages of d packed b-bit indices
/// (pack_bits, LSB-first; stage s starts at byte s * packed_bytes(d, bits)). With u = R k / n,
/// stage 0 quantizes u with rotated_coordinate_codebook(d, bits) and stage s >= 1 quantizes
/// u - sum_{s' < s} C_s'[i_s'] with residual_codebook(d, bits, s). Decode:
/// k_hat = n R^T sum_s C_s[i_s]. Scores gather-add per-query lookup tables.
class TurboQuantRVQCodec : public KeyCodec {
public:
    /// Throws std::invalid_argument for bits or num_residuals outside 1..8, or d outside
    /// 3..1024 (the coordinate-law codebook needs d >= 3).
    TurboQuantRVQCodec(int d, int bits, int num_residuals, bool use_hadamard, uint64_t seed);

    std::size_t code_bytes() const override { return num_residuals_ * stage_bytes_; }
    int num_scalars() const override { return 1; }

    void encode(const float* keys, int n, uint8_t* codes, float* scalars,
                std::size_t scalar_stride) const override;
    void decode(const uint8_t* codes, const float* scalars, std::size_t scalar_stride, int n,
                float* keys) const override;

    /// State: the rotated query q' = R q (d floats), a float that is 1 when nibble tables follow
    /// and 0 otherwise, then per stage s and group g of G consecutive coordinates the table
    /// T[s][g][v] = sum over the group's coordinates j of q'_j C_s[index of j in v], so a token
    /// scores with one lookup per group. G = 8 / bits (G * bits <= 8 bits of code; for bits 1,
    /// 2, 4, 8 a group is one code byte), or at bits 1, 2, 4 where nibble_tables_are_faster(),
    /// G = 4 / bits: a group is a nibble, its 16-entry table one AVX-512 register.
    std::size_t query_state_size() const override;
    void prepare_query(const float* query, float* state) const override;
    void score(const float* state, const uint8_t* codes, const float* scalars,
               std::size_t scalar_stride, int n, float* scores) const override;
    /// Rows whose states all hold nibble tables are scored together (nibble_table_sums), the
    /// same bits as score row by row.
    void score_rows_at(const float* states, std::size_t state_stride, int rows,
                       const uint8_t* codes, const float* scalars, std::size_t scalar_stride, int n,
                       int pos0, float* scores, std::size_t score_stride) const override;

    /// Rotation plus the centroids and cell boundaries of every stage.
    std::size_t parameter_bytes() const override;

    int bits() const { return bits_; }
    int num_residuals() const { return num_residuals_; }
    const Rotation& rotation() const { return rotation_; }
    const std::vector<float>& centroids() const { return centroids_; }    ///< [stage][levels]
    const std::vector<float>& boundaries() const { return boundaries_; }  ///< [stage][levels-1]

private:
    /// Index of the nearest centroid of `stage` (ties go to the lower cell).
    uint8_t quantize(int stage, float x) const;
    /// Entries of one byte group's table, 2^(G * bits).
    std::size_t table_entries() const;
    /// Each stage's tables for `groups` groups of `group` coordinates of the rotated query.
    void fill_tables(const float* rotated, int group, int groups, float* table) const;

    int bits_;
    int levels_;
    int num_residuals_;
    std::size_t stage_bytes_;  ///< packed_bytes(d, bits)
    int group_;                ///< G = 8 / bits coordinates per query table
    int groups_per_stage_;     ///< ceil(d / G)
    Rotation rotation_;
    std::vector<float> centroids_;   ///< [stage][levels_], ascending
    std::vector<float> boundaries_;  ///< [stage][levels_ - 1], midpoints of the centroids
};

}  // namespace veloxquant
