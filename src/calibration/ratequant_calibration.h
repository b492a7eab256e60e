// RateQuant calibration (arXiv 2605.06675): per layer / KV head sensitivities, the codec's
// distortion curve D(b) = a * beta^-b fitted on real keys, and a bit allocation by reverse
// water-filling that meets a target average exactly. Names follow the MLX library
// (calibrate_layer_sensitivities, fit_distortion_curve, allocate_bits_ratequant).
#pragma once

#include <string>
#include <vector>

#include "calibration/activations.h"
#include "veloxquant/calibration.h"
#include "veloxquant/config.h"

namespace veloxquant {

/// Relative distortion of a b-bit codec: D(b) = a * beta^-b.
struct DistortionCurve {
    double a = 0.0;
    double beta = 0.0;
    double operator()(double bits) const;
};

/// Least squares on log D = log a - b log beta. Throws std::invalid_argument for fewer than
/// two points, mismatched lengths, a non-positive or non-finite distortion, or a fit whose D
/// does not fall with b (beta <= 1).
DistortionCurve fit_distortion_curve(const std::vector<int>& bits,
                                     const std::vector<double>& distortion);

/// Relative MSE sum ||k - k_hat||^2 / sum ||k||^2 of the ratequant codec of (layer, head) (a
/// one-stage TurboQuant, seeded as the cache seeds it from `config`) at `bits` on the keys.
/// Throws std::invalid_argument for no keys or all-zero keys.
double measure_ratequant_distortion(const HeadSamples& keys, const KVCacheConfig& config, int layer,
                                    int head, int bits);

/// Sensitivity of each (layer, KV head) to key distortion, [layers][heads]:
///   w = E||q||^2 * E||k||^2 / d
/// over the collected queries of the head's group and its keys. Why: a key error e changes the
/// logit q.k by q.e; the codec's error is isotropic after its random rotation, with
/// E||e||^2 = D * E||k||^2 (TurboQuant is scale-invariant: it codes k/||k||), so
/// E[(q.e)^2] = E||q||^2 E||e||^2 / d = w * D. w is thus the expected squared logit error per
/// unit relative distortion, and sum w_i D_i(b_i) is what the allocation minimises. (The MLX
/// library uses E||k||^2 alone, which ignores how strongly each head's queries read its keys.)
/// Throws std::invalid_argument for a head without keys or queries.
std::vector<std::vector<double>> calibrate_head_sensitivities(const Activations& activations);
/// Per layer: the mean of its heads' sensitivities.
std::vector<double> calibrate_layer_sensitivities(const Activations& activations);

/// Integer widths b_i in [min_bits, max_bits] with sum b_i = round(target_avg_bits * n) exactly,
/// minimising sum_i sensitivities[i] * curves[i](b_i): the integer form of reverse
/// water-filling. Throws std::invalid_argument for empty or mismatched inputs, a non-positive
/// or non-finite sensitivity, a curve with beta <= 1 or a <= 0, or a budget outside
/// [n * min_bits, n * max_bits].
std::vector<int> allocate_bits_ratequant(const std::vector<double>& sensitivities,
                                         const std::vector<DistortionCurve>& curves,
                                         double target_avg_bits, int min_bits = 1,
                                         int max_bits = 8);

struct RateQuantOptions {
    double target_bits = 2.0;                  ///< average key bits over the allocation units
    bool per_head = true;                      ///< units "L.H" (else "L")
    std::vector<int> fit_bits = {1, 2, 3, 4};  ///< widths the curve is fitted from
    int min_bits = 1;
    int max_bits = 8;
};

/// The whole calibration: sensitivities, one curve per unit (per-layer curves fit the mean of
/// the layer's head distortions), the allocation as bit_allocation and the report vectors.
/// config supplies the codec's seed and rotation kind (its method is ignored).
Calibration::RateQuant calibrate_ratequant(const Activations& activations,
                                           const KVCacheConfig& config,
                                           const RateQuantOptions& options = {});

}  // namespace veloxquant
