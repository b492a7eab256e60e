// vecinfer: VecInfer (Yao et al., arXiv 2510.06175) key codec. Keys are divided channel-wise by
// calibrated smoothing factors lambda (the query is multiplied by them, so q.k is unchanged,
// paper Eq. 7), rotated by a Hadamard transform that spreads what outliers remain over every
// coordinate, and product-vector-quantized: the d rotated coordinates split into S sub-vectors of
// sub_dim = d / S consecutive coordinates, each replaced by the index of its nearest codeword
// among C = 2^code_bits trained ones. Attention scores are a gather-add over a per-query table.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "core/rotation.h"
#include "methods/key_codec.h"

namespace veloxquant {

/// Largest codebook a vecinfer subspace may have (per-query tables stay S * 4096 floats).
constexpr int kVecInferMaxCodewords = 4096;

/// Bytes of one token's code: S indices of code_bits bits each, packed LSB-first as in
/// core/bitpack.h (index s occupies bits [s * code_bits, (s + 1) * code_bits)).
constexpr std::size_t vecinfer_code_bytes(int num_subspaces, int code_bits) {
    return (static_cast<std::size_t>(num_subspaces) * static_cast<std::size_t>(code_bits) + 7) / 8;
}

/// Index of the codeword nearest to x [sub_dim] (squared L2; ties to the lowest index), from the
/// codewords stored coordinate-major, codewords_t [sub_dim][C], and half_norm2 [C] =
/// ||c||^2 / 2. Its squared distance goes to *dist2 when given.
int nearest_codeword(const float* x, const float* codewords_t, const float* half_norm2, int C,
                     int sub_dim, float* dist2 = nullptr);

/// The orthogonal transform of (layer, head)'s smoothed keys: the randomized Walsh-Hadamard
/// transform where d is a power of two, else a Haar-random dense rotation. It is part of the
/// calibration (codebooks are trained in its output domain), so it depends on (layer, head, d)
/// only, never on KVCacheConfig.seed or use_hadamard: a cache built with any seed uses the
/// rotation its codebooks were trained for.
Rotation vecinfer_rotation(int d, int layer, int head);

/// Key codec of one KV head. Per token: vecinfer_code_bytes(S, code_bits) bytes, no scalars.
///   encode: x = R (k / lambda); i_s = argmin_c ||x_s - C[s][c]||^2 (ties to the lowest c)
///   decode: k_hat = lambda * R^T concat_s C[s][i_s]
///   score:  q . k_hat = sum_s LUT[s][i_s], LUT[s][c] = (R (q * lambda))_s . C[s][c]
class VecInferCodec : public KeyCodec {
public:
    /// codebook: [num_subspaces][codewords][d / num_subspaces]; smooth: [d]; both copied.
    /// Throws std::invalid_argument when num_subspaces does not divide d, codewords is not a
    /// power of two in 2..kVecInferMaxCodewords, a smoothing factor is not finite and > 0, a
    /// codeword is not finite, or rotation.dim() != d.
    VecInferCodec(int d, int num_subspaces, int codewords, const float* codebook,
                  const float* smooth, Rotation rotation);

    int num_subspaces() const { return subspaces_; }
    int codewords() const { return codewords_; }
    int sub_dim() const { return sub_dim_; }
    int code_bits() const { return code_bits_; }
    /// code_bits / sub_dim.
    double bits_per_coordinate() const { return static_cast<double>(code_bits_) / sub_dim_; }

    std::size_t code_bytes() const override { return code_bytes_; }
    int num_scalars() const override { return 0; }

    void encode(const float* keys, int n, uint8_t* codes, float* scalars,
                std::size_t scalar_stride) const override;
    void decode(const uint8_t* codes, const float* scalars, std::size_t scalar_stride, int n,
                float* keys) const override;

    /// State: LUT [S][C] (no rotated query is kept: the table is all scoring needs).
    std::size_t query_state_size() const override;
    void prepare_query(const float* query, float* state) const override;
    void score(const float* state, const uint8_t* codes, const float* scalars,
               std::size_t scalar_stride, int n, float* scores) const override;

    /// Codebook (both layouts), codeword norms, smoothing factors and rotation.
    std::size_t parameter_bytes() const override;

    /// The parameters, for the device codec (device_codecs/vecinfer_device.h): codebook
    /// [S][C][sub_dim], half_norm2 [S][C] = ||C[s][c]||^2 / 2, lambda [d], 1 / lambda [d], R.
    const std::vector<float>& codebook() const { return codebook_; }
    const std::vector<float>& half_norm2() const { return half_norm2_; }
    const std::vector<float>& smooth_factors() const { return smooth_; }
    const std::vector<float>& inv_smooth_factors() const { return inv_smooth_; }
    const Rotation& rotation() const { return rotation_; }

    /// Index of the codeword of subspace s nearest to x [sub_dim].
    int nearest(int s, const float* x) const;
    /// Index s of a packed code.
    uint32_t index(const uint8_t* code, int s) const;

private:
    int subspaces_;
    int codewords_;
    int sub_dim_;
    int code_bits_;
    std::size_t code_bytes_;
    std::vector<float> codebook_;    ///< [S][C][sub_dim]
    std::vector<float> codebook_t_;  ///< [S][sub_dim][C]: coordinate-major, for the search
    std::vector<float> half_norm2_;  ///< [S][C]: ||C[s][c]||^2 / 2
    std::vector<float> smooth_;      ///< [d]
    std::vector<float> inv_smooth_;  ///< [d]: 1 / lambda
    Rotation rotation_;
};

/// Builds the vecinfer codec of (layer, head) from config.codebook ([L][H][S][C][sub_dim], or
/// [S][C][sub_dim] shared by every layer and head) and config.smooth_factors ([L][H][d] or [d]).
/// Throws std::invalid_argument naming the field for a missing array (and the call that makes
/// it: calibrate_vecinfer / `veloxquant calibrate --method vecinfer`), a shape that does not fit
/// head_dim, layer or head, a num_subspaces that differs from S, or a bits that differs from the
/// codebook's rate log2(C) / sub_dim.
std::unique_ptr<KeyCodec> make_vecinfer_codec(const KVCacheConfig& config, int head_dim, int layer,
                                              int head);

}  // namespace veloxquant
