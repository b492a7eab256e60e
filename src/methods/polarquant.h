// PolarQuant key codec (Han et al., "PolarQuant: Quantizing KV Caches with Polar
// Transformation", arXiv 2502.02617): random rotation, then a 4-level recursive polar transform
// whose angles are quantized with fixed codebooks for their (data-independent) laws.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/lloyd_max.h"
#include "core/rotation.h"
#include "methods/key_codec.h"

namespace veloxquant {

/// y = R k; level 1 pairs (y_{2j}, y_{2j+1}) into angle atan2(y_{2j+1}, y_{2j}) in [0, 2pi) and
/// radius; levels 2..4 pair the radii of the level below (angles in [0, pi/2]). Each 16-coordinate
/// block of y thus becomes 8 + 4 + 2 + 1 angles and one final radius.
///
/// Per token: scalar 0 = ||k|| (float32). Code bytes, back to back:
///   - the d/2 level-1 angle indices, (bits + 2) bits each, packed LSB-first (bitpack.h);
///   - the d/4 + d/8 + d/16 indices of levels 2, 3, 4 (in that order), `bits` bits each;
///   - the d/16 final radii divided by ||k|| (in [0, 1]), IEEE fp16, little-endian.
class PolarQuantCodec : public KeyCodec {
public:
    static constexpr int kLevels = 4;
    static constexpr int kBlock = 1 << kLevels;  ///< coordinates per final radius
    static constexpr int kMinBits = 1;
    static constexpr int kMaxBits = 6;
    static constexpr int kMaxDim = 1024;

    /// Throws std::invalid_argument unless d is a multiple of 16 in 16..1024 and bits in 1..6.
    PolarQuantCodec(int d, int bits, bool use_hadamard, uint64_t seed);

    int bits() const { return bits_; }
    /// Bits of the level-l angle indices (l in 1..4): bits + 2 for level 1, else bits.
    int level_bits(int level) const { return level == 1 ? bits_ + 2 : bits_; }
    const Rotation& rotation() const { return rotation_; }
    /// The level-l angle codebook (l in 1..4), and the cos / sin of its centroids.
    const ScalarCodebook& codebook(int level) const { return *codebooks_[level - 1]; }
    const std::vector<float>& centroid_cos(int level) const { return cos_[level - 1]; }
    const std::vector<float>& centroid_sin(int level) const { return sin_[level - 1]; }

    std::size_t code_bytes() const override;
    int num_scalars() const override { return 1; }

    void encode(const float* keys, int n, uint8_t* codes, float* scalars,
                std::size_t scalar_stride) const override;
    void decode(const uint8_t* codes, const float* scalars, std::size_t scalar_stride, int n,
                float* keys) const override;

    /// State: the rotated query q' = R q (d floats), then for each level-1 pair i and index a
    /// the pair's collapse cos(psi_a) q'_{2i} + sin(psi_a) q'_{2i+1} (d/2 tables of
    /// 2^(bits + 2) floats), so a token's level 1 costs one lookup per pair.
    std::size_t query_state_size() const override;
    void prepare_query(const float* query, float* state) const override;
    void score(const float* state, const uint8_t* codes, const float* scalars,
               std::size_t scalar_stride, int n, float* scores) const override;
    /// The rows share each token's index unpacking and radii (methods/polar_scores.h).
    void score_rows_at(const float* states, std::size_t state_stride, int rows,
                       const uint8_t* codes, const float* scalars, std::size_t scalar_stride, int n,
                       int pos0, float* scores, std::size_t score_stride) const override;

    std::size_t parameter_bytes() const override;

    /// The code layout, for the scorer's kernels: first index of level l (1..4) in the unpacked
    /// index array; bytes of the level-1 indices; offset of the radii (after all indices).
    static int level_offset(int d, int level) { return d - (d >> (level - 1)); }
    std::size_t level1_bytes() const { return level1_bytes_; }
    std::size_t radii_offset() const { return level1_bytes_ + upper_bytes_; }
    /// All 15d/16 angle indices of one code: level 1 first, then levels 2, 3, 4; level l starts
    /// at level_offset(d, l).
    void unpack_indices(const uint8_t* code, uint8_t* indices) const;
    /// Final radius j of one code, relative to ||k||.
    float relative_radius(const uint8_t* code, int j) const;

private:
    int bits_;
    Rotation rotation_;
    std::size_t level1_bytes_, upper_bytes_;
    // codebooks_[l-1]: the level-l angle codebook (cached, stable); cos_/sin_ of its centroids.
    const ScalarCodebook* codebooks_[kLevels];
    std::vector<float> cos_[kLevels], sin_[kLevels];
};

}  // namespace veloxquant
