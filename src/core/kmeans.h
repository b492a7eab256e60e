// Seeded k-means (Lloyd's algorithm) on float vectors: k-means++ or random-distinct
// initialisation from Rng, Lloyd iterations with an iteration cap and a relative tolerance on
// the objective, and deterministic re-seeding of empty clusters. Assignment runs in parallel
// (OpenMP); every reduction is done in a fixed order, so results are identical run to run and
// for any thread count.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/host_device.h"

namespace veloxquant {

enum class KMeansInit {
    kPlusPlus,        ///< k-means++ (Arthur & Vassilvitskii 2007): D^2-weighted seeding
    kRandomDistinct,  ///< k distinct data points drawn uniformly
};

struct KMeansOptions {
    int max_iterations = 25;
    /// Stop when an iteration lowers the objective by less than tolerance * objective.
    double tolerance = 1e-4;
    KMeansInit init = KMeansInit::kPlusPlus;
};

struct KMeansResult {
    int k = 0;                     ///< centroids found: min(requested k, n)
    std::vector<float> centroids;  ///< [k][d]
    std::vector<int> assignment;   ///< [n] nearest centroid of each point
    /// Sum of squared distances to the assigned centroid, after initialisation (entry 0) and
    /// after each Lloyd iteration; non-increasing.
    std::vector<double> objective_history;
    double objective() const { return objective_history.back(); }
};

/// Squared L2 distance. Eight partial sums break the floating-point add chain (and leave room
/// for SIMD) while the summation order stays fixed: the same result on every run, thread
/// count, and on the GPU (the device codecs call it too).
VQ_HD float squared_distance(const float* a, const float* b, int d) {
    float part[8] = {};
    int j = 0;
    for (; j + 8 <= d; j += 8) {
        for (int l = 0; l < 8; ++l) {
            const float t = a[j + l] - b[j + l];
            part[l] += t * t;
        }
    }
    float acc = 0.0f;
    for (; j < d; ++j) {
        const float t = a[j] - b[j];
        acc += t * t;
    }
    for (int l = 0; l < 8; ++l) acc += part[l];
    return acc;
}

/// Index of the centroid nearest to x (squared L2, ties to the lowest index); its squared
/// distance goes to *dist2 when given.
VQ_HD int nearest_centroid(const float* x, const float* centroids, int k, int d,
                           float* dist2 = nullptr) {
    int best = 0;
    float best_d = squared_distance(x, centroids, d);
    for (int c = 1; c < k; ++c) {
        const float dd = squared_distance(x, centroids + static_cast<std::size_t>(c) * d, d);
        if (dd < best_d) {
            best_d = dd;
            best = c;
        }
    }
    if (dist2) *dist2 = best_d;
    return best;
}

/// nearest_centroid against one set of centroids, bit for bit, on the host's fastest path (the
/// CPU kernel set in use, core/cpu_isa.h). AVX-512: the centroids transposed once ([d][k rounded
/// up to 16]), so that a register holds coordinate j of 16 centroids and eight registers their
/// eight partial sums; AVX2: one centroid's eight partial sums are the lanes of one vector, eight
/// centroids at once. `centroids` ([k][d]) must outlive the search.
class CentroidSearch {
public:
    CentroidSearch(const float* centroids, int k, int d);
    int nearest(const float* x, float* dist2 = nullptr) const;

private:
    const float* centroids_;
    int k_, d_;
    int stride_ = 0;                 ///< floats per transposed coordinate (AVX-512)
    std::vector<float> transposed_;  ///< [d][stride_], AVX-512 only
    /// (x, centroids, transposed, stride, k, d, dist2) -> index: the set's kernel
    int (*kernel_)(const float*, const float*, const float*, int, int, int, float*);
};

/// Clusters data [n][d] into min(k, n) clusters. Throws std::invalid_argument for n < 1,
/// d < 1, k < 1 or bad options.
KMeansResult kmeans(const float* data, int n, int d, int k, uint64_t seed,
                    const KMeansOptions& options = {});

}  // namespace veloxquant
