#include "calibration/calibrate.h"

#include <algorithm>
#include <stdexcept>

#include "calibration/commvq_calibration.h"
#include "calibration/rabitq_calibration.h"
#include "calibration/ratequant_calibration.h"
#include "calibration/spectral_calibration.h"
#include "calibration/vecinfer_calibration.h"

namespace veloxquant {

const std::vector<std::string>& calibrated_methods() {
    static const std::vector<std::string> names = {"vecinfer", "ratequant", "spectral", "rabitq",
                                                   "commvq"};
    return names;
}

bool needs_calibration(const std::string& method) {
    return method == "vecinfer" || method == "spectral" || method == "commvq" ||
           method == "ratequant";
}

void calibrate_method(const Activations& acts, const KVCacheConfig& config, Calibration& cal,
                      double ratequant_target) {
    const std::string& m = config.method;
    if (m == "vecinfer") {
        VecInferCalibration v = calibrate_vecinfer(acts, config.bits, config.seed);
        cal.vecinfer = Calibration::VecInfer{std::move(v.codebook), std::move(v.smooth_factors),
                                             v.num_subspaces, config.bits};
    } else if (m == "spectral") {
        cal.spectral = Calibration::Spectral{calibrate_spectral_rotation(acts)};
    } else if (m == "ratequant") {
        RateQuantOptions ro;
        ro.target_bits = ratequant_target > 0.0 ? ratequant_target : config.bits;
        cal.ratequant = calibrate_ratequant(acts, config, ro);
    } else if (m == "commvq") {
        CommVQCalibration c = calibrate_commvq(acts, config.bits, config.seed);
        cal.commvq = Calibration::CommVQ{std::move(c.codebook), c.num_codebooks, config.bits};
        cal.rope_inv_freq = acts.rope.inv_freq;
    } else if (m == "rabitq") {
        cal.rabitq =
            Calibration::RaBitQ{calibrate_rabitq_centroids(acts, config), config.num_clusters};
    } else {
        throw std::invalid_argument("method '" + m +
                                    "' has no calibration; calibrated methods: "
                                    "vecinfer, ratequant, spectral, rabitq, commvq");
    }
}

}  // namespace veloxquant
