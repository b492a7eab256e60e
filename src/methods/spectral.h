// spectral: SpectralQuant key codec ("3% Is All You Need: Breaking TurboQuant's Compression
// Limit via Spectral Structure", Gopinath 2026) in our definition (DESIGN.md section 3), with
// query-aware bit allocation.
//
// Per layer and KV head a calibrated orthonormal basis U (row r = r-th principal direction of
// the key covariance, eigenvalues lambda_r descending), the key mean mu, and the second moment
// w_r = E[(u_r . q)^2] of the queries that read the head along each direction. A key k becomes
// y = U (k - mu); coordinate r is whitened, z_r = y_r / sigma_r with sigma_r = sqrt(lambda_r),
// so that every coordinate follows (roughly) N(0, 1) and the Lloyd-Max codebooks for the
// standard normal law fit all of them.
//
// Bits. The budget per token is signal_bits d_eff + noise_bits (d - d_eff) bits, d_eff the
// participation ratio of the spectrum, (sum lambda)^2 / sum lambda^2 (the seed's signal and
// noise runs). It is distributed over the coordinates to minimise the expected score error
// E[(q . (k - k_hat))^2] = sum_r w_r lambda_r D(b_r), D(b) the N(0, 1) Lloyd-Max distortion
// (D(0) = 1): greedy marginal gain, which is optimal because D is convex in b. Coordinates
// with b_r = 0 are dropped (reconstructed as 0). On SmolLM2-135M the queries weigh the
// low-variance directions heavily, so this moves bits from the top eigen-directions to the
// tail, where the two-run split of the seed starved them.
//
// Per token one float scale s. The whitened coordinates are divided by g = f RMS (RMS over
// the coded coordinates) for each spread f of kSpectralSpreads, quantized to the nearest
// levels, and given the least-squares scale s = <y, y0> / <y0, y0> of the reconstruction
// y_hat = s y0, y0_r = sigma_r C_{b_r}[i_r]; the token keeps the f whose y_hat has the lowest
// query-weighted error sum_r w_r (y_r - y_hat_r)^2. The spread matters for tokens that do not
// look Gaussian in the basis (the attention sink, keys at positions the calibration did not
// cover): f = 1 clips their large coordinates, a larger f keeps them at the cost of the small
// ones. On SmolLM2-135M (keys-only, 5/3 bits, ctx 1024) the search cuts KLD 0.046 -> 0.023
// against f = 1 alone, which was itself measured better than storing the RMS or not
// normalising (lowest key MSE on synthetic and SmolLM2-135M keys; tests/test_spectral*.cpp
// print the comparison). Decode: k_hat = mu + U^T y_hat. Score on the codes:
//     <q, k_hat> = <q, mu> + s sum_r (U q)_r sigma_r C_{b_r}[i_r],
// one rotation of the query and per-coordinate lookup tables.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "methods/key_codec.h"

namespace veloxquant {

struct ScalarCodebook;

/// Calibrated parameters of one (layer, KV head).
struct SpectralBasis {
    std::vector<float> basis;      ///< [d][d], row r = r-th principal direction (orthonormal)
    std::vector<float> variances;  ///< [d] lambda_r >= 0, non-increasing
    std::vector<float> mean;       ///< [d] key mean
    /// [d] w_r = E[(u_r . q)^2] >= 0 over the queries of the head's group (all 1 when the
    /// calibration had no queries: then the allocation minimises key MSE).
    std::vector<float> query_moments;
};

/// ceil((sum lambda)^2 / sum lambda^2), clamped to [1, d]; 1 if every lambda is 0.
int participation_dim(const float* eigenvalues, int d);

/// Divisors of a token's whitened coordinates, in units of their RMS, that encode tries before
/// the nearest-level search (the first is the plain RMS normalisation).
inline constexpr double kSpectralSpreads[] = {1.0, 0.8, 1.25, 1.6, 2.0, 2.5, 3.2, 4.0, 5.0, 6.4};

/// Integer bits b_r in 0..max_bits with sum b_r = budget (0 <= budget <= max_bits * n) that
/// minimise sum_r importance_r D(b_r), D(b) = gaussian_codebook(b).mse (D(0) = 1): greedy on
/// the marginal gain importance_r (D(b_r) - D(b_r + 1)), ties to the lower r. Throws
/// std::invalid_argument for a budget out of range, max_bits outside 1..8, or a negative or
/// non-finite importance.
std::vector<int> allocate_spectral_bits(const std::vector<double>& importance, int budget,
                                        int max_bits = 8);

/// Reads and checks rotations[layer][head] of the config (shape [kv_heads][d+3][d]: rows 0..d-1
/// the eigenvectors, row d the eigenvalues, row d+1 the mean, row d+2 the query second moments).
/// Throws std::invalid_argument naming calibrate_spectral_rotation when the entry is missing,
/// mis-shaped (the [d+2][d] rows of an older calibration included), not orthonormal
/// (|U U^T - I| > 1e-3), or has negative, increasing or non-finite eigenvalues, a non-finite
/// mean, or negative query moments.
SpectralBasis spectral_basis_from_config(const KVCacheConfig& config, int head_dim, int layer,
                                         int head);

/// The config's codec for one (layer, head): basis from spectral_basis_from_config, d_eff
/// from participation_dim of its eigenvalues.
std::unique_ptr<KeyCodec> make_spectral_codec(const KVCacheConfig& config, int head_dim, int layer,
                                              int head);

/// Per token: one LSB-first bit stream of signal_bits d_eff + noise_bits (d - d_eff) bits,
/// ceil(that / 8) bytes: the coded coordinates in order of descending width (ascending r among
/// equals), coordinate r taking b_r bits; one float32 scalar s.
class SpectralCodec : public KeyCodec {
public:
    /// d in 2..1024, signal_bits 1..8, noise_bits 0..8, d_eff 1..d, basis/variances/mean/
    /// query_moments of sizes d*d, d, d, d (else std::invalid_argument naming the field).
    /// Coordinates whose variance is below 1e-12 of the largest are whitened with that floor
    /// instead of 0. Bits: allocate_spectral_bits of w_r lambda_r.
    SpectralCodec(int d, int signal_bits, int noise_bits, SpectralBasis basis, int d_eff);

