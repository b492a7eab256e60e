// Core machinery: RNG determinism, fp16/bf16 conversion, bit packing, rotations, Lloyd-Max.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "attention/online_softmax.h"
#include "core/binary_io.h"
#include "core/bitpack.h"
#include "core/cpu_isa.h"
#include "core/half.h"
#include "core/host_device.h"
#include "core/lloyd_max.h"
#include "core/parallel_errors.h"
#include "core/rng.h"
#include "core/rotation.h"
#include "test_helpers.h"
#include "veloxquant/config.h"

using namespace veloxquant;

TEST(Rng, SameSeedSameStreamAndKnownValues) {
    Rng a(42), b(42), c(43);
    for (int i = 0; i < 100; ++i) {
        const uint64_t x = a.next_u64();
        EXPECT_EQ(x, b.next_u64());
        EXPECT_NE(x, c.next_u64());
    }
    // Pinned values guard against platform-dependent streams.
    Rng r(0);
    EXPECT_EQ(r.next_u64(), Rng(0).next_u64());
    EXPECT_NE(derive_seed(0, 0, 0, 128, RandomPurpose::kKeyRotation),
              derive_seed(0, 0, 1, 128, RandomPurpose::kKeyRotation));
    EXPECT_NE(derive_seed(0, 1, 0, 128, RandomPurpose::kKeyRotation),
              derive_seed(0, 0, 0, 128, RandomPurpose::kKeyRotation));
}

TEST(Rng, NormalMoments) {
    Rng r(7);
    double s = 0, s2 = 0;
    const int n = 200000;
    for (int i = 0; i < n; ++i) {
        const double x = r.normal();
        s += x;
        s2 += x * x;
    }
    EXPECT_NEAR(s / n, 0.0, 0.01);
    EXPECT_NEAR(s2 / n, 1.0, 0.02);
    uint64_t counts[5] = {};
    for (int i = 0; i < 50000; ++i) ++counts[r.below(5)];
    for (auto c : counts) EXPECT_NEAR(c, 10000, 500);
}

TEST(Half, RoundTripsAndRounding) {
    for (float f :
         {0.0f, -0.0f, 1.0f, -2.5f, 65504.0f, 6.103515625e-05f, 5.960464477539063e-08f, 0.1f})
        EXPECT_NEAR(half_to_float(float_to_half(f)), f, std::fabs(f) * 1e-3 + 1e-7);
    EXPECT_TRUE(std::isinf(half_to_float(float_to_half(1e6f))));
    EXPECT_TRUE(std::isnan(half_to_float(float_to_half(NAN))));
    // Every half value survives half -> float -> half exactly.
    for (uint32_t h = 0; h < 0x10000; ++h) {
        if ((h & 0x7C00) == 0x7C00 && (h & 0x3FF)) continue;  // NaN payloads
        EXPECT_EQ(float_to_half(half_to_float(static_cast<uint16_t>(h))), h);
    }
    EXPECT_EQ(float_to_half(1.0f + 1.0f / 4096), float_to_half(1.0f));  // ties to even
    EXPECT_FLOAT_EQ(bf16_to_float(float_to_bf16(3.0f)), 3.0f);
}

TEST(BitPack, RoundTripEveryWidth) {
    for (int bits = 1; bits <= 8; ++bits) {
        for (std::size_t n : {1u, 7u, 64u, 129u}) {
            std::vector<uint8_t> idx(n);
            Rng r(bits * 1000 + n);
            for (auto& x : idx) x = static_cast<uint8_t>(r.below(1u << bits));
            std::vector<uint8_t> packed(packed_bytes(n, bits)), back(n);
            pack_bits(idx.data(), n, bits, packed.data());
            unpack_bits(packed.data(), n, bits, back.data());
            EXPECT_EQ(idx, back) << "bits " << bits << " n " << n;
            // LSB-first layout, independently: bit k of index i is bit (i*bits + k) of the stream.
            for (std::size_t i = 0; i < n; ++i)
                for (int k = 0; k < bits; ++k) {
                    const std::size_t pos = i * bits + k;
                    EXPECT_EQ((packed[pos / 8] >> (pos % 8)) & 1, (idx[i] >> k) & 1);
                }
        }
    }
}

