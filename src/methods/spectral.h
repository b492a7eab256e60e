// spectral: SpectralQuant key codec ("3% Is All You Need: Breaking TurboQuant's Compression
// Limit via Spectral Structure", Gopinath 2026) in our definition (DESIGN.md section 3).
//
// Per layer and KV head a calibrated orthonormal basis U (row r = r-th principal direction of
// the key covariance, eigenvalues lambda_r descending) and the key mean mu. A key k becomes
// y = U (k - mu); coordinate r is whitened, z_r = y_r / sigma_r with sigma_r = sqrt(lambda_r),
// so that every coordinate follows (roughly) N(0, 1) and one Lloyd-Max codebook for the standard
// normal law fits all of them. The first d_eff coordinates (participation ratio of the
// spectrum, (sum lambda)^2 / sum lambda^2) get signal_bits, the rest noise_bits (0 = dropped,
// reconstructed as 0).
//
// Per token one float scale s. Before the nearest-level search z is divided by its RMS over
// the coded coordinates, so a token of unusual magnitude still meets the codebook where it
// fits; then, with y0_r = sigma_r C[i_r], s = <y, y0> / <y0, y0> is the least-squares scale of
// the reconstruction y_hat = s y0. Measured against storing the RMS itself and against no
// normalisation, this has the lowest key MSE on synthetic and on SmolLM2-135M keys (e.g. at
// 4/1 bits on SmolLM2: relative MSE 0.117 vs 0.118 and 0.126; tests/test_spectral*.cpp print
// the comparison). Decode: k_hat = mu + U^T y_hat. Score on the codes:
//     <q, k_hat> = <q, mu> + s sum_r (U q)_r sigma_r C[i_r],
// one rotation of the query and per-coordinate lookup tables.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "methods/key_codec.h"

namespace veloxquant {

/// Calibrated parameters of one (layer, KV head).
struct SpectralBasis {
    std::vector<float> basis;      ///< [d][d], row r = r-th principal direction (orthonormal)
    std::vector<float> variances;  ///< [d] lambda_r >= 0, non-increasing
    std::vector<float> mean;       ///< [d] key mean
};

/// ceil((sum lambda)^2 / sum lambda^2), clamped to [1, d]; 1 if every lambda is 0.
int participation_dim(const float* eigenvalues, int d);

/// Reads and checks rotations[layer][head] of the config (shape [kv_heads][d+2][d]: rows 0..d-1
/// the eigenvectors, row d the eigenvalues, row d+1 the mean). Throws std::invalid_argument
/// naming calibrate_spectral_rotation when the entry is missing, mis-shaped, not orthonormal
/// (|U U^T - I| > 1e-3), or has negative, increasing or non-finite eigenvalues or mean.
SpectralBasis spectral_basis_from_config(const KVCacheConfig& config, int head_dim, int layer,
                                         int head);

/// The config's codec for one (layer, head): basis from spectral_basis_from_config, d_eff
/// from participation_dim of its eigenvalues.
std::unique_ptr<KeyCodec> make_spectral_codec(const KVCacheConfig& config, int head_dim, int layer,
                                              int head);

/// Per token: the packed signal run (d_eff indices of signal_bits, pack_bits), then the packed
/// noise run (d - d_eff indices of noise_bits; absent when noise_bits = 0), each starting on
/// a byte; one float32 scalar s.
class SpectralCodec : public KeyCodec {
public:
    /// d in 2..1024, signal_bits 1..8, noise_bits 0..8, d_eff 1..d, basis/variances/mean of
    /// sizes d*d, d, d (else std::invalid_argument naming the field). Coordinates whose variance
    /// is below 1e-12 of the largest are whitened with that floor instead of 0.
    SpectralCodec(int d, int signal_bits, int noise_bits, SpectralBasis basis, int d_eff);

    int signal_bits() const { return signal_bits_; }
    int noise_bits() const { return noise_bits_; }
    int signal_dim() const { return d_eff_; }
    const SpectralBasis& basis() const { return basis_; }
    /// (signal_bits d_eff + noise_bits (d - d_eff) + 32) / d; code_bytes() may add up to two
    /// bytes of padding, one at the end of each run.
    double nominal_bits_per_coordinate() const;

    std::size_t code_bytes() const override { return signal_bytes_ + noise_bytes_; }
    int num_scalars() const override { return 1; }

    void encode(const float* keys, int n, uint8_t* codes, float* scalars,
                std::size_t scalar_stride) const override;
    void decode(const uint8_t* codes, const float* scalars, std::size_t scalar_stride, int n,
                float* keys) const override;

    /// State: <q, mu>, then per run its tables. A run of width 1, 2, 4 or 8 has one 256-entry
    /// table per code byte (the byte's coordinates summed); other widths have one 2^bits-entry
    /// table per coordinate. Entries are (U q)_r sigma_r C[v].
    std::size_t query_state_size() const override;
    void prepare_query(const float* query, float* state) const override;
    void score(const float* state, const uint8_t* codes, const float* scalars,
               std::size_t scalar_stride, int n, float* scores) const override;

    /// Basis, variances, mean and both codebooks.
    std::size_t parameter_bytes() const override;

private:
    struct Run {
        int first = 0;                 ///< first coordinate
        int count = 0;                 ///< coordinates
        int bits = 0;                  ///< 0: dropped
        std::size_t offset = 0;        ///< byte offset in the code
        std::size_t bytes = 0;         ///< packed_bytes(count, bits)
        bool byte_tables = false;      ///< bits in {1, 2, 4, 8}
        std::size_t table_offset = 0;  ///< floats into the query state
        std::size_t table_floats = 0;
        const std::vector<float>* centroids = nullptr;
    };
    /// y = U (k - mu) in double.
    void project(const float* key, double* y) const;

    int signal_bits_;
    int noise_bits_;
    int d_eff_;
    SpectralBasis basis_;
    std::vector<double> sigma_;
    std::vector<float> signal_centroids_, noise_centroids_;
    std::vector<float> signal_bounds_, noise_bounds_;
    std::size_t signal_bytes_, noise_bytes_;
    Run runs_[2];
};

}  // namespace veloxquant
