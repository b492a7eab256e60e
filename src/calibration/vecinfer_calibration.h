// Calibration of the vecinfer key codec (VecInfer, arXiv 2510.06175, Sec. 3): per-channel
// smoothing factors from the keys' channel magnitudes, then product-VQ codebooks trained by
// seeded k-means on the smoothed, rotated sub-vectors of every (layer, KV head).
#pragma once

#include <cstdint>
#include <vector>

#include "calibration/activations.h"
#include "veloxquant/config.h"

namespace veloxquant {

struct VecInferCalibration {
    FloatArray codebook;        ///< [layers][kv_heads][num_subspaces][codewords][sub_dim]
    FloatArray smooth_factors;  ///< [layers][kv_heads][head_dim]
    int num_subspaces = 0;
};

/// Product-VQ geometry used for `bits` per coordinate: sub_dim coordinates share one index of
/// log2(codewords) = bits * sub_dim bits. bits 1: (8, 256); 2: (4, 256); 3: (2, 64);
/// 4: (2, 256); 5..8: (1, 2^bits). Codebooks stay at most 256 codewords so that k-means on a few
/// thousand keys per head has several samples per codeword and trains in seconds.
struct VecInferGeometry {
    int sub_dim = 0;
    int codewords = 0;
};
/// Throws std::invalid_argument for bits outside 1..8.
VecInferGeometry vecinfer_geometry(int bits);

enum class VecInferSmoothing {
    kNone,           ///< lambda = 1 (Hadamard and product VQ only)
    kKeyAbsMax,      ///< lambda_i = sqrt(max_t |K_ti|) (the paper's smoothing)
    kQueryBalanced,  ///< lambda_i = sqrt(max_t |K_ti| / max_t |Q_ti|) (SmoothQuant-style balance)
};

/// Defaults from measurements on SmolLM2-135M keys (WikiText-2 valid -> test, 2048 / 512 keys
/// per head, 2 bits): relative key MSE 0.0486 after 6 Lloyd iterations, 0.0485 after 10 or 20;
/// k-means++ seeding 0.0481 for 1.5x the time. Smoothing: kKeyAbsMax lowers the key MSE by 2-5%
/// against no smoothing but raises the score error by ~50% when queries share the keys' large
/// channels (other keys used as queries), so the default balances against the queries' channel
/// maxima where the activations have queries (else it is the paper's kKeyAbsMax).
struct VecInferCalibrationOptions {
    VecInferSmoothing smoothing = VecInferSmoothing::kQueryBalanced;
    /// Keys per (layer, head) used for training, evenly spaced over the samples.
    int max_samples = 4096;
    int kmeans_iterations = 10;
    /// Seeding of each k-means: k-means++ (core/kmeans.h) or distinct random samples.
    bool plus_plus_init = false;
};

/// lambda [dim] of one head. kQueryBalanced needs queries with rows (else it falls back to
/// kKeyAbsMax). Channel maxima are floored at 1e-4 so that a dead channel never divides by 0.
std::vector<float> vecinfer_smooth_factors(const HeadSamples& keys, const HeadSamples* queries,
                                           VecInferSmoothing smoothing);

/// Trains one head's codebook [d / sub_dim][codewords][sub_dim] from x [n][d] (keys already
/// smoothed and rotated): a seeded k-means per subspace (options' init and iterations).
std::vector<float> train_product_codebook(const float* x, int n, int d, int sub_dim, int codewords,
                                          uint64_t seed, const VecInferCalibrationOptions& options);

/// Calibrates every layer and KV head of `acts` (same head count and head dim everywhere) for
/// `bits` per coordinate; deterministic for a given seed. Throws std::invalid_argument for bits
/// outside 1..8, no layers, unequal shapes, or a head with fewer than 2 key samples.
VecInferCalibration calibrate_vecinfer(const Activations& acts, int bits, uint64_t seed);
VecInferCalibration calibrate_vecinfer(const Activations& acts, int bits, uint64_t seed,
                                       const VecInferCalibrationOptions& options);

}  // namespace veloxquant
