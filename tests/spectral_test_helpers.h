// Test-side helpers of the spectral tests, written independently of the library code:
// random orthonormal bases, synthetic anisotropic keys, and a naive double-precision reference
// of the codec.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <iterator>
#include <utility>
#include <vector>

#include "calibration/activations.h"
#include "core/lloyd_max.h"
#include "core/rng.h"
#include "methods/spectral.h"
#include "test_helpers.h"
#include "veloxquant/config.h"

namespace veloxquant {
namespace spectral_test {

// Haar-ish random orthonormal rows by modified Gram-Schmidt of a Gaussian matrix.
inline std::vector<double> random_orthonormal(int d, uint64_t seed) {
    Rng rng(seed);
    std::vector<double> q(static_cast<std::size_t>(d) * d);
    for (auto& x : q) x = rng.normal();
    for (int r = 0; r < d; ++r) {
        double* row = &q[static_cast<std::size_t>(r) * d];
        for (int p = 0; p < r; ++p) {
            const double* prev = &q[static_cast<std::size_t>(p) * d];
            double c = 0.0;
            for (int j = 0; j < d; ++j) c += row[j] * prev[j];
            for (int j = 0; j < d; ++j) row[j] -= c * prev[j];
        }
        double n = 0.0;
        for (int j = 0; j < d; ++j) n += row[j] * row[j];
        for (int j = 0; j < d; ++j) row[j] /= std::sqrt(n);
    }
    return q;
}

// Anisotropic keys: k = mu + m_t * sum_i sqrt(lambda_i) g_i Q_i with lambda_i decaying
// geometrically, a per-token magnitude m_t = exp(0.3 N(0,1)), and a common mean.
struct Synthetic {
    int d;
    std::vector<double> q, lambda, mu;
};

inline Synthetic make_law(int d, uint64_t seed) {
    Synthetic s{d, random_orthonormal(d, seed), std::vector<double>(d), std::vector<double>(d)};
    Rng rng(seed + 1);
    for (int i = 0; i < d; ++i) s.lambda[i] = 4.0 * std::exp(-i / 4.0) + 0.02;
    for (auto& m : s.mu) m = 0.5 * rng.normal();
    return s;
}

inline std::vector<float> sample(const Synthetic& s, int n, uint64_t seed) {
    Rng rng(seed);
    const int d = s.d;
    std::vector<float> k(static_cast<std::size_t>(n) * d);
    for (int t = 0; t < n; ++t) {
        const double m = std::exp(0.3 * rng.normal());
        std::vector<double> x(s.mu);
        for (int i = 0; i < d; ++i) {
            const double g = m * std::sqrt(s.lambda[i]) * rng.normal();
            for (int j = 0; j < d; ++j) x[j] += g * s.q[static_cast<std::size_t>(i) * d + j];
        }
        for (int j = 0; j < d; ++j)
            k[static_cast<std::size_t>(t) * d + j] = static_cast<float>(x[j]);
    }
    return k;
}

inline Activations one_head_acts(const std::vector<float>& keys, int d) {
    Activations a;
    a.layers.resize(1);
    HeadSamples h;
    h.dim = d;
    h.data = keys;
    a.layers[0].keys.push_back(h);
    return a;
}

inline SpectralBasis basis_of(const FloatArray& rot, int head) {
    const int d = static_cast<int>(rot.shape[2]);
    const float* p = rot.data.data() + static_cast<std::size_t>(head) * (d + 3) * d;
    SpectralBasis b;
    b.basis.assign(p, p + d * d);
    b.variances.assign(p + d * d, p + (d + 1) * d);
    b.mean.assign(p + (d + 1) * d, p + (d + 2) * d);
    b.query_moments.assign(p + (d + 2) * d, p + (d + 3) * d);
    return b;
}

// A random orthonormal basis with the per-coordinate variances measured in it on `train`
// (rows sorted by descending variance, so the signal bits go where the variance is).
inline SpectralBasis random_basis(const std::vector<float>& train, const std::vector<float>& mean,
                                  int d, uint64_t seed) {
    const std::vector<double> r = random_orthonormal(d, seed);
    const int n = static_cast<int>(train.size()) / d;
    std::vector<std::pair<double, int>> var(d);
    for (int i = 0; i < d; ++i) {
        double s = 0.0;
        for (int t = 0; t < n; ++t) {
            double y = 0.0;
            for (int j = 0; j < d; ++j) y += r[i * d + j] * (train[t * d + j] - mean[j]);
            s += y * y;
        }
        var[i] = {s / (n - 1), i};
    }
    std::sort(var.begin(), var.end(), [](auto& a, auto& b) { return a.first > b.first; });
    SpectralBasis b;
    b.mean = mean;
    b.query_moments.assign(d, 1.0f);  // isotropic queries: the MSE allocation
    for (int i = 0; i < d; ++i) {
        b.variances.push_back(static_cast<float>(var[i].first));
        for (int j = 0; j < d; ++j) b.basis.push_back(static_cast<float>(r[var[i].second * d + j]));
    }
    return b;
}

// Naive double-precision reference of the codec at per-coordinate widths `bits` (0 = dropped).
// kSpreadSearch is the codec's rule (every spread of kSpectralSpreads, least-squares scale,
// lowest query-weighted error); the others are the alternatives it was chosen against: the
// plain RMS normalisation with the least-squares scale (the search restricted to f = 1), storing
// the RMS itself, no RMS normalisation.
enum class ScaleRule { kSpreadSearch, kLeastSquares, kStoreRms, kNoNormalisation };

inline std::vector<double> reference_decode(const SpectralBasis& b, const std::vector<int>& bits,
                                            const float* k, ScaleRule rule) {
    const int d = static_cast<int>(b.mean.size());
    double top = 0.0;
    for (float v : b.variances) top = std::max(top, static_cast<double>(v));
    std::vector<double> y(d, 0.0), sigma(d), z(d), y0(d, 0.0), best_y0(d, 0.0);
    for (int r = 0; r < d; ++r) {
        sigma[r] = std::sqrt(std::max(static_cast<double>(b.variances[r]), 1e-12 * top));
        for (int j = 0; j < d; ++j)
            y[r] +=
                static_cast<double>(b.basis[r * d + j]) * (k[j] - static_cast<double>(b.mean[j]));
        z[r] = y[r] / sigma[r];
    }
    int coded = 0;
    double ms = 0.0;
    for (int r = 0; r < d; ++r)
        if (bits[r] > 0) {
            ms += z[r] * z[r];
            ++coded;
        }
    const double rms = coded > 0 ? std::sqrt(ms / coded) : 0.0;
    std::vector<double> spreads = {1.0};
    if (rule == ScaleRule::kSpreadSearch)
        spreads.assign(std::begin(kSpectralSpreads), std::end(kSpectralSpreads));
    double best = INFINITY, best_s = 0.0;
    for (double f : spreads) {
        const double norm = rule == ScaleRule::kNoNormalisation ? 1.0 : rms * f;
        double num = 0.0, den = 0.0;
        for (int r = 0; r < d; ++r) {
            y0[r] = 0.0;
            if (bits[r] == 0) continue;
            const ScalarCodebook& cb = gaussian_codebook(bits[r]);
            const double x = norm > 0.0 ? z[r] / norm : 0.0;
            int lvl = 0;  // brute-force nearest level; the first of equals wins
            for (int v = 1; v < cb.levels(); ++v)
                if (std::fabs(x - cb.centroids[v]) < std::fabs(x - cb.centroids[lvl])) lvl = v;
            y0[r] = sigma[r] * cb.centroids[lvl];
            num += y[r] * y0[r];
            den += y0[r] * y0[r];
        }
        const double s = rule == ScaleRule::kStoreRms ? rms : (den > 0.0 ? num / den : 0.0);
        double err = 0.0;  // query-weighted, over the coded coordinates
        for (int r = 0; r < d; ++r)
            if (bits[r] > 0) err += b.query_moments[r] * std::pow(y[r] - s * y0[r], 2);
        if (err < best) {
            best = err;
            best_s = s;
            best_y0 = y0;
        }
    }
    std::vector<double> out(b.mean.begin(), b.mean.end());
    for (int r = 0; r < d; ++r)
        for (int j = 0; j < d; ++j) out[j] += best_s * best_y0[r] * b.basis[r * d + j];
    return out;
}

// sum_r w_r (y_r - y_hat_r)^2 in the basis: the expected squared score error of one key
// under queries with second moments w (the quantity the scale rule minimises).
inline double weighted_error(const SpectralBasis& b, const float* k, const std::vector<double>& x) {
    const int d = static_cast<int>(b.mean.size());
    double e = 0.0;
    for (int r = 0; r < d; ++r) {
        double p = 0.0;
        for (int j = 0; j < d; ++j) p += static_cast<double>(b.basis[r * d + j]) * (k[j] - x[j]);
        e += b.query_moments[r] * p * p;
    }
    return e;
}

struct Coded {
    std::vector<uint8_t> codes;
    std::vector<float> scalars;
};

inline Coded encode_all(const KeyCodec& c, const std::vector<float>& keys) {
    const int n = static_cast<int>(keys.size()) / c.dim();
    Coded e{std::vector<uint8_t>(c.code_bytes() * n),
            std::vector<float>(static_cast<std::size_t>(c.num_scalars()) * n)};
    c.encode(keys.data(), n, e.codes.data(), e.scalars.data(), n);
    return e;
}

inline std::vector<float> decode_all(const KeyCodec& c, const Coded& e, int n) {
    std::vector<float> out(static_cast<std::size_t>(n) * c.dim());
    c.decode(e.codes.data(), e.scalars.data(), n, n, out.data());
    return out;
}

}  // namespace spectral_test
}  // namespace veloxquant
