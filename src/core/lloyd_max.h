// Lloyd-Max scalar quantizers: optimal (MSE) 2^b-level codebooks for a density or for samples,
// and the cached codebooks of the laws our methods use.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <vector>

namespace veloxquant {

struct ScalarCodebook {
    int bits = 0;
    std::vector<float> centroids;   ///< 2^bits levels, ascending
    std::vector<float> boundaries;  ///< 2^bits - 1 midpoints between neighbouring centroids
    double mse = 0.0;               ///< expected squared error under the fitted law

    int levels() const { return static_cast<int>(centroids.size()); }
    /// Index of the nearest centroid (ties go to the lower cell): the number of boundaries below
    /// x (0 for NaN), found without branches (a branchy search mispredicts about every other
    /// step on data like a key's coordinates): each step keeps the half that holds the answer.
    uint8_t quantize(float x) const {
        std::size_t n = boundaries.size();
        if (n == 0) return 0;
        const float* base = boundaries.data();
        while (n > 1) {
            const std::size_t half = n / 2;
            base = base[half] < x ? base + half : base;
            n -= half;
        }
        return static_cast<uint8_t>((base - boundaries.data()) + (*base < x ? 1 : 0));
    }
};

/// Lloyd-Max for a density on [lo, hi] (need not be normalised), integrated on a fine grid.
ScalarCodebook lloyd_max_density(const std::function<double(double)>& pdf, double lo, double hi,
                                 int bits);
/// Lloyd-Max (1-D k-means, optimal up to local minima) on samples; mse is the empirical one.
ScalarCodebook lloyd_max_samples(std::vector<double> samples, int bits);

/// Codebook for one coordinate of a uniformly random unit vector in R^d, whose density is
/// proportional to (1 - x^2)^((d-3)/2) (TurboQuant, arXiv 2504.19874, Lemma 1). Cached.
const ScalarCodebook& rotated_coordinate_codebook(int d, int bits);

/// Codebook for the stage s >= 1 residual of turboquant_rvq: Lloyd-Max fitted to the empirical
/// law of the residual left by the previous stages on random unit vectors. Cached.
const ScalarCodebook& residual_codebook(int d, int bits, int stage);

/// PolarQuant (arXiv 2502.02617) angle codebooks: level 1 is uniform on [0, 2pi); level l >= 2
/// has density proportional to sin(2 psi)^(2^(l-1) - 1) on [0, pi/2]. Cached.
const ScalarCodebook& polar_angle_codebook(int level, int bits);

/// Codebook for the standard normal law N(0, 1) (the classic Lloyd-Max / Max 1960 quantizer);
/// scale the centroids by sigma for N(0, sigma^2). Used by spectral on whitened coordinates.
/// Cached.
const ScalarCodebook& gaussian_codebook(int bits);

}  // namespace veloxquant
