// Per-method calibration: RaBitQ calibrated centroids (against the codec's own first-prefill
// training) and RateQuant (curve fit, measured distortion against the TurboQuant paper,
// sensitivities against naive loops, water-filling against brute force, and lower KLD than
// uniform bits on the real model where it exists).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "calibration/collect.h"
#include "calibration/rabitq_calibration.h"
#include "calibration/ratequant_calibration.h"
#include "calibration_test_helpers.h"
#include "model/evaluation.h"
#include "model/llama_model.h"
#include "model/tokenizer.h"
#include "test_helpers.h"
#include "veloxquant/factory.h"

using namespace veloxquant;
using vqtest::array;
using vqtest::synthetic_activations;

namespace {

// ---- RaBitQ calibrated centroids ------------------------------------------------------------

TEST(CalibrationRaBitQ, CalibratedCentroidsReproduceFirstPrefillTraining) {
    const int L = 2, H = 2, d = 32, n = 300;
    const Activations acts = synthetic_activations(L, H, d, n, 40);
    KVCacheConfig c;
    c.method = "rabitq";
    c.bits = 2;
    c.num_clusters = 8;
    c.seed = 9;
    const FloatArray centroids = calibrate_rabitq_centroids(acts, c);
    ASSERT_EQ(centroids.shape, (std::vector<int64_t>{L, H, 8, d}));
    KVCacheConfig calibrated = c;
    calibrated.ivf_centroids = centroids;
    for (int l = 0; l < L; ++l) {
        // Reference: a cache that trains on its first append of the same keys.
        auto trained = KVCacheFactory::create(c, H, d, 2 * n, l);
        auto given = KVCacheFactory::create(calibrated, H, d, 2 * n, l);
        std::vector<float> keys, values;
        for (int h = 0; h < H; ++h)
            keys.insert(keys.end(), acts.layers[l].keys[h].data.begin(),
                        acts.layers[l].keys[h].data.end());
        values = keys;
        trained->append(keys.data(), values.data(), n);
        given->append(keys.data(), values.data(), n);
        std::vector<float> k1(keys.size()), v1(keys.size()), k2(keys.size()), v2(keys.size());
        trained->dequantize(0, n, k1.data(), v1.data());
        given->dequantize(0, n, k2.data(), v2.data());
        double err = 0.0, energy = 0.0;
        for (std::size_t i = 0; i < k1.size(); ++i) {
            err += (k1[i] - k2[i]) * (k1[i] - k2[i]);
            energy += k1[i] * k1[i];
        }
        EXPECT_LT(err / energy, 1e-8) << "layer " << l;
        // And a key the calibrated cache was never trained on still codes well.
        const std::vector<float> fresh =
            vqtest::randn(static_cast<std::size_t>(H) * d, 77 + l, 1.0f);
        EXPECT_NO_THROW(given->append(fresh.data(), fresh.data(), 1));
    }
}

TEST(CalibrationRaBitQ, RejectsBadCentroidShapesAndTooFewKeys) {
    KVCacheConfig c;
    c.method = "rabitq";
    c.num_clusters = 4;
    c.ivf_centroids = array({2, 2, 5, 16}, 1);  // 5 clusters, config says 4
    try {
        KVCacheFactory::create(c, 2, 16, 64, 0);
        FAIL();
    } catch (const std::invalid_argument& e) {
        EXPECT_NE(std::string(e.what()).find("ivf_centroids"), std::string::npos) << e.what();
    }
    c.ivf_centroids = array({2, 2, 4, 16}, 1);
    EXPECT_NO_THROW(KVCacheFactory::create(c, 2, 16, 64, 1));
    EXPECT_THROW(KVCacheFactory::create(c, 2, 16, 64, 2), std::invalid_argument);  // no layer 2
    EXPECT_THROW(KVCacheFactory::create(c, 3, 16, 64, 0), std::invalid_argument);  // no head 2
    c.ivf_centroids.data[3] = std::numeric_limits<float>::quiet_NaN();
    EXPECT_THROW(KVCacheFactory::create(c, 2, 16, 64, 0), std::invalid_argument);
    c.ivf_centroids = {};
    c.num_clusters = 64;
    EXPECT_THROW(calibrate_rabitq_centroids(synthetic_activations(1, 1, 16, 20, 1), c),
                 std::invalid_argument);
}

// ---- RateQuant ------------------------------------------------------------------------------

TEST(CalibrationRateQuant, FitRecoversAKnownCurve) {
    const std::vector<int> bits = {1, 2, 3, 4};
    std::vector<double> d;
    for (int b : bits) d.push_back(0.8 * std::pow(3.7, -b));
    const DistortionCurve c = fit_distortion_curve(bits, d);
    EXPECT_NEAR(c.a, 0.8, 1e-9);
    EXPECT_NEAR(c.beta, 3.7, 1e-9);
    EXPECT_NEAR(c(2.5), 0.8 * std::pow(3.7, -2.5), 1e-12);
    EXPECT_THROW(fit_distortion_curve({1}, {0.3}), std::invalid_argument);
    EXPECT_THROW(fit_distortion_curve({1, 2}, {0.3, 0.0}), std::invalid_argument);
    EXPECT_THROW(fit_distortion_curve({1, 2}, {0.1, 0.3}), std::invalid_argument);  // rising
    EXPECT_THROW(fit_distortion_curve({1, 2}, {0.3}), std::invalid_argument);
}

TEST(CalibrationRateQuant, MeasuredDistortionMatchesTurboQuant) {
    // Relative MSE of one-stage TurboQuant on Gaussian keys (any scale: the codec codes k/||k||)
    // against the paper's unit-vector distortions (arXiv 2504.19874, Thm 1).
    HeadSamples keys{64, vqtest::randn(4000 * 64, 12, 3.0f), {}};
    KVCacheConfig c;
    const double paper[] = {0.363, 0.117, 0.0345, 0.0095};
    for (int b = 1; b <= 4; ++b)
        EXPECT_NEAR(measure_ratequant_distortion(keys, c, 0, 0, b), paper[b - 1],
                    0.06 * paper[b - 1])
            << b;
}

TEST(CalibrationRateQuant, SensitivitiesMatchNaiveLoops) {
    const Activations acts = synthetic_activations(2, 3, 16, 50, 3);
    const auto w = calibrate_head_sensitivities(acts);
    const auto wl = calibrate_layer_sensitivities(acts);
    for (int l = 0; l < 2; ++l) {
        double mean = 0.0;
        for (int h = 0; h < 3; ++h) {
            double q2 = 0.0, k2 = 0.0;
            for (int i = 0; i < 50; ++i)
                for (int j = 0; j < 16; ++j) {
                    q2 += std::pow(acts.layers[l].queries[h].data[i * 16 + j], 2);
                    k2 += std::pow(acts.layers[l].keys[h].data[i * 16 + j], 2);
                }
            const double expect = (q2 / 50) * (k2 / 50) / 16;
            EXPECT_NEAR(w[l][h], expect, 1e-9 * expect);
            mean += expect / 3;
        }
        EXPECT_NEAR(wl[l], mean, 1e-9 * mean);
    }
}

double objective(const std::vector<double>& w, const std::vector<DistortionCurve>& c,
                 const std::vector<int>& b) {
    double s = 0.0;
    for (std::size_t i = 0; i < b.size(); ++i) s += w[i] * c[i](b[i]);
    return s;
}

TEST(CalibrationRateQuant, WaterFillingMatchesBruteForceAndMeetsTheBudgetExactly) {
    std::mt19937 gen(21);
    std::uniform_real_distribution<double> logw(-4.0, 4.0), a(0.3, 2.0), beta(1.5, 6.0);
    for (int trial = 0; trial < 12; ++trial) {
        const int n = 2 + trial % 3;  // 2..4 units, 8^n assignments
        std::vector<double> w(n);
        std::vector<DistortionCurve> c(n);
        for (int i = 0; i < n; ++i) {
            w[i] = std::exp(logw(gen));
            c[i] = {a(gen), beta(gen)};
        }
        for (double target : {1.0, 1.5, 2.25, 2.5, 3.0, 4.75, 8.0}) {
            const long long budget = std::llround(target * n);
            const std::vector<int> bits = allocate_bits_ratequant(w, c, target);
            long long sum = 0;
            for (int b : bits) {
                EXPECT_GE(b, 1);
                EXPECT_LE(b, 8);
                sum += b;
            }
            ASSERT_EQ(sum, budget);
            // Brute force over every assignment with the same budget.
            double best = std::numeric_limits<double>::infinity();
            std::vector<int> x(n, 1);
            while (true) {
                long long s = 0;
                for (int v : x) s += v;
                if (s == budget) best = std::min(best, objective(w, c, x));
                int i = 0;
                while (i < n && x[i] == 8) x[i++] = 1;
                if (i == n) break;
                ++x[i];
            }
            EXPECT_NEAR(objective(w, c, bits), best, 1e-12 * best)
                << "trial " << trial << " target " << target;
        }
    }
}

TEST(CalibrationRateQuant, WaterFillingIsMonotonicInSensitivityAndHandlesFractionalTargets) {
    const int n = 90;
    std::vector<double> w(n);
    for (int i = 0; i < n; ++i) w[i] = std::exp(0.1 * i);  // increasing
    const std::vector<DistortionCurve> c(n, DistortionCurve{1.0, 3.5});
    const std::vector<int> bits = allocate_bits_ratequant(w, c, 2.5);
    EXPECT_EQ(std::accumulate(bits.begin(), bits.end(), 0), 225);
    for (int i = 1; i < n; ++i) EXPECT_GE(bits[i], bits[i - 1]);
    EXPECT_GT(bits.back(), bits.front());
    EXPECT_THROW(allocate_bits_ratequant(w, c, 0.5), std::invalid_argument);
    EXPECT_THROW(allocate_bits_ratequant(w, c, 8.5), std::invalid_argument);
    EXPECT_THROW(allocate_bits_ratequant({1.0, -1.0}, {{1, 3}, {1, 3}}, 2), std::invalid_argument);
    EXPECT_THROW(allocate_bits_ratequant({1.0, 1.0}, {{1, 3}, {1, 0.9}}, 2), std::invalid_argument);
    EXPECT_THROW(allocate_bits_ratequant({1.0}, {{1, 3}, {1, 3}}, 2), std::invalid_argument);
}

TEST(CalibrationRateQuant, CalibrateFillsUnitsPerHeadAndPerLayer) {
    const Activations acts = synthetic_activations(3, 2, 32, 200, 8);
    KVCacheConfig c;
    RateQuantOptions o;
    o.target_bits = 2.5;
    const Calibration::RateQuant r = calibrate_ratequant(acts, c, o);
    ASSERT_EQ(r.units.size(), 6u);
    EXPECT_EQ(r.units[3], "1.1");
    int sum = 0;
    for (const auto& [k, b] : r.bit_allocation) sum += b;
    EXPECT_EQ(sum, 15);
    for (double beta : r.curve_beta) EXPECT_GT(beta, 2.5);  // TurboQuant: ~3.4 per bit
    o.per_head = false;
    o.target_bits = 3;
    const Calibration::RateQuant per_layer = calibrate_ratequant(acts, c, o);
    EXPECT_EQ(per_layer.units, (std::vector<std::string>{"0", "1", "2"}));
    EXPECT_EQ(per_layer.bit_allocation.at("0") + per_layer.bit_allocation.at("1") +
                  per_layer.bit_allocation.at("2"),
              9);
}

// ---- The real model ---------------------------------------------------------------------------

std::string source_root() {
    const std::string here = __FILE__;  // <repo>/tests/test_calibration_methods.cpp
    return here.substr(0, here.size() - std::string("tests/test_calibration_methods.cpp").size());
}

std::string read_text(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    std::ostringstream s;
    s << in.rdbuf();
    return s.str();
}

TEST(CalibrationModel, RateQuantAt2p5BitsBeatsUniformBitsOnKLD) {
    const char* env = std::getenv("VQ_GGUF_MODEL");
    const std::string path = env ? env : source_root() + "models/SmolLM2-135M-Instruct.Q4_1.gguf";
    const std::string valid = "/work/shared/data/wikitext-2/valid.txt",
                      test = "/work/shared/data/wikitext-2/test.txt";
    if (!std::ifstream(path).good()) GTEST_SKIP() << path << " not present";
    if (!std::ifstream(valid).good() || !std::ifstream(test).good())
        GTEST_SKIP() << "WikiText-2 not present";
    const auto model = LlamaModel::load(path);
    const BPETokenizer tok(vocab_from_gguf(model->gguf()));
    std::vector<int32_t> calib = tok.encode(read_text(valid).substr(0, 40000), false);
    calib.resize(std::min<std::size_t>(calib.size(), 2048));
    CollectOptions co;
    co.ctx = 512;
    const Activations acts = collect_activations(*model, calib, co);
    KVCacheConfig base;
    base.method = "ratequant";
    base.value_bits = 4;
    RateQuantOptions ro;
    ro.target_bits = 2.5;
    const Calibration::RateQuant r = calibrate_ratequant(acts, base, ro);
    const int units = model->hparams().n_layer * model->hparams().n_head_kv;
    ASSERT_EQ(r.bit_allocation.size(), static_cast<std::size_t>(units));
    int sum = 0;
    for (const auto& [k, b] : r.bit_allocation) sum += b;
    EXPECT_EQ(sum, static_cast<int>(std::llround(2.5 * units)));

    // Uniform at the same average: every other head gets 3 bits, blind to sensitivity.
    KVCacheConfig calibrated = base, uniform = base;
    calibrated.bit_allocation = r.bit_allocation;
    for (int i = 0; i < units; ++i)
        uniform.bit_allocation[std::to_string(i / model->hparams().n_head_kv) + "." +
                               std::to_string(i % model->hparams().n_head_kv)] = i % 2 ? 2 : 3;
    const std::vector<int32_t> eval = tok.encode(read_text(test).substr(0, 20000), false);
    EvalOptions eo;
    eo.ctx = 512;
    eo.max_chunks = 1;
    const QualityReport rep = evaluate_quality(
        *model, eval, {{"ratequant calibrated", calibrated}, {"uniform", uniform}}, eo);
    const double kld_cal = rep.results[0].kld, kld_uni = rep.results[1].kld;
    std::printf("ratequant 2.5 bits: KLD calibrated %.5f, uniform %.5f; top-1 %.3f vs %.3f\n",
                kld_cal, kld_uni, rep.results[0].top1, rep.results[1].top1);
    EXPECT_LT(kld_cal, kld_uni);
}

}  // namespace