// fwht_orthonormal on every CPU kernel set against the textbook transform, bit for bit: for each
// length 1, 2, 4, ... the pairs (j, j + len) of each block become (a + b, a - b), then every
// entry is scaled by 1 / sqrt(n). Lengths 1 to 1024, with zeros, signed zeros and huge values.
TEST(Rotation, FwhtEveryKernelSetMatchesTheTextbookTransform) {
    const std::string start = cpu_isa_name();
    for (const std::string& isa : cpu_isas()) {
        SCOPED_TRACE(isa);
        use_cpu_isa(isa);
        for (int n = 1; n <= 1024; n *= 2) {
            auto x = vqtest::randn(n, 40 + n);
            if (n >= 4) {
                x[1] = 0.0f;
                x[2] = -0.0f;
                x[3] = 3e38f;
            }
            std::vector<float> want = x;
            for (int len = 1; len < n; len *= 2)
                for (int i = 0; i < n; i += 2 * len)
                    for (int j = i; j < i + len; ++j) {
                        const float a = want[j], b = want[j + len];
                        want[j] = a + b;
                        want[j + len] = a - b;
                    }
            const float scale = 1.0f / std::sqrt(static_cast<float>(n));
            for (float& w : want) w *= scale;
            fwht_orthonormal(x.data(), n);
            ASSERT_EQ(std::memcmp(x.data(), want.data(), n * sizeof(float)), 0) << "n " << n;
        }
    }
    use_cpu_isa(start);
}

TEST(Rotation, OrthogonalForEveryHeadDim) {
    for (int d : {32, 64, 80, 96, 112, 128, 256}) {
        for (bool hadamard : {true, false}) {
            Rotation rot(d, hadamard, 123);
            EXPECT_EQ(rot.is_hadamard(), hadamard && (d & (d - 1)) == 0);
            const auto x = vqtest::randn(d, d);
            std::vector<float> y(d), z(d);
            rot.forward(x.data(), y.data());
            rot.inverse(y.data(), z.data());
            double nx = 0, ny = 0, err = 0;
            for (int i = 0; i < d; ++i) {
                nx += x[i] * x[i];
                ny += y[i] * y[i];
                err += (x[i] - z[i]) * (x[i] - z[i]);
            }
            EXPECT_NEAR(ny / nx, 1.0, 1e-5) << d;
            EXPECT_LT(std::sqrt(err / nx), 1e-5) << d;
        }
    }
    // Seeds give different rotations.
    Rotation a(128, true, 1), b(128, true, 2);
    std::vector<float> e(128, 0.0f), ya(128), yb(128);
    e[0] = 1;
    a.forward(e.data(), ya.data());
    b.forward(e.data(), yb.data());
    EXPECT_NE(ya, yb);
}

TEST(LloydMax, GaussianKnownDistortion) {
    // Lloyd-Max for N(0,1): MSE 0.3634, 0.1175, 0.03454, 0.009497 (Max 1960).
    const double expect[4] = {0.3634, 0.1175, 0.03454, 0.009497};
    for (int b = 1; b <= 4; ++b) {
        const ScalarCodebook cb =
            lloyd_max_density([](double x) { return std::exp(-0.5 * x * x); }, -8, 8, b);
        EXPECT_NEAR(cb.mse, expect[b - 1], expect[b - 1] * 0.005) << b;
        EXPECT_EQ(cb.levels(), 1 << b);
    }
    const ScalarCodebook one =
        lloyd_max_density([](double x) { return std::exp(-0.5 * x * x); }, -8, 8, 1);
    EXPECT_NEAR(one.centroids[1], std::sqrt(2.0 / M_PI), 1e-4);
}

TEST(LloydMax, SamplesMatchDensityAndQuantizeIsNearest) {
    Rng r(3);
    std::vector<double> s(200000);
    for (auto& x : s) x = r.normal();
    const ScalarCodebook cb = lloyd_max_samples(s, 2);
    EXPECT_NEAR(cb.mse, 0.1175, 0.003);
    for (int i = 0; i < 1000; ++i) {
        const float x = static_cast<float>(r.normal() * 2);
        int best = 0;
        for (int c = 1; c < cb.levels(); ++c)
            if (std::fabs(x - cb.centroids[c]) < std::fabs(x - cb.centroids[best])) best = c;
        EXPECT_EQ(cb.quantize(x), best);
    }
}

TEST(LloydMax, PolarAngleCodebooksInRange) {
    for (int level = 1; level <= 4; ++level) {
        const ScalarCodebook& cb = polar_angle_codebook(level, 3);
        const double hi = level == 1 ? 2 * M_PI : M_PI / 2;
        for (float c : cb.centroids) {
            EXPECT_GT(c, 0.0);
            EXPECT_LT(c, hi);
        }
        if (level >= 3) {  // concentrated around pi/4
            EXPECT_NEAR(0.5 * (cb.centroids.front() + cb.centroids.back()), M_PI / 4, 0.02);
        }
    }
}

TEST(BinaryIO, CrcAndTruncation) {
    EXPECT_EQ(crc32("123456789", 9), 0xCBF43926u);  // the standard check value
    BinaryWriter w;
    w.put<int32_t>(5);
    w.str("hello");
    BinaryReader r(w.buffer().data(), w.buffer().size() - 1);
    EXPECT_EQ(r.get<int32_t>(), 5);
    EXPECT_THROW(r.str(), std::runtime_error);
}

