// RaBitQ key codec: unbiased estimator (over the random rotation), error falling with bits,
// score == <q, decode(k)>, an independent 1-bit reference, exact extended-RaBitQ code search,
// IVF benefit on clustered keys, state round trip, determinism and argument checks.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/bitpack.h"
#include "core/cpu_isa.h"
#include "core/kmeans.h"
#include "core/rng.h"
#include "methods/rabitq.h"
#include "test_helpers.h"

namespace veloxquant {
namespace {

using vqtest::dot;
using vqtest::gaussian;
using vqtest::norm;

// Encoded tokens of one codec.
struct Encoded {
    std::vector<uint8_t> codes;
    std::vector<float> scalars;
};

Encoded encode_all(const RaBitQCodec& codec, const std::vector<float>& keys) {
    const int n = static_cast<int>(keys.size()) / codec.dim();
    Encoded e;
    e.codes.resize(codec.code_bytes() * n);
    e.scalars.resize(static_cast<std::size_t>(codec.num_scalars()) * n);
    codec.encode(keys.data(), n, e.codes.data(), e.scalars.data(), n);
    return e;
}

std::vector<float> scores_of(const RaBitQCodec& codec, const float* q, const Encoded& e, int n) {
    std::vector<float> state(codec.query_state_size()), s(n);
    codec.prepare_query(q, state.data());
    codec.score(state.data(), e.codes.data(), e.scalars.data(), n, n, s.data());
    return s;
}

struct ErrorStats {
    double mean = 0.0, se = 0.0, mse = 0.0;
};

ErrorStats stats(const std::vector<double>& err) {
    ErrorStats st;
    for (double e : err) st.mean += e;
    st.mean /= err.size();
    double var = 0.0;
    for (double e : err) {
        var += (e - st.mean) * (e - st.mean);
        st.mse += e * e;
    }
    st.se = std::sqrt(var / (err.size() - 1) / err.size());
    st.mse /= err.size();
    return st;
}

// Estimate errors over pairs (k, q = 0.5 k + noise), with a fresh codec seed (a new Haar
// rotation) every `per_codec` pairs; keys have a common offset so the IVF centroid matters.
std::vector<double> estimate_errors(int d, int bits, int pairs, int per_codec, uint64_t seed) {
    Rng rng(seed);
    std::vector<double> err;
    for (int g = 0; g < pairs / per_codec; ++g) {
        RaBitQCodec codec(d, bits, 4, /*use_hadamard=*/false, rng.next_u64());
        const std::vector<float> train = gaussian(rng, 64 * static_cast<std::size_t>(d), 1.0, 0.7);
        codec.train(train.data(), 64);
        const std::vector<float> keys =
            gaussian(rng, static_cast<std::size_t>(per_codec) * d, 1.0, 0.7);
        const Encoded enc = encode_all(codec, keys);
        for (int t = 0; t < per_codec; ++t) {
            const float* k = &keys[static_cast<std::size_t>(t) * d];
            std::vector<float> q = gaussian(rng, d);
            for (int j = 0; j < d; ++j) q[j] += 0.5f * k[j];
            std::vector<float> state(codec.query_state_size());
            codec.prepare_query(q.data(), state.data());
            float s = 0.0f;
            codec.score(state.data(), &enc.codes[t * codec.code_bytes()], &enc.scalars[t], 1, 1,
                        &s);
            err.push_back(s - dot(q.data(), k, d));
        }
    }
    return err;
}

TEST(RaBitQ, UnbiasedOverRotation) {
    for (int bits : {1, 2}) {
        const std::vector<double> err = estimate_errors(64, bits, 12000, 8, 1000 + bits);
        const ErrorStats st = stats(err);
        std::printf(
            "[rabitq] unbiased bits=%d: pairs=%zu mean err=%.5f SE=%.5f (%.2f SE), "
            "rms err=%.4f\n",
            bits, err.size(), st.mean, st.se, st.mean / st.se, std::sqrt(st.mse));
        EXPECT_LT(std::fabs(st.mean), 3.0 * st.se) << "bits " << bits;
        EXPECT_GT(st.se, 0.0);
    }
}

// Test-side 1-bit RaBitQ estimator written from the paper: o_bar = sign(o)/sqrt(d),
// <q', x> ~ <q', c> + ||e|| <o_bar, q'> / <o_bar, o>.
double reference_one_bit(const RaBitQCodec& codec, const float* k, const float* q) {
    const int d = codec.dim();
    std::vector<float> x(d), qr(d);
    codec.rotation().forward(k, x.data());
    codec.rotation().forward(q, qr.data());
    const auto& cents = codec.centroids();
    int best = 0;
    double best_d = 1e300;
    for (int c = 0; c < codec.trained_clusters(); ++c) {
        double dd = 0.0;
        for (int j = 0; j < d; ++j) dd += std::pow(x[j] - cents[c * d + j], 2);
        if (dd < best_d) best_d = dd, best = c;
    }
    const float* c = &cents[static_cast<std::size_t>(best) * d];
    std::vector<double> o(d);
    double en = 0.0;
    for (int j = 0; j < d; ++j) en += std::pow(o[j] = x[j] - c[j], 2);
    en = std::sqrt(en);
    double obar_o = 0.0, obar_q = 0.0;
    for (int j = 0; j < d; ++j) {
        const double obar = (o[j] >= 0.0 ? 1.0 : -1.0) / std::sqrt(static_cast<double>(d));
        obar_o += obar * o[j] / en;
        obar_q += obar * qr[j];
    }
    return dot(qr.data(), c, d) + en * obar_q / obar_o;
}

TEST(RaBitQ, ErrorFallsWithBitsAndMatchesReference) {
    const int d = 128, n = 3000;
    Rng rng(42);
    const std::vector<float> keys = gaussian(rng, static_cast<std::size_t>(n) * d, 1.0, 0.3);
    std::vector<float> queries = gaussian(rng, static_cast<std::size_t>(n) * d);
    for (std::size_t i = 0; i < queries.size(); ++i) queries[i] += 0.5f * keys[i];
    double prev = 1e300;
    for (int bits = 1; bits <= 4; ++bits) {
        RaBitQCodec codec(d, bits, 16, true, 7);
        codec.train(keys.data(), 500);
        const Encoded enc = encode_all(codec, keys);
        std::vector<double> err;
        for (int t = 0; t < n; ++t) {
            const float* k = &keys[static_cast<std::size_t>(t) * d];
            const float* q = &queries[static_cast<std::size_t>(t) * d];
            Encoded one{{enc.codes.begin() + t * codec.code_bytes(),
                         enc.codes.begin() + (t + 1) * codec.code_bytes()},
                        {enc.scalars[t]}};
            const double s = scores_of(codec, q, one, 1)[0];
            err.push_back(s - dot(q, k, d));
            if (bits == 1 && t < 300) {
                ASSERT_NEAR(s, reference_one_bit(codec, k, q), 2e-5 * norm(q, d) * norm(k, d));
            }
        }
        const ErrorStats st = stats(err);
        std::printf("[rabitq] d=%d bits=%d: MSE of estimate=%.5f (mean err %.4f)\n", d, bits,
                    st.mse, st.mean);
        EXPECT_LT(st.mse, 0.5 * prev) << "bits " << bits;
        prev = st.mse;
    }
}

// The stored levels maximise <x_bar, o>/||x_bar|| over the whole grid (brute force), and the
// stored factor is ||e||^2 / <x_bar, e>.
TEST(RaBitQ, ExtendedCodeIsCosineOptimal) {
    const int cases[][2] = {{6, 2}, {5, 3}, {4, 4}, {3, 5}, {7, 1}};
    for (const auto& cs : cases) {
        const int d = cs[0], bits = cs[1], levels = 1 << bits;
        Rng rng(900 + d);
        RaBitQCodec codec(d, bits, 1, true, 3 + d);
        const std::vector<float> train = gaussian(rng, 40 * static_cast<std::size_t>(d));
        codec.train(train.data(), 40);
        const std::vector<float> keys = gaussian(rng, 25 * static_cast<std::size_t>(d));
        const Encoded enc = encode_all(codec, keys);
        for (int t = 0; t < 25; ++t) {
            std::vector<float> x(d);
            codec.rotation().forward(&keys[t * d], x.data());
            std::vector<double> e(d);
            double ee = 0.0;
            for (int j = 0; j < d; ++j) ee += std::pow(e[j] = x[j] - codec.centroids()[j], 2);
            auto cosine = [&](const std::vector<int>& u, double* xe) {
                double ip = 0.0, nn = 0.0;
                for (int j = 0; j < d; ++j) {
                    const double g = u[j] - 0.5 * (levels - 1);
                    ip += g * e[j];
                    nn += g * g;
                }
                if (xe) *xe = ip;
                return ip / std::sqrt(nn * ee);
            };
            std::vector<int> got(d);
            for (int j = 0; j < d; ++j)
                got[j] =
                    static_cast<int>(read_packed(&enc.codes[t * codec.code_bytes() + 1], j, bits));
            double xe = 0.0;
            const double got_cos = cosine(got, &xe);
            double best = -2.0;
            std::vector<int> u(d, 0);
            for (long idx = 0; idx < std::lround(std::pow(levels, d)); ++idx) {
                long r = idx;
                for (int j = 0; j < d; ++j, r /= levels) u[j] = static_cast<int>(r % levels);
                best = std::max(best, cosine(u, nullptr));
            }
            EXPECT_GE(got_cos, best - 1e-9) << "d=" << d << " bits=" << bits << " t=" << t;
            EXPECT_NEAR(enc.scalars[t], ee / xe, 1e-5 * ee / xe);
        }
    }
}

// Checks score == <q, decode(k)> for trained codecs sharing one centroid set.
void expect_score_matches_decode(int d, int bits, const RaBitQCodec& trained,
                                 const std::vector<float>& keys, int n, Rng& rng) {
    const Encoded enc = encode_all(trained, keys);
    std::vector<float> dec(static_cast<std::size_t>(n) * d);
    trained.decode(enc.codes.data(), enc.scalars.data(), n, n, dec.data());
    for (int qi = 0; qi < 4; ++qi) {
        const std::vector<float> q = gaussian(rng, d);
        const std::vector<float> s = scores_of(trained, q.data(), enc, n);
        for (int t = 0; t < n; ++t) {
            const double want = dot(q.data(), &dec[static_cast<std::size_t>(t) * d], d);
            const double scale =
                norm(q.data(), d) * norm(&keys[static_cast<std::size_t>(t) * d], d);
            ASSERT_NEAR(s[t], want, 1e-5 * scale) << "d=" << d << " bits=" << bits << " t=" << t;
        }
    }
}

TEST(RaBitQ, ScoreEqualsDotWithDecode) {
    for (int d : {64, 80, 96, 128, 256}) {
        for (int clusters : {1, 16, 300}) {
            Rng rng(d * 1000 + clusters);
            const int n = 600;
            const std::vector<float> keys =
                gaussian(rng, static_cast<std::size_t>(n) * d, 1.0, 0.2);
            RaBitQCodec base(d, 1, clusters, true, 55);
            base.train(keys.data(), n);
            BinaryWriter w;
            base.save_state(w);
            for (int bits = 1; bits <= 4; ++bits) {
                RaBitQCodec codec(d, bits, clusters, true, 55);
                BinaryReader r(w.buffer().data(), w.buffer().size());
                codec.load_state(r);
                ASSERT_EQ(codec.code_bytes(), (clusters > 256 ? 2u : 1u) + packed_bytes(d, bits));
                expect_score_matches_decode(d, bits, codec, keys, n, rng);
                if (clusters == 300 && bits == 1) {
                    // Two-byte ids: some token lands in a cluster >= 256.
                    const Encoded enc = encode_all(codec, keys);
                    int max_id = 0;
                    for (int t = 0; t < n; ++t) {
                        const uint8_t* c = &enc.codes[t * codec.code_bytes()];
                        max_id = std::max(max_id, c[0] | (c[1] << 8));
                    }
                    EXPECT_GE(max_id, 256);
                    EXPECT_LT(max_id, 300);
                }
            }
        }
    }
}

// Every instruction set's tables (nibble tables where a SIMD build of nibble_table_sums runs,
// byte tables on the generic set) score as the decoded keys do, and score_rows_at gives each
// row score's bits, over whole SIMD blocks of tokens and a tail, with 1- and 2-byte ids.
TEST(RaBitQ, EveryInstructionSetScoresAsDecodeAndRowsAsRowByRow) {
    const int n = 53, rows = 5;
    const std::string start = cpu_isa_name();
    for (const int d : {64, 100, 37})
        for (const int clusters : {8, 300})
            for (const int bits : {1, 2, 4}) {
                Rng rng(d * 7 + clusters + bits);
                const std::vector<float> keys =
                    gaussian(rng, static_cast<std::size_t>(n) * d, 1.0, 0.2);
                RaBitQCodec codec(d, bits, clusters, d != 37, 3);
                codec.train(keys.data(), n);
                const Encoded enc = encode_all(codec, keys);
                std::vector<float> dec(keys.size());
                codec.decode(enc.codes.data(), enc.scalars.data(), n, n, dec.data());
                const std::vector<float> queries =
                    gaussian(rng, static_cast<std::size_t>(rows) * d);
                const std::size_t qs = codec.query_state_size();
                for (const std::string& isa : cpu_isas()) {
                    SCOPED_TRACE(isa + " d " + std::to_string(d) + " clusters " +
                                 std::to_string(clusters) + " bits " + std::to_string(bits));
                    use_cpu_isa(isa);
                    std::vector<float> states(rows * qs), one(rows * n), together(rows * n, NAN);
                    for (int r = 0; r < rows; ++r) {
                        const float* q = &queries[static_cast<std::size_t>(r) * d];
                        codec.prepare_query(q, &states[r * qs]);
                        codec.score(&states[r * qs], enc.codes.data(), enc.scalars.data(), n, n,
                                    &one[r * n]);
                        for (int t = 0; t < n; ++t) {
                            const float* k = &keys[static_cast<std::size_t>(t) * d];
                            ASSERT_NEAR(one[r * n + t],
                                        dot(q, &dec[static_cast<std::size_t>(t) * d], d),
                                        1e-5 * norm(q, d) * norm(k, d));
                        }
                    }
                    codec.score_rows_at(states.data(), qs, rows, enc.codes.data(),
                                        enc.scalars.data(), n, n, 0, together.data(), n);
                    ASSERT_EQ(std::memcmp(together.data(), one.data(), one.size() * sizeof(float)),
                              0);
                }
            }
    use_cpu_isa(start);
}

TEST(RaBitQ, OddDimsAndAllWidths) {
    for (int d : {2, 5, 13, 100}) {
        for (int bits = 1; bits <= 8; ++bits) {
            Rng rng(d * 31 + bits);
            const int n = 50;
            const std::vector<float> keys = gaussian(rng, static_cast<std::size_t>(n) * d);
            RaBitQCodec codec(d, bits, 4, true, 9);
            codec.train(keys.data(), 20);
            expect_score_matches_decode(d, bits, codec, keys, n, rng);
            // Reconstruction improves with bits; at 8 bits it is close.
            if (bits == 8) {
                const Encoded enc = encode_all(codec, keys);
                std::vector<float> dec(keys.size());
                codec.decode(enc.codes.data(), enc.scalars.data(), n, n, dec.data());
                double err = 0.0, tot = 0.0;
                for (std::size_t i = 0; i < keys.size(); ++i) {
                    err += std::pow(dec[i] - keys[i], 2);
                    tot += std::pow(keys[i], 2);
                }
                EXPECT_LT(err / tot, 1e-3) << "d=" << d;
            }
        }
    }
}

// Relative squared reconstruction error of clustered keys for a number of IVF centroids.
double ivf_error(int clusters, const std::vector<float>& keys, int n, int d) {
    RaBitQCodec codec(d, 2, clusters, true, 17);
    codec.train(keys.data(), n);
    EXPECT_EQ(codec.trained_clusters(), clusters);
    EXPECT_EQ(codec.parameter_bytes(),
              codec.rotation().parameter_bytes() + sizeof(float) * clusters * d);
    const Encoded enc = encode_all(codec, keys);
    std::vector<float> dec(keys.size());
    codec.decode(enc.codes.data(), enc.scalars.data(), n, n, dec.data());
    double err = 0.0, tot = 0.0;
    for (std::size_t i = 0; i < keys.size(); ++i) {
        err += std::pow(dec[i] - keys[i], 2);
        tot += std::pow(keys[i], 2);
    }
    return err / tot;
}

TEST(RaBitQ, MoreClustersLowerErrorOnClusteredKeys) {
    const int d = 64, blobs = 32, n = 2000;
    Rng rng(61);
    const std::vector<float> centers = gaussian(rng, static_cast<std::size_t>(blobs) * d, 2.0);
    std::vector<float> keys(static_cast<std::size_t>(n) * d);
    for (int i = 0; i < n; ++i) {
        const int b = static_cast<int>(rng.below(blobs));
        for (int j = 0; j < d; ++j)
            keys[i * d + j] = centers[b * d + j] + static_cast<float>(0.5 * rng.normal());
    }
    std::vector<double> errs;
    for (int clusters : {1, 4, 32}) {
        errs.push_back(ivf_error(clusters, keys, n, d));
        std::printf("[rabitq] clustered keys, bits=2, num_clusters=%d: rel. recon error %.5f\n",
                    clusters, errs.back());
    }
    EXPECT_LT(errs[1], errs[0]);
    EXPECT_LT(errs[2], errs[1]);
    EXPECT_LT(errs[2], 0.25 * errs[0]);  // 32 centroids capture the 32 blobs
}

TEST(RaBitQ, StateRoundTripAndCorruption) {
    const int d = 64, n = 400;
    Rng rng(12);
    const std::vector<float> keys = gaussian(rng, static_cast<std::size_t>(n) * d);
    RaBitQCodec a(d, 2, 16, true, 5);
    a.train(keys.data(), n);
    BinaryWriter w;
    a.save_state(w);
    const std::string& buf = w.buffer();

    RaBitQCodec b(d, 2, 16, true, 5);
    EXPECT_TRUE(b.needs_training());
    BinaryReader r(buf.data(), buf.size());
    b.load_state(r);
    EXPECT_FALSE(b.needs_training());
    EXPECT_EQ(a.centroids(), b.centroids());
    const Encoded ea = encode_all(a, keys), eb = encode_all(b, keys);
    EXPECT_EQ(ea.codes, eb.codes);
    EXPECT_EQ(ea.scalars, eb.scalars);
    const std::vector<float> q = gaussian(rng, d);
    EXPECT_EQ(scores_of(a, q.data(), ea, n), scores_of(b, q.data(), eb, n));

    for (std::size_t cut : {std::size_t{0}, std::size_t{3}, std::size_t{8}, std::size_t{15},
                            buf.size() / 2, buf.size() - 1}) {
        RaBitQCodec c(d, 2, 16, true, 5);
        BinaryReader tr(buf.data(), cut);
        EXPECT_THROW(c.load_state(tr), std::runtime_error) << "cut " << cut;
        EXPECT_TRUE(c.needs_training());
    }
    auto expect_corrupt = [&](std::string bad, RaBitQCodec& c) {
        BinaryReader br(bad.data(), bad.size());
        EXPECT_THROW(c.load_state(br), std::runtime_error);
    };
    RaBitQCodec fewer(d, 2, 8, true, 5);  // 16 centroids do not fit 8 clusters
    expect_corrupt(buf, fewer);
    RaBitQCodec wider(d + 8, 2, 16, true, 5);
    expect_corrupt(buf, wider);
    std::string bad_count = buf;
    bad_count[4] = 17;  // k field (after the int32 dim) no longer matches the array
    RaBitQCodec c1(d, 2, 32, true, 5);
    expect_corrupt(bad_count, c1);
    std::string nan_state = buf;
    const float nan = std::nanf("");
    std::memcpy(&nan_state[16], &nan, sizeof nan);  // first centroid float
    RaBitQCodec c2(d, 2, 16, true, 5);
    expect_corrupt(nan_state, c2);
}

TEST(RaBitQ, DeterministicBySeed) {
    const int d = 96, n = 300;
    Rng rng(77);
    const std::vector<float> keys = gaussian(rng, static_cast<std::size_t>(n) * d);
    auto run = [&](uint64_t seed) {
        RaBitQCodec c(d, 3, 8, true, seed);
        c.train(keys.data(), n);
        return encode_all(c, keys);
    };
    const Encoded a = run(1), b = run(1), other = run(2);
    EXPECT_EQ(a.codes, b.codes);
    EXPECT_EQ(a.scalars, b.scalars);
    EXPECT_NE(a.codes, other.codes);
}

// A long first prefill trains on 32 keys per centroid; training on those rows alone (what a
// device cache copies to the host) learns the same centroids, bit for bit.
TEST(RaBitQ, TrainsOnItsTrainingRowsAlone) {
    const int d = 64, clusters = 8, n = 1000;
    Rng rng(78);
    const std::vector<float> keys = gaussian(rng, static_cast<std::size_t>(n) * d);
    RaBitQCodec all(d, 2, clusters, true, 5), picked(d, 2, clusters, true, 5);
    const int m = all.training_rows(n);
    ASSERT_EQ(m, 32 * clusters);
    EXPECT_EQ(all.training_rows(m), m);
    EXPECT_EQ(all.training_rows(100), 100);  // a short prefill: every row
    std::vector<float> rows;
    for (int i = 0; i < m; ++i) {
        const float* row = keys.data() + training_row(i, n, m) * d;
        rows.insert(rows.end(), row, row + d);
    }
    all.train(keys.data(), n);
    picked.train(rows.data(), m);
    EXPECT_EQ(all.centroids(), picked.centroids());
    EXPECT_EQ(encode_all(all, keys).codes, encode_all(picked, keys).codes);
}

// The device cache runs train()'s k-means elsewhere: kmeans_problem and rotated_training_rows
// state it, and adopting kmeans()'s result trains the codec as train() does; adopt_centroids
// refuses centroids of another shape and leaves the codec untrained then.
TEST(RaBitQ, AdoptingItsKMeansProblemsResultTrainsAsTrainDoes) {
    const int d = 32, clusters = 16, n = 900;
    Rng rng(91);
    const std::vector<float> keys = gaussian(rng, static_cast<std::size_t>(n) * d);
    RaBitQCodec trained(d, 3, clusters, true, 12), adopted(d, 3, clusters, true, 12);
    trained.train(keys.data(), n);
    const RaBitQCodec::KMeansProblem p = adopted.kmeans_problem(n);
    EXPECT_EQ(p.n, 32 * clusters);
    EXPECT_EQ(p.k, clusters);
    std::vector<float> points(static_cast<std::size_t>(p.n) * d);
    adopted.rotated_training_rows(keys.data(), n, points.data());
    const KMeansResult km = kmeans(points.data(), p.n, d, p.k, p.seed);
    EXPECT_THROW(adopted.adopt_centroids(km.centroids, clusters + 1), std::invalid_argument);
    EXPECT_THROW(adopted.adopt_centroids(std::vector<float>(d * clusters - 1), clusters),
                 std::invalid_argument);
    EXPECT_TRUE(adopted.needs_training());
    adopted.adopt_centroids(km.centroids, km.k);
    EXPECT_EQ(trained.centroids(), adopted.centroids());
    EXPECT_EQ(encode_all(trained, keys).codes, encode_all(adopted, keys).codes);
    EXPECT_EQ(adopted.kmeans_problem(5).k, 5);  // a short prefill: a centroid a key
    EXPECT_THROW(adopted.kmeans_problem(0), std::invalid_argument);
}

// Heads train in parallel (OpenMP): a head's exception reaches the caller instead of ending the
// process.
TEST(RaBitQ, TrainingHeadsInParallelRethrows) {
    std::vector<std::unique_ptr<KeyCodec>> heads;
    for (int h = 0; h < 3; ++h)
        heads.push_back(std::make_unique<RaBitQCodec>(16, 2, 4, true, 10 + h));
    const std::vector<float> keys(3 * 16, 0.5f);
    EXPECT_THROW(train_key_codecs(heads, keys.data(), 0), std::invalid_argument);
    train_key_codecs(heads, keys.data(), 1);
    for (const auto& h : heads) EXPECT_FALSE(h->needs_training());
}

void expect_invalid(int d, int bits, int clusters, const std::string& needle) {
    try {
        RaBitQCodec c(d, bits, clusters, true, 0);
        ADD_FAILURE() << "no throw for d=" << d << " bits=" << bits << " clusters=" << clusters;
    } catch (const std::invalid_argument& e) {
        EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
}

TEST(RaBitQ, InvalidArgumentsAndUntrainedUse) {
    expect_invalid(1, 1, 4, "head dim");
    expect_invalid(1025, 1, 4, "head dim");
    expect_invalid(64, 0, 4, "bits");
    expect_invalid(64, 9, 4, "bits");
    expect_invalid(64, 1, 0, "num_clusters");
    expect_invalid(64, 1, 65537, "num_clusters");
    EXPECT_NO_THROW(RaBitQCodec(64, 1, 65536, true, 0));

    RaBitQCodec c(32, 2, 4, true, 0);
    EXPECT_TRUE(c.needs_training());
    std::vector<float> k(32, 1.0f), state(c.query_state_size());
    std::vector<uint8_t> code(c.code_bytes());
    float f = 0.0f;
    EXPECT_THROW(c.encode(k.data(), 1, code.data(), &f, 1), std::logic_error);
    EXPECT_THROW(c.decode(code.data(), &f, 1, 1, k.data()), std::logic_error);
    EXPECT_THROW(c.prepare_query(k.data(), state.data()), std::logic_error);
    EXPECT_THROW(c.train(k.data(), 0), std::invalid_argument);
    c.train(k.data(), 1);  // one key: one centroid, the key itself
    EXPECT_FALSE(c.needs_training());
    EXPECT_EQ(c.trained_clusters(), 1);
    c.encode(k.data(), 1, code.data(), &f, 1);
    EXPECT_EQ(f, 0.0f);  // zero residual: decodes to the centroid exactly
    std::vector<float> back(32);
    c.decode(code.data(), &f, 1, 1, back.data());
    for (int j = 0; j < 32; ++j) EXPECT_NEAR(back[j], 1.0f, 1e-5f);
    code[0] = 3;  // id past the trained centroids
    EXPECT_THROW(c.decode(code.data(), &f, 1, 1, back.data()), std::runtime_error);
}

}  // namespace
}  // namespace veloxquant
