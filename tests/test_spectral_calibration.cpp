// spectral's calibration side: the N(0, 1) Lloyd-Max codebook against Max's table, the Jacobi
// eigen-solver on known matrices, calibration against a naive covariance and naive query moments,
// and the bit allocation against exhaustive search. The codec and the cache: test_spectral.cpp.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

#include "calibration/spectral_calibration.h"
#include "core/lloyd_max.h"
#include "core/rng.h"
#include "methods/spectral.h"
#include "spectral_test_helpers.h"
#include "test_helpers.h"
#include "veloxquant/veloxquant.h"

namespace veloxquant {
namespace {

using namespace spectral_test;

// ---------------------------------------------------------------------------------------------

TEST(SpectralLloydMax, GaussianCodebookMatchesMaxTable) {
    // Max (1960), Table I: MSE of the optimal 2, 4, 8, 16-level quantizers of N(0, 1).
    const double mse[] = {0.3634, 0.1175, 0.03454, 0.009497};
    for (int b = 1; b <= 4; ++b) {
        const ScalarCodebook& cb = gaussian_codebook(b);
        ASSERT_EQ(cb.levels(), 1 << b);
        EXPECT_NEAR(cb.mse, mse[b - 1], 2e-3 * mse[b - 1]) << "bits " << b;
        for (int i = 0; i < cb.levels(); ++i)
            EXPECT_NEAR(cb.centroids[i], -cb.centroids[cb.levels() - 1 - i], 1e-5);
    }
    EXPECT_NEAR(gaussian_codebook(1).centroids[1], std::sqrt(2.0 / 3.14159265358979), 1e-5);
    EXPECT_NEAR(gaussian_codebook(2).centroids[3], 1.510, 1e-3);  // Max: 0.4528, 1.510
    EXPECT_NEAR(gaussian_codebook(2).centroids[2], 0.4528, 1e-3);
    // Empirical MSE on N(0, 1) draws agrees with the codebook's own, up to 8 bits.
    Rng rng(3);
    for (int b : {3, 8}) {
        const ScalarCodebook& cb = gaussian_codebook(b);
        double e = 0.0;
        const int n = 200000;
        for (int i = 0; i < n; ++i) {
            const double x = rng.normal();
            e += std::pow(x - cb.centroids[cb.quantize(static_cast<float>(x))], 2);
        }
        EXPECT_NEAR(e / n, cb.mse, 0.03 * cb.mse) << "bits " << b;
    }
    EXPECT_THROW(gaussian_codebook(0), std::invalid_argument);
    EXPECT_THROW(gaussian_codebook(9), std::invalid_argument);
}

TEST(SpectralEigen, TwoByTwo) {
    const SymmetricEigen e = symmetric_eigen({2.0, 1.0, 1.0, 2.0}, 2);
    EXPECT_NEAR(e.values[0], 3.0, 1e-14);
    EXPECT_NEAR(e.values[1], 1.0, 1e-14);
    const double h = std::sqrt(0.5);
    EXPECT_NEAR(e.vectors[0], h, 1e-14);
    EXPECT_NEAR(e.vectors[1], h, 1e-14);
    EXPECT_NEAR(std::fabs(e.vectors[2]), h, 1e-14);
    EXPECT_NEAR(e.vectors[2] + e.vectors[3], 0.0, 1e-14);
}

TEST(SpectralEigen, KnownSpectrumWithRepeatsAndZeros) {
    for (int n : {1, 7, 64}) {
        const std::vector<double> q = random_orthonormal(n, 100 + n);
        std::vector<double> lam(n);
        for (int i = 0; i < n; ++i)
            lam[i] = i % 5 == 4 ? 0.0 : (i % 3 == 0 ? 2.5 : std::exp(-0.2 * i) - 0.3);
        std::vector<double> a(static_cast<std::size_t>(n) * n, 0.0);  // Q^T diag(lam) Q
        for (int i = 0; i < n; ++i)
            for (int j = 0; j < n; ++j)
                for (int r = 0; r < n; ++r) a[i * n + j] += q[r * n + i] * lam[r] * q[r * n + j];
        const SymmetricEigen e = symmetric_eigen(a, n);
        std::vector<double> sorted = lam;
        std::sort(sorted.rbegin(), sorted.rend());
        for (int i = 0; i < n; ++i) EXPECT_NEAR(e.values[i], sorted[i], 1e-12) << n << " " << i;
        double worst_rec = 0.0, worst_orth = 0.0;
        for (int i = 0; i < n; ++i)
            for (int j = 0; j < n; ++j) {
                double rec = 0.0, g = 0.0;
                for (int r = 0; r < n; ++r) {
                    rec += e.vectors[r * n + i] * e.values[r] * e.vectors[r * n + j];
                    g += e.vectors[i * n + r] * e.vectors[j * n + r];
                }
                worst_rec = std::max(worst_rec, std::fabs(rec - a[i * n + j]));
                worst_orth = std::max(worst_orth, std::fabs(g - (i == j ? 1.0 : 0.0)));
            }
        EXPECT_LT(worst_rec, 1e-12) << n;
        EXPECT_LT(worst_orth, 1e-12) << n;
    }
    EXPECT_THROW(symmetric_eigen({}, 0), std::invalid_argument);
    EXPECT_THROW(symmetric_eigen({1.0, 2.0, 3.0}, 2), std::invalid_argument);
    EXPECT_THROW(symmetric_eigen({1.0, NAN, NAN, 1.0}, 2), std::invalid_argument);
}

TEST(SpectralCalibration, MatchesNaiveCovarianceAndMean) {
    Activations acts;
    acts.layers.resize(2);
    const int dims[2] = {16, 8};
    for (int l = 0; l < 2; ++l)
        for (int h = 0; h < 2; ++h) {
            HeadSamples s;
            s.dim = dims[l];
            s.data = sample(make_law(dims[l], 10 * l + h), 300, 77 + h);
            acts.layers[l].keys.push_back(s);
            // Head 0 has no query rows (moments all 1); head 1 has 200.
            HeadSamples q;
            q.dim = dims[l];
            if (h == 1) q.data = vqtest::randn(static_cast<std::size_t>(200) * dims[l], 90 + l);
            for (std::size_t i = 0; i < q.data.size(); ++i)
                q.data[i] *= 1.0f + static_cast<float>(i % dims[l]);  // anisotropic
            acts.layers[l].queries.push_back(q);
        }
    const std::vector<FloatArray> rot = calibrate_spectral_rotation(acts);
    ASSERT_EQ(rot.size(), 2u);
    for (int l = 0; l < 2; ++l) {
        const int d = dims[l];
        ASSERT_EQ(rot[l].shape, (std::vector<int64_t>{2, d + 3, d}));
        for (int h = 0; h < 2; ++h) {
            const HeadSamples& s = acts.layers[l].keys[h];
            const SpectralBasis b = basis_of(rot[l], h);
            const HeadSamples& qs = acts.layers[l].queries[h];
            for (int r = 0; r < d; ++r) {
                double w = 0.0;
                for (int64_t i = 0; i < qs.count(); ++i) {
                    double p = 0.0;
                    for (int j = 0; j < d; ++j)
                        p += static_cast<double>(b.basis[r * d + j]) * qs.row(i)[j];
                    w += p * p / static_cast<double>(qs.count());
                }
                EXPECT_NEAR(b.query_moments[r], h == 0 ? 1.0 : w, 1e-4 * (1.0 + w))
                    << l << " " << h << " " << r;
            }
            const int n = static_cast<int>(s.count());
            // Naive: mean, then covariance as (sum x x^T - n mu mu^T) / (n - 1).
            std::vector<double> mu(d, 0.0);
            for (int t = 0; t < n; ++t)
                for (int j = 0; j < d; ++j) mu[j] += s.row(t)[j] / n;
            for (int j = 0; j < d; ++j) EXPECT_NEAR(b.mean[j], mu[j], 1e-5);
            for (int i = 0; i < d; ++i) {
                if (i > 0) {
                    EXPECT_GE(b.variances[i - 1], b.variances[i]);
                }
                for (int j = 0; j < d; ++j) {
                    double c = 0.0, rec = 0.0, g = 0.0;
                    for (int t = 0; t < n; ++t) c += static_cast<double>(s.row(t)[i]) * s.row(t)[j];
                    c = (c - n * mu[i] * mu[j]) / (n - 1);
                    for (int r = 0; r < d; ++r) {
                        rec += static_cast<double>(b.basis[r * d + i]) * b.variances[r] *
                               b.basis[r * d + j];
                        g += static_cast<double>(b.basis[i * d + r]) * b.basis[j * d + r];
                    }
                    EXPECT_NEAR(rec, c, 1e-4 * (1.0 + std::fabs(c)))
                        << l << " " << h << " " << i << " " << j;
                    EXPECT_NEAR(g, i == j ? 1.0 : 0.0, 1e-6);
                }
            }
        }
    }
}

TEST(SpectralCalibration, Errors) {
    auto message = [](const Activations& a) {
        try {
            calibrate_spectral_rotation(a);
        } catch (const std::invalid_argument& e) {
            return std::string(e.what());
        }
        return std::string("no error");
    };
    Activations a;
    EXPECT_NE(message(a).find("no layers"), std::string::npos);
    a.layers.resize(1);
    EXPECT_NE(message(a).find("layer 0 has no key heads"), std::string::npos);
    a = one_head_acts(std::vector<float>(8, 1.0f), 8);
    EXPECT_NE(message(a).find("at least 2"), std::string::npos) << message(a);
    a = one_head_acts(std::vector<float>(16, 1.0f), 8);
    a.layers[0].keys[0].data[3] = NAN;
    EXPECT_NE(message(a).find("NaN"), std::string::npos);
    a = one_head_acts(std::vector<float>(16, 1.0f), 8);
    HeadSamples other;
    other.dim = 4;
    other.data.assign(16, 0.5f);
    a.layers[0].keys.push_back(other);
    EXPECT_NE(message(a).find("head 1: key dim 4 differs"), std::string::npos) << message(a);
    a = one_head_acts(std::vector<float>(16, 1.0f), 8);
    HeadSamples q;
    q.dim = 4;
    q.data.assign(8, 0.5f);
    a.layers[0].queries.push_back(q);
    EXPECT_NE(message(a).find("head 0: query dim 4 differs from the key dim 8"), std::string::npos)
        << message(a);
    a.layers[0].queries[0].dim = 8;
    a.layers[0].queries[0].data[2] = NAN;
    EXPECT_NE(message(a).find("queries contain NaN"), std::string::npos) << message(a);
}

TEST(SpectralCalibration, SmolLM2SizedInUnderAFewSeconds) {
    // 30 layers x 3 heads x d = 64 with 2048 rows each, as the default model's calibration.
    Activations acts;
    acts.layers.resize(30);
    const Synthetic law = make_law(64, 5);
    const std::vector<float> keys = sample(law, 2048, 6);
    for (auto& l : acts.layers)
        for (int h = 0; h < 3; ++h) {
            HeadSamples s;
            s.dim = 64;
            s.data = keys;
            l.keys.push_back(s);
        }
    const auto t0 = std::chrono::steady_clock::now();
    const std::vector<FloatArray> rot = calibrate_spectral_rotation(acts);
    const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("[spectral] calibration 30 x 3 heads x d=64 x 2048 rows: %.2f s\n", sec);
    EXPECT_EQ(rot.size(), 30u);
    EXPECT_LT(sec, 20.0);
}

// ---------------------------------------------------------------------------------------------
// The bit allocation.

double allocation_cost(const std::vector<double>& w, const std::vector<int>& bits) {
    double c = 0.0;
    for (std::size_t r = 0; r < w.size(); ++r)
        c += w[r] * (bits[r] == 0 ? 1.0 : gaussian_codebook(bits[r]).mse);
    return c;
}

TEST(SpectralAllocation, MeetsTheBudgetAndEqualsExhaustiveSearch) {
    Rng rng(5);
    for (int n = 1; n <= 4; ++n)
        for (int trial = 0; trial < 6; ++trial) {
            std::vector<double> w(n);
            for (double& x : w) x = std::exp(3.0 * rng.normal());  // wide dynamic range
            if (trial == 5) w[0] = 0.0;                            // a direction no query reads
            int combos = 1;
            for (int r = 0; r < n; ++r) combos *= 9;
            for (int budget = 0; budget <= 8 * n; ++budget) {
                const std::vector<int> bits = allocate_spectral_bits(w, budget);
                ASSERT_EQ(bits.size(), static_cast<std::size_t>(n));
                int sum = 0;
                for (int b : bits) {
                    EXPECT_GE(b, 0);
                    EXPECT_LE(b, 8);
                    sum += b;
                }
                EXPECT_EQ(sum, budget);
                double best = INFINITY;
                for (int c = 0; c < combos; ++c) {
                    std::vector<int> x(n);
                    int left = c, total = 0;
                    for (int r = 0; r < n; ++r) {
                        x[r] = left % 9;
                        left /= 9;
                        total += x[r];
                    }
                    if (total == budget) best = std::min(best, allocation_cost(w, x));
                }
                EXPECT_LE(allocation_cost(w, bits), best * (1.0 + 1e-12))
                    << "n " << n << " trial " << trial << " budget " << budget;
            }
        }
}

TEST(SpectralAllocation, LargerImportanceNeverGetsFewerBitsAndMaxBitsHolds) {
    Rng rng(6);
    std::vector<double> w(64);
    for (double& x : w) x = std::exp(2.0 * rng.normal());
    for (int budget : {0, 1, 63, 128, 200, 320, 511, 512}) {
        const std::vector<int> bits = allocate_spectral_bits(w, budget);
        int sum = 0;
        for (int r = 0; r < 64; ++r) {
            sum += bits[r];
            for (int s = 0; s < 64; ++s)
                if (w[r] > w[s]) EXPECT_GE(bits[r], bits[s]) << budget;
        }
        EXPECT_EQ(sum, budget);
    }
    // The cap holds, and equal gains go to the lower index first.
    const std::vector<int> capped = allocate_spectral_bits({100.0, 1.0, 1.0}, 9, 5);
    EXPECT_EQ(capped, (std::vector<int>{5, 2, 2}));
    EXPECT_THROW(allocate_spectral_bits({1.0, 1.0}, 17), std::invalid_argument);
    EXPECT_THROW(allocate_spectral_bits({1.0, 1.0}, -1), std::invalid_argument);
    EXPECT_THROW(allocate_spectral_bits({1.0, -1.0}, 2), std::invalid_argument);
    EXPECT_THROW(allocate_spectral_bits({1.0, NAN}, 2), std::invalid_argument);
    EXPECT_THROW(allocate_spectral_bits({1.0}, 1, 9), std::invalid_argument);
}

}  // namespace
}  // namespace veloxquant
