// One entry point for every calibrated method: from collected activations to the calibration
// section of a method, so that `veloxquant calibrate` and the comparison sweep share it.
#pragma once

#include <string>
#include <vector>

#include "calibration/activations.h"
#include "veloxquant/calibration.h"
#include "veloxquant/config.h"

namespace veloxquant {

/// Methods calibrate_method() knows, in the seed's order.
const std::vector<std::string>& calibrated_methods();

/// Whether config.method cannot serve without a calibration (vecinfer, spectral, commvq) or
/// needs one to differ from its uncalibrated form (ratequant).
bool needs_calibration(const std::string& method);

/// Calibrates config.method from `acts` into its section of `cal` (replacing it):
///   vecinfer  calibrate_vecinfer(acts, config.bits, config.seed)
///   spectral  calibrate_spectral_rotation(acts)
///   ratequant calibrate_ratequant(acts, config, {target_bits = ratequant_target})
///   commvq    calibrate_commvq(acts, config.bits, config.seed), with the model's RoPE
///   rabitq    calibrate_rabitq_centroids(acts, config)
/// ratequant_target <= 0 means config.bits. Throws std::invalid_argument for another method.
void calibrate_method(const Activations& acts, const KVCacheConfig& config, Calibration& cal,
                      double ratequant_target = 0.0);

}  // namespace veloxquant