    int signal_bits() const { return signal_bits_; }
    int noise_bits() const { return noise_bits_; }
    int signal_dim() const { return d_eff_; }
    const SpectralBasis& basis() const { return basis_; }
    /// sigma_r, the whitening divisor of direction r (sqrt lambda_r, floored as above).
    const std::vector<double>& whitening_scales() const { return sigma_; }
    /// b_r of each basis direction r; sums to budget_bits().
    const std::vector<int>& coordinate_bits() const { return bits_; }
    /// signal_bits d_eff + noise_bits (d - d_eff).
    int budget_bits() const { return budget_; }
    /// (budget_bits() + 32) / d; code_bytes() pads the stream to whole bytes.
    double nominal_bits_per_coordinate() const;

    std::size_t code_bytes() const override { return code_bytes_; }
    int num_scalars() const override { return 1; }

    void encode(const float* keys, int n, uint8_t* codes, float* scalars,
                std::size_t scalar_stride) const override;
    void decode(const uint8_t* codes, const float* scalars, std::size_t scalar_stride, int n,
                float* keys) const override;

    /// State: <q, mu>, then one table per group of consecutive coded coordinates (stream
    /// order): a run of slots of at most 4 bits in all shares a 16-entry table, entry v = sum
    /// over the run of (U q)_r sigma_r C_{b_r}[field of r in v] (bits of v above the run's
    /// width ignored, so that one vpermps looks it up); a slot of 5..8 bits has a table of its
    /// own, 2^b_r entries. A token scores with one lookup per group. Built by
    /// spectral_query_state (methods/spectral_scores.h).
    std::size_t query_state_size() const override;
    void prepare_query(const float* query, float* state) const override;
    /// The reference: spectral_scores_reference, one row.
    void score(const float* state, const uint8_t* codes, const float* scalars,
               std::size_t scalar_stride, int n, float* scores) const override;

    /// spectral_scores (methods/spectral_scores.h): every instruction set gives score()'s bits.
    void score_rows_at(const float* states, std::size_t state_stride, int rows,
                       const uint8_t* codes, const float* scalars, std::size_t scalar_stride, int n,
                       int pos0, float* scores, std::size_t score_stride) const override;

    /// Basis, variances, mean, query moments, the allocation and the codebooks it uses.
    std::size_t parameter_bytes() const override;

    /// One coded coordinate, in stream order.
    struct Slot {
        int coord = 0;               ///< basis direction r
        int bits = 0;                ///< b_r >= 1
        std::size_t bit_offset = 0;  ///< into the code
    };
    const std::vector<Slot>& slots() const { return slots_; }
    /// Consecutive slots read as one field and scored with one table: a run of at most 4 bits
    /// in all (16 entries) or a single slot of 5..8 bits (2^bits entries). Wider groups come
    /// first, as the slots are in order of descending width.
    struct Group {
        std::size_t first = 0, count = 0;  ///< slots
        int bits = 0;
        std::size_t bit_offset = 0;
        std::size_t table_offset = 0;  ///< floats into the query state
        std::size_t entries() const { return bits <= 4 ? 16 : std::size_t{1} << bits; }
    };
    const std::vector<Group>& groups() const { return groups_; }
    /// gaussian_codebook(b) for a width b some slot uses.
    const ScalarCodebook& codebook(int b) const { return *codebooks_[b]; }

private:
    /// y_k = (U (k - mu))_r for each slot k's direction r, from centered = k - mu in double; summed
    /// in double and kept as a float (as the device encoder keeps it, whose y must fit the default
    /// 1 KB stack a thread).
    void project_slots(const double* centered, float* y) const;

    int signal_bits_;
    int noise_bits_;
    int d_eff_;
    int budget_;
    SpectralBasis basis_;
    std::vector<double> sigma_;
    std::vector<int> bits_;
    std::array<const ScalarCodebook*, 9> codebooks_{};  ///< [b]: gaussian_codebook(b) where used
    std::vector<Slot> slots_;
    std::vector<Group> groups_;
    std::size_t code_bytes_;
    std::size_t state_size_;
};

}  // namespace veloxquant