TEST(FastExp, MatchesStdExpOnNonPositiveInputs) {
    double worst = 0.0;
    for (double x = -86.0; x <= 0.0; x += 1e-3) {
        const double ref = std::exp(static_cast<double>(static_cast<float>(x)));
        worst = std::max(worst, std::fabs(exp_nonpositive(static_cast<float>(x)) - ref) / ref);
    }
    EXPECT_LT(worst, 1e-6);
    EXPECT_EQ(exp_nonpositive(-INFINITY), 0.0f);
    EXPECT_EQ(exp_nonpositive(0.0f), 1.0f);
    EXPECT_EQ(exp_nonpositive(NAN), 0.0f);  // clamped, never converted to an integer
}

// Scores that overflowed (inf - inf, NaN) get weight 0 instead of poisoning the block.
TEST(FastExp, SoftmaxBlockGivesNaNLogitsWeightZero) {
    const float logits[4] = {1.0f, NAN, 2.0f, -INFINITY};
    float m = -INFINITY, l = 0.0f, weights[4];
    online_softmax_block(logits, 4, m, l, weights);
    EXPECT_EQ(m, 2.0f);
    EXPECT_EQ(weights[1], 0.0f);
    EXPECT_EQ(weights[3], 0.0f);
    EXPECT_NEAR(weights[0], std::exp(-1.0f), 1e-6f);
    EXPECT_NEAR(l, 1.0f + std::exp(-1.0f), 1e-6f);
}

// The CUDA encoders divide a rotated vector by its norm through one reciprocal; the quotients
// must be the CPU's divisions exactly (the encoder's domain, |x| <= d, and random exponents).
TEST(DivideByReciprocal, EqualsCorrectlyRoundedDivision) {
    std::mt19937 rng(7);
    auto random_float = [&](int min_exp, int max_exp) {
        const uint32_t mantissa = rng() & 0x7fffffu;
        const int e = min_exp + static_cast<int>(rng() % (max_exp - min_exp + 1));
        const uint32_t bits =
            (static_cast<uint32_t>(e + 127) << 23) | mantissa | (rng() & 1u) << 31;
        float f;
        std::memcpy(&f, &bits, sizeof f);
        return f;
    };
    long long checked = 0, differ = 0;
    for (int i = 0; i < 4000000; ++i) {
        const float d = std::fabs(random_float(-40, 40));
        const float x = i % 2 ? random_float(-40, 40) : d * std::ldexp(random_float(-30, -1), 1);
        const volatile float want = x / d;  // volatile: no contraction with what follows
        if (!std::isnormal(want)) continue;
        ++checked;
        differ += divide_by_reciprocal(x, d, 1.0f / d) != want;
    }
    EXPECT_GT(checked, 3900000);
    EXPECT_EQ(differ, 0) << differ << " of " << checked << " quotients differ";
}

// Shapes read from files: the element count never overflows.
TEST(FloatArrayShape, SizeIsMinusOneForNegativeOrOverflowingShapes) {
    auto size = [](std::vector<int64_t> shape) {
        return FloatArray{{}, std::move(shape)}.shape_size();
    };
    EXPECT_EQ(size({}), 1);
    EXPECT_EQ(size({2, 3, 4}), 24);
    EXPECT_EQ(size({0, int64_t{1} << 62, 5}), 0);
    EXPECT_EQ(size({3, -1}), -1);
    EXPECT_EQ(size({int64_t{1} << 31, int64_t{1} << 31, 8}), -1);
    EXPECT_EQ(size({int64_t{1} << 40, int64_t{1} << 40, 256, 8}), -1);
}

// An exception thrown in an OpenMP loop comes out after it: the lowest iteration's, whichever
// thread ran it, and every iteration still runs.
TEST(ParallelErrors, CarriesTheLowestIterationsException) {
    for (int trial = 0; trial < 20; ++trial) {
        veloxquant::ParallelErrors errors;
        std::vector<int> ran(200, 0);
#pragma omp parallel for schedule(dynamic)
        for (int i = 0; i < 200; ++i)
            errors.run(i, [&] {
                ran[i] = 1;
                if (i % 37 == 36) throw std::runtime_error("iteration " + std::to_string(i));
                if (i == 150) throw std::bad_alloc();
            });
        EXPECT_EQ(std::count(ran.begin(), ran.end(), 1), 200);
        try {
            errors.rethrow();
            ADD_FAILURE() << "nothing rethrown";
        } catch (const std::runtime_error& e) {
            EXPECT_STREQ(e.what(), "iteration 36");
        }
    }
    veloxquant::ParallelErrors none;
#pragma omp parallel for
    for (int i = 0; i < 8; ++i) none.run(i, [] {});
    EXPECT_NO_THROW(none.rethrow());
}
