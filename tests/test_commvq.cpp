// CommVQ: codec against a naive double-precision reference (bit reading, codeword sums, RoPE,
// dot products), greedy/ICM/exhaustive code search, RoPE commutation (encode-then-rotate equals
// rotate-then-encode), fused against unfused attention in a cache, save/load, config errors,
// the EM objective, and calibrated against random codebooks on held-out keys (synthetic, and
// the real model's keys when the model file exists).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "calibration/commvq_calibration.h"
#include "methods/commvq.h"
#include "model/llama_model.h"
#include "model/tokenizer.h"
#include "test_helpers.h"
#include "veloxquant/caches.h"
#include "veloxquant/factory.h"

namespace veloxquant {
namespace {

using vqtest::read_index;

std::vector<double> inv_freq_for(int d, double base) {
    std::vector<double> f(d / 2);
    for (int i = 0; i < d / 2; ++i) f[i] = std::pow(base, -2.0 * i / d);
    return f;
}

// RoPE in double, written out per pair (x + jy) * (cos + j sin).
std::vector<double> rope_ref(const double* x, int d, const std::vector<double>& f, double pos) {
    std::vector<double> y(x, x + d);
    for (std::size_t i = 0; i < f.size() && 2 * i + 1 < static_cast<std::size_t>(d); ++i) {
        const double a = pos * f[i];
        y[2 * i] = x[2 * i] * std::cos(a) - x[2 * i + 1] * std::sin(a);
        y[2 * i + 1] = x[2 * i] * std::sin(a) + x[2 * i + 1] * std::cos(a);
    }
    return y;
}

std::vector<float> to_float(const std::vector<double>& v) {
    return std::vector<float>(v.begin(), v.end());
}
std::vector<double> to_double(const float* x, int d) {
    return std::vector<double>(x, x + d);
}

// Keys with the structure of real ones: a per-channel mean, a few strong directions, channel
// scales spanning 10x, and noise.
std::vector<float> structured_keys(int n, int d, uint64_t seed) {
    std::mt19937_64 gen(seed);
    std::normal_distribution<double> N(0.0, 1.0);
    std::mt19937_64 fixed(4242);  // the same structure for every call
    std::vector<double> mean(d), scale(d), dirs(4 * d);
    for (int j = 0; j < d; ++j) {
        mean[j] = 2.0 * N(fixed);
        scale[j] = std::pow(10.0, (j % 7) / 6.0);
    }
    for (auto& v : dirs) v = N(fixed);
    std::vector<float> x(static_cast<std::size_t>(n) * d);
    for (int i = 0; i < n; ++i) {
        double u[4];
        for (double& v : u) v = N(gen);
        for (int j = 0; j < d; ++j) {
            double v = mean[j] + 0.3 * N(gen);
            for (int r = 0; r < 4; ++r) v += u[r] * dirs[r * d + j];
            x[static_cast<std::size_t>(i) * d + j] = static_cast<float>(v * scale[j] * 0.3);
        }
    }
    return x;
}

std::vector<float> random_codebook(int stages, int groups, int C, int gd, uint64_t seed,
                                   double sigma) {
    std::mt19937_64 gen(seed);
    std::normal_distribution<double> N(0.0, 1.0);
    std::vector<float> w(static_cast<std::size_t>(stages) * groups * C * gd);
    for (int s = 0; s < stages; ++s)
        for (std::size_t i = 0; i < w.size() / stages; ++i)
            w[s * (w.size() / stages) + i] = static_cast<float>(sigma * std::pow(0.5, s) * N(gen));
    return w;
}

// The pre-RoPE reconstruction of one code from the raw codebook, in double.
std::vector<double> naive_decode(const std::vector<float>& book, const uint8_t* code, int S, int G,
                                 int C, int gd) {
    int bits = 0;
    while ((1 << bits) < C) ++bits;
    std::vector<double> z(static_cast<std::size_t>(G) * gd, 0.0);
    for (int s = 0; s < S; ++s)
        for (int g = 0; g < G; ++g) {
            const int c = read_index(code, s * G + g, bits);
            for (int j = 0; j < gd; ++j)
                z[g * gd + j] += book[((static_cast<std::size_t>(s) * G + g) * C + c) * gd + j];
        }
    return z;
}

double sq_dist(const std::vector<double>& a, const float* b) {
    double s = 0.0;
    for (std::size_t j = 0; j < a.size(); ++j) s += (a[j] - b[j]) * (a[j] - b[j]);
    return s;
}

// Greedy residual error of one group in double (the search the codec must not do worse than).
double greedy_error(const std::vector<float>& book, const double* x, int g, int S, int G, int C,
                    int gd) {
    std::vector<double> r(x, x + gd);
    for (int s = 0; s < S; ++s) {
        int best = 0;
        double bd = INFINITY;
        for (int c = 0; c < C; ++c) {
            double dd = 0.0;
            for (int j = 0; j < gd; ++j) {
                const double e =
                    r[j] - book[((static_cast<std::size_t>(s) * G + g) * C + c) * gd + j];
                dd += e * e;
            }
            if (dd < bd) bd = dd, best = c;
        }
        for (int j = 0; j < gd; ++j)
            r[j] -= book[((static_cast<std::size_t>(s) * G + g) * C + best) * gd + j];
    }
    double e = 0.0;
    for (double v : r) e += v * v;
    return e;
}

KVCacheConfig commvq_config(const std::vector<float>& book, int L, int H, int S, int G, int C,
                            int gd, int bits, std::vector<double> freq) {
    KVCacheConfig c;
    c.method = "commvq";
    c.bits = bits;
    c.codebook.data = book;
    c.codebook.shape = {L, H, S, G, C, gd};
    c.rope_inv_freq = std::move(freq);
    return c;
}

TEST(CommVQCodec, MatchesNaiveReferenceWithFullPartialAndNoRope) {
    const int d = 64, S = 2, G = 8, C = 256, gd = 8, n = 150;
    const auto book = random_codebook(S, G, C, gd, 7, 1.0);
    const auto keys = structured_keys(n, d, 11);
    const auto q = vqtest::randn(d, 12);
    for (const int rope_pairs : {d / 2, 20, 0}) {  // full RoPE, partial RoPE, positions unknown
        auto freq = inv_freq_for(d, 10000.0);
        freq.resize(rope_pairs);
        const bool with_rope = rope_pairs > 0;
        CommVQCodec codec(d, book.data(), S, G, C, gd, freq);
        EXPECT_EQ(codec.code_bytes(), 16u);  // 16 indices of 8 bits: 2 bits per coordinate
        EXPECT_DOUBLE_EQ(codec.bits_per_coordinate(), 2.0);
        const int pos0 = with_rope ? 1000 : 0;
        std::vector<uint8_t> codes(codec.code_bytes() * n);
        codec.encode_at(keys.data(), n, pos0, codes.data(), nullptr, n);
        std::vector<float> dec(static_cast<std::size_t>(n) * d), scores(n);
        codec.decode_at(codes.data(), nullptr, n, n, pos0, dec.data());
        std::vector<float> state(codec.query_state_size());
        codec.prepare_query(q.data(), state.data());
        codec.score_at(state.data(), codes.data(), nullptr, n, n, pos0, scores.data());
        for (int t = 0; t < n; ++t) {
            const double p = with_rope ? pos0 + t : 0.0;
            const auto z = naive_decode(book, &codes[t * codec.code_bytes()], S, G, C, gd);
            const auto k = rope_ref(z.data(), d, freq, p);
            const double kn = std::sqrt(sq_dist(k, std::vector<float>(d, 0.0f).data()));
            EXPECT_LT(std::sqrt(sq_dist(k, &dec[static_cast<std::size_t>(t) * d])),
                      1e-5 * kn + 1e-6)
                << t;
            double ref = 0.0;
            for (int j = 0; j < d; ++j) ref += q[j] * k[j];
            EXPECT_NEAR(scores[t], ref, 1e-5 * kn * vqtest::norm(q.data(), d) + 1e-6) << t;
            // The code search (greedy + ICM) is never worse than greedy, group by group.
            const auto x =
                rope_ref(to_double(&keys[static_cast<std::size_t>(t) * d], d).data(), d, freq, -p);
            for (int g = 0; g < G; ++g) {
                double e = 0.0;
                for (int j = 0; j < gd; ++j)
                    e += (x[g * gd + j] - z[g * gd + j]) * (x[g * gd + j] - z[g * gd + j]);
                EXPECT_LE(e, greedy_error(book, &x[g * gd], g, S, G, C, gd) * (1 + 1e-5) + 1e-9)
                    << t << " " << g;
            }
        }
        // Position-free calls are positions 0.. of a run.
        std::vector<uint8_t> codes0(codes.size());
        codec.encode(keys.data(), n, codes0.data(), nullptr, n);
        std::vector<uint8_t> codes0_at(codes.size());
        codec.encode_at(keys.data(), n, 0, codes0_at.data(), nullptr, n);
        EXPECT_EQ(codes0, codes0_at);
    }
}

TEST(CommVQCodec, CodeSearchBetweenGreedyAndExhaustive) {
    // Tiny codebooks: every combination of S = 3 stages of C = 4 can be tried.
    const int d = 8, S = 3, G = 2, C = 4, gd = 4, n = 300;
    const auto book = random_codebook(S, G, C, gd, 21, 1.0);
    const auto keys = vqtest::randn(static_cast<std::size_t>(n) * d, 22);
    CommVQCodec codec(d, book.data(), S, G, C, gd, {});
    std::vector<uint8_t> codes(codec.code_bytes() * n);
    codec.encode(keys.data(), n, codes.data(), nullptr, n);
    double codec_err = 0.0, greedy_err = 0.0, best_err = 0.0;
    for (int t = 0; t < n; ++t) {
        const auto x = to_double(&keys[static_cast<std::size_t>(t) * d], d);
        const auto z = naive_decode(book, &codes[t * codec.code_bytes()], S, G, C, gd);
        codec_err += sq_dist(z, keys.data() + static_cast<std::size_t>(t) * d);
        for (int g = 0; g < G; ++g) {
            greedy_err += greedy_error(book, &x[g * gd], g, S, G, C, gd);
            double best = INFINITY;
            for (int combo = 0; combo < C * C * C; ++combo) {
                double e = 0.0;
                for (int j = 0; j < gd; ++j) {
                    double v = x[g * gd + j];
                    for (int s = 0, cc = combo; s < S; ++s, cc /= C)
                        v -= book[((static_cast<std::size_t>(s) * G + g) * C + cc % C) * gd + j];
                    e += v * v;
                }
                best = std::min(best, e);
            }
            best_err += best;
        }
    }
    EXPECT_GE(codec_err, best_err * (1 - 1e-6));
    EXPECT_LT(codec_err, greedy_err);  // the ICM sweep helps on average
    std::printf("[commvq] tiny search: greedy %.4f, greedy+ICM %.4f, exhaustive %.4f\n",
                greedy_err / n, codec_err / n, best_err / n);
}

TEST(CommVQCodec, RopeCommutesWithEncoding) {
    const int d = 64, S = 3, G = 8, C = 256, gd = 8;
    const auto book = random_codebook(S, G, C, gd, 31, 1.0);
    const auto freq = inv_freq_for(d, 100000.0);
    CommVQCodec codec(d, book.data(), S, G, C, gd, freq);
    const auto z = structured_keys(40, d, 32);
    const std::size_t cb = codec.code_bytes();
    int same_codes = 0, total = 0;
    double worst = 0.0;
    for (int t = 0; t < 40; ++t) {
        const float* zt = &z[static_cast<std::size_t>(t) * d];
        std::vector<uint8_t> c0(cb), cp(cb);
        std::vector<float> z_hat(d), k_hat(d);
        codec.encode(zt, 1, c0.data(), nullptr, 1);  // position-free: position 0
        codec.decode(c0.data(), nullptr, 1, 1, z_hat.data());
        for (const int p : {1, 63, 64, 1000, 8191, 100000}) {
            // Rotate-then-encode: the cache receives RoPE_p(z) at position p.
            const auto k = to_float(rope_ref(to_double(zt, d).data(), d, freq, p));
            codec.encode_at(k.data(), 1, p, cp.data(), nullptr, 1);
            codec.decode_at(cp.data(), nullptr, 1, 1, p, k_hat.data());
            // Encode-then-rotate: RoPE_p of the position-free decode.
            const auto expect = rope_ref(to_double(z_hat.data(), d).data(), d, freq, p);
            same_codes += cp == c0;
            ++total;
            const double scale = vqtest::norm(z_hat.data(), d);
            if (cp == c0) {
                const double rel = std::sqrt(sq_dist(expect, k_hat.data())) / scale;
                EXPECT_LT(rel, 1e-5) << t << " " << p;
                worst = std::max(worst, rel);
            }
        }
    }
    // Un-rotating in float can only flip exact near-ties of two codewords.
    EXPECT_GE(same_codes, total - 2) << same_codes << " of " << total;
    std::printf(
        "[commvq] rotate-then-encode vs encode-then-rotate: %d of %d codes equal, max relative "
        "difference of the reconstructions %.2e\n",
        same_codes, total, worst);
}

TEST(CommVQCache, DequantizeAppliesRopeAtEachPosition) {
    const int d = 64, S = 2, G = 8, C = 256, gd = 8, H = 2, n = 200;
    const auto book = random_codebook(S, G, C, gd, 41, 1.0);
    std::vector<float> both(book);
    both.insert(both.end(), book.begin(), book.end());  // two heads, same codebook
    const auto freq = inv_freq_for(d, 100000.0);
    const auto cfg = commvq_config(both, 1, H, S, G, C, gd, 2, freq);
    CommVQKVCache cache(cfg, H, d, 512);
    EXPECT_EQ(cache.class_name(), "CommVQKVCache");
    EXPECT_DOUBLE_EQ(cache.key_bits_per_coordinate(), 2.0);
    CommVQCodec codec(d, book.data(), S, G, C, gd, freq);
    const auto z = structured_keys(H * n, d, 42);  // pre-RoPE, [H][n][d]
    std::vector<float> keys(z.size());
    for (int h = 0; h < H; ++h)
        for (int t = 0; t < n; ++t) {
            const std::size_t o = (static_cast<std::size_t>(h) * n + t) * d;
            const auto k = rope_ref(to_double(&z[o], d).data(), d, freq, t);
            std::copy(k.begin(), k.end(), keys.begin() + o);
        }
    const auto values = vqtest::randn(keys.size(), 43);
    // Runs of 70, 1 and 129 tokens: not page-aligned.
    std::vector<float> kc, vc;
    int at = 0;
    for (const int len : {70, 1, 129}) {
        kc.clear(), vc.clear();
        for (int h = 0; h < H; ++h) {
            const std::size_t o = (static_cast<std::size_t>(h) * n + at) * d;
            kc.insert(kc.end(), keys.begin() + o,
                      keys.begin() + o + static_cast<std::size_t>(len) * d);
            vc.insert(vc.end(), values.begin() + o,
                      values.begin() + o + static_cast<std::size_t>(len) * d);
        }
        cache.append(kc.data(), vc.data(), len);
        at += len;
    }
    std::vector<float> kd(keys.size()), vd(keys.size());
    cache.dequantize(0, n, kd.data(), vd.data());
    int checked = 0;
    for (int h = 0; h < H; ++h)
        for (int t = 0; t < n; ++t) {
            const std::size_t o = (static_cast<std::size_t>(h) * n + t) * d;
            std::vector<uint8_t> c(codec.code_bytes());
            std::vector<float> zh(d);
            codec.encode(&z[o], 1, c.data(), nullptr, 1);
            codec.decode(c.data(), nullptr, 1, 1, zh.data());
            const auto expect = rope_ref(to_double(zh.data(), d).data(), d, freq, t);
            checked += std::sqrt(sq_dist(expect, &kd[o])) < 1e-5 * vqtest::norm(zh.data(), d);
        }
    EXPECT_GE(checked, H * n - 2);
}

// Two caches over the same tokens, fused and unfused, checked at several positions as a
// generation proceeds; the unfused one against exact attention over its dequantized keys.
TEST(CommVQCache, FusedMatchesUnfusedAtSeveralPositions) {
    const int d = 64, S = 2, G = 8, C = 256, gd = 8, H = 3, QH = 9, prompt = 150, steps = 40;
    std::vector<float> books;
    for (int h = 0; h < H; ++h) {
        const auto b = random_codebook(S, G, C, gd, 50 + h, 1.0);
        books.insert(books.end(), b.begin(), b.end());
    }
    auto cfg = commvq_config(books, 1, H, S, G, C, gd, 2, inv_freq_for(d, 100000.0));
    cfg.value_bits = 4;
    CommVQKVCache fused(cfg, H, d, 512);
    cfg.use_fused_sdpa = false;
    CommVQKVCache unfused(cfg, H, d, 512);
    const int total = prompt + steps;
    const auto z = structured_keys(H * total, d, 51);
    const auto v = vqtest::randn(z.size(), 52);
    auto slice = [&](const std::vector<float>& src, int t0, int len) {
        std::vector<float> out;
        for (int h = 0; h < H; ++h) {
            const std::size_t o = (static_cast<std::size_t>(h) * total + t0) * d;
            out.insert(out.end(), src.begin() + o,
                       src.begin() + o + static_cast<std::size_t>(len) * d);
        }
        return out;
    };
    auto check = [&](int nq, uint64_t seed) {
        const auto q = vqtest::randn(static_cast<std::size_t>(QH) * nq * d, seed);
        std::vector<float> of(q.size()), ou(q.size());
        const float scale = 1.0f / 8.0f;
        fused.attend(q.data(), QH, nq, of.data(), scale, true);
        unfused.attend(q.data(), QH, nq, ou.data(), scale, true);
        const int n = fused.size();
        std::vector<float> kd(static_cast<std::size_t>(H) * n * d), vd(kd.size());
        unfused.dequantize(0, n, kd.data(), vd.data());
        const auto ref = vqtest::reference_attention(q, QH, nq, kd, vd, H, n, d, scale, true);
        double max_fu = 0.0, max_ur = 0.0;
        for (std::size_t i = 0; i < q.size(); ++i) {
            max_fu = std::max(max_fu, std::fabs(static_cast<double>(of[i]) - ou[i]));
            max_ur = std::max(max_ur, std::fabs(static_cast<double>(ou[i]) - ref[i]));
        }
        EXPECT_LT(max_fu, 2e-4) << "size " << n;
        EXPECT_LT(max_ur, 2e-4) << "size " << n;
    };
    const auto kp = slice(z, 0, prompt), vp = slice(v, 0, prompt);
    fused.append(kp.data(), vp.data(), prompt);
    unfused.append(kp.data(), vp.data(), prompt);
    check(prompt, 60);  // causal prefill
    for (int t = prompt; t < total; ++t) {
        const auto kt = slice(z, t, 1), vt = slice(v, t, 1);
        fused.append(kt.data(), vt.data(), 1);
        unfused.append(kt.data(), vt.data(), 1);
        if (t % 13 == 0 || t == total - 1) check(1, 61 + t);
    }
}

TEST(CommVQCache, SaveLoadRoundTrip) {
    const int d = 64, S = 1, G = 8, C = 256, gd = 8, H = 2, n = 90;
    std::vector<float> books;
    for (int h = 0; h < H; ++h) {
        const auto b = random_codebook(S, G, C, gd, 70 + h, 1.0);
        books.insert(books.end(), b.begin(), b.end());
    }
    auto cfg = commvq_config(books, 1, H, S, G, C, gd, 1, inv_freq_for(d, 10000.0));
    cfg.num_subspaces = 1;
    CommVQKVCache cache(cfg, H, d, 256);
    const auto k = structured_keys(H * n, d, 71);
    const auto v = vqtest::randn(k.size(), 72);
    cache.append(k.data(), v.data(), n);
    const std::string path = vqtest::unique_temp_path("commvq_cache.vqc");
    cache.save(path);
    const auto loaded = KVCache::load(path);
    std::remove(path.c_str());
    EXPECT_EQ(loaded->class_name(), "CommVQKVCache");
    EXPECT_EQ(loaded->config().rope_inv_freq, cfg.rope_inv_freq);
    EXPECT_EQ(loaded->config().codebook.data, cfg.codebook.data);
    EXPECT_EQ(loaded->config().codebook.shape, cfg.codebook.shape);
    std::vector<float> k1(k.size()), v1(k.size()), k2(k.size()), v2(k.size());
    cache.dequantize(0, n, k1.data(), v1.data());
    loaded->dequantize(0, n, k2.data(), v2.data());
    EXPECT_EQ(k1, k2);
    EXPECT_EQ(v1, v2);
    const auto q = vqtest::randn(static_cast<std::size_t>(H) * d, 73);
    std::vector<float> o1(q.size()), o2(q.size());
    cache.attend(q.data(), H, 1, o1.data(), 0.125f, false);
    loaded->attend(q.data(), H, 1, o2.data(), 0.125f, false);
    EXPECT_EQ(o1, o2);
}

void expect_invalid(const KVCacheConfig& c, int heads, int d, int layer,
                    const std::string& needle) {
    try {
        KVCacheFactory::create(c, heads, d, 64, layer);
        ADD_FAILURE() << "no exception; expected one naming " << needle;
    } catch (const std::invalid_argument& e) {
        EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
}

TEST(CommVQCache, ConfigErrorsNameTheProblem) {
    const int d = 64, S = 2, G = 8, C = 256, gd = 8;
    const auto book = random_codebook(S, G, C, gd, 80, 1.0);
    const auto good = commvq_config(book, 1, 1, S, G, C, gd, 2, inv_freq_for(d, 10000.0));
    EXPECT_NO_THROW(KVCacheFactory::create(good, 1, d, 64, 0));
    auto c = good;
    c.codebook = FloatArray{};
    expect_invalid(c, 1, d, 0, "method 'commvq' needs calibration");
    expect_invalid(c, 1, d, 0, "calibrate_commvq");
    expect_invalid(c, 1, d, 0, "veloxquant calibrate --method commvq");
    c = good, c.codebook.shape = {1, 1, S * G, C, gd};
    expect_invalid(c, 1, d, 0, "rank 5");
    c = good, c.codebook.data.pop_back();
    expect_invalid(c, 1, d, 0, "shape needs");
    // Extents whose product overflows 64 bits (a forged cache file's, found by the fuzzer).
    c = good, c.codebook.shape = {1, 1, int64_t{1} << 40, int64_t{1} << 40, C, gd};
    expect_invalid(c, 1, d, 0, "too large");
    expect_invalid(good, 1, d, 1, "layer 1 has no codebook");
    expect_invalid(good, 2, d, 0, "head 1 has no codebook");
    c = good, c.bits = 3;
    expect_invalid(c, 1, d, 0, "KVCacheConfig.bits = 3");
    expect_invalid(good, 1, 32, 0, "head_dim 32");
    c = good, c.codebook.shape = {1, 1, S, G, C / 2, 2 * gd};  // 128 codewords of 16 floats
    expect_invalid(c, 1, d, 0, "groups (8) x group_dim (16)");
    c = good, c.codebook.shape = {1, 1, S, 2 * G, C, gd / 2};  // 2 x 8 bits over 4 coordinates
    expect_invalid(c, 1, d, 0, "KVCacheConfig.bits = 2 does not match");
    c = good, c.codebook.shape = {1, 1, S, G, 120, gd};
    c.codebook.data.resize(static_cast<std::size_t>(S) * G * 120 * gd);
    expect_invalid(c, 1, d, 0, "power of two");
    c = good, c.num_subspaces = 3;
    expect_invalid(c, 1, d, 0, "num_subspaces");
    c = good, c.rope_inv_freq.assign(d / 2 + 1, 0.1);
    expect_invalid(c, 1, d, 0, "rope_inv_freq has 33");
    c = good, c.rope_inv_freq[0] = -1.0;
    expect_invalid(c, 1, d, 0, "rope_inv_freq[0]");
    c = good, c.codebook.data[5] = NAN;
    expect_invalid(c, 1, d, 0, "NaN");
}

// Post-RoPE samples of L layers x H heads from pre-RoPE keys z, at positions pos0 + i.
Activations make_acts(int L, int H, int n, int d, int pos0, const std::vector<double>& freq,
                      uint64_t seed) {
    Activations a;
    a.rope.inv_freq = freq;
    a.layers.resize(L);
    for (int l = 0; l < L; ++l)
        for (int h = 0; h < H; ++h) {
            HeadSamples hs;
            hs.dim = d;
            hs.data = structured_keys(n, d, seed + 100 * l + h);
            for (int i = 0; i < n; ++i) {
                hs.positions.push_back(pos0 + i);
                commvq_rope(&hs.data[static_cast<std::size_t>(i) * d], d, freq, pos0 + i);
            }
            a.layers[l].keys.push_back(std::move(hs));
        }
    return a;
}

TEST(CommVQCalibration, ErrorsNameTheProblem) {
    const auto freq = inv_freq_for(64, 10000.0);
    auto acts = make_acts(1, 1, 300, 64, 0, freq, 1);
    EXPECT_THROW(calibrate_commvq(acts, 0, 1), std::invalid_argument);
    EXPECT_THROW(calibrate_commvq(acts, 5, 1), std::invalid_argument);
    auto few = make_acts(1, 1, 100, 64, 0, freq, 1);
    try {
        calibrate_commvq(few, 1, 1);
        ADD_FAILURE();
    } catch (const std::invalid_argument& e) {
        EXPECT_NE(std::string(e.what()).find("need at least 256"), std::string::npos) << e.what();
    }
    auto nopos = acts;
    nopos.layers[0].keys[0].positions[3] = -1;
    EXPECT_THROW(calibrate_commvq(nopos, 1, 1), std::invalid_argument);
    auto odd = make_acts(1, 1, 300, 36, 0, inv_freq_for(36, 10000.0), 1);
    EXPECT_THROW(calibrate_commvq(odd, 1, 1), std::invalid_argument);
    auto ragged = make_acts(2, 1, 300, 64, 0, freq, 1);
    ragged.layers[1].keys.push_back(ragged.layers[1].keys[0]);
    EXPECT_THROW(calibrate_commvq(ragged, 1, 1), std::invalid_argument);
}

TEST(CommVQCalibration, EmObjectiveNeverIncreases) {
    const int d = 32, n = 2000;
    const auto x = structured_keys(n, d, 90);
    CommVQFitOptions o;
    o.codewords = 16;  // 4-bit indices: 2 bits/coordinate over groups of 8 = 4 stages
    o.init_iterations = 2;
    o.em_sweeps = 6;
    const CommVQHeadFit fit = fit_commvq_head(x.data(), n, d, 2, 5, o);
    EXPECT_EQ(fit.stages, 4);
    ASSERT_EQ(fit.objective_history.size(), 7u);
    for (std::size_t i = 1; i < fit.objective_history.size(); ++i)
        EXPECT_LE(fit.objective_history[i], fit.objective_history[i - 1] * (1 + 1e-6)) << i;
    EXPECT_LT(fit.objective_history.back(), 0.98 * fit.objective_history.front());
    std::printf("[commvq] EM objective: init %.2f -> after %d sweeps %.2f\n",
                fit.objective_history.front(), o.em_sweeps, fit.objective_history.back());
    // Same seed, same codebook.
    const CommVQHeadFit again = fit_commvq_head(x.data(), n, d, 2, 5, o);
    EXPECT_EQ(again.codebook, fit.codebook);
}

// Relative squared error of keys coded by `codec` at their positions.
double held_out_error(const CommVQCodec& codec, const HeadSamples& hs) {
    const int n = static_cast<int>(hs.count()), d = hs.dim;
    std::vector<uint8_t> codes(codec.code_bytes() * n);
    std::vector<float> dec(hs.data.size());
    for (int i = 0; i < n; ++i) {  // one run per key: positions need not be consecutive
        codec.encode_at(hs.row(i), 1, hs.positions[i], &codes[i * codec.code_bytes()], nullptr, 1);
        codec.decode_at(&codes[i * codec.code_bytes()], nullptr, 1, 1, hs.positions[i],
                        &dec[static_cast<std::size_t>(i) * d]);
    }
    double num = 0.0, den = 0.0;
    for (std::size_t i = 0; i < dec.size(); ++i) {
        num += (static_cast<double>(dec[i]) - hs.data[i]) * (dec[i] - hs.data[i]);
        den += static_cast<double>(hs.data[i]) * hs.data[i];
    }
    return num / den;
}

// A random codebook of the calibrated shape: Gaussian codewords at the per-coordinate spread
// of the (pre-RoPE) training keys, halving per stage.
std::vector<float> random_like(const CommVQCalibration& cal, const std::vector<float>& pre_rope,
                               int d, uint64_t seed) {
    const auto& sh = cal.codebook.shape;
    const int S = static_cast<int>(sh[2]), G = static_cast<int>(sh[3]), C = static_cast<int>(sh[4]),
              gd = static_cast<int>(sh[5]);
    const int n = static_cast<int>(pre_rope.size() / d);
    std::vector<double> mean(d, 0.0), var(d, 0.0);
    for (int i = 0; i < n; ++i)
        for (int j = 0; j < d; ++j) mean[j] += pre_rope[static_cast<std::size_t>(i) * d + j] / n;
    for (int i = 0; i < n; ++i)
        for (int j = 0; j < d; ++j)
            var[j] += std::pow(pre_rope[static_cast<std::size_t>(i) * d + j] - mean[j], 2) / n;
    std::mt19937_64 gen(seed);
    std::normal_distribution<double> N(0.0, 1.0);
    std::vector<float> w(static_cast<std::size_t>(S) * G * C * gd);
    for (int s = 0; s < S; ++s)
        for (int g = 0; g < G; ++g)
            for (int c = 0; c < C; ++c)
                for (int j = 0; j < gd; ++j)
                    w[((static_cast<std::size_t>(s) * G + g) * C + c) * gd + j] =
                        static_cast<float>((s == 0 ? mean[g * gd + j] : 0.0) +
                                           std::sqrt(var[g * gd + j]) * std::pow(0.5, s) * N(gen));
    return w;
}

const float* head_book(const CommVQCalibration& cal, int l, int h) {
    const auto& sh = cal.codebook.shape;
    const std::size_t per = static_cast<std::size_t>(sh[2]) * sh[3] * sh[4] * sh[5];
    return cal.codebook.data.data() + (static_cast<std::size_t>(l) * sh[1] + h) * per;
}

// Calibrated vs random codebooks at equal bits on held-out keys of every head in `test`.
void compare_calibrated_random(const Activations& train, const Activations& test, int bits,
                               const char* label) {
    const CommVQCalibration cal = calibrate_commvq(train, bits, 3);
    ASSERT_EQ(cal.num_codebooks, bits);
    const auto& sh = cal.codebook.shape;
    const int L = static_cast<int>(sh[0]), H = static_cast<int>(sh[1]),
              d = train.layers[0].keys[0].dim;
    double e_cal = 0.0, e_rand = 0.0;
    for (int l = 0; l < L; ++l)
        for (int h = 0; h < H; ++h) {
            KVCacheConfig cfg;
            cfg.method = "commvq";
            cfg.bits = bits;
            cfg.codebook = cal.codebook;
            cfg.num_subspaces = cal.num_codebooks;
            cfg.rope_inv_freq = train.rope.inv_freq;
            const auto codec = make_commvq_codec(cfg, d, l, h);
            EXPECT_DOUBLE_EQ(codec->bits_per_coordinate(), bits);
            const HeadSamples& tr = train.layers[l].keys[h];
            std::vector<float> pre(tr.data);
            for (int64_t i = 0; i < tr.count(); ++i)
                commvq_rope(&pre[static_cast<std::size_t>(i) * d], d, train.rope.inv_freq,
                            -tr.positions[i]);
            const auto rb = random_like(cal, pre, d, 17 + l * H + h);
            const CommVQCodec rnd(d, rb.data(), static_cast<int>(sh[2]), static_cast<int>(sh[3]),
                                  static_cast<int>(sh[4]), static_cast<int>(sh[5]),
                                  train.rope.inv_freq);
            const double ec = held_out_error(*codec, test.layers[l].keys[h]);
            const double er = held_out_error(rnd, test.layers[l].keys[h]);
            EXPECT_LT(ec, er) << label << " layer " << l << " head " << h;
            e_cal += ec / (L * H), e_rand += er / (L * H);
        }
    std::printf("[commvq] %s, %d bit(s): held-out relative key MSE calibrated %.4f, random %.4f\n",
                label, bits, e_cal, e_rand);
}

TEST(CommVQCalibration, BeatsRandomCodebooksOnHeldOutSyntheticKeys) {
    const auto freq = inv_freq_for(64, 100000.0);
    const Activations train = make_acts(2, 2, 1200, 64, 0, freq, 300);
    const Activations test = make_acts(2, 2, 300, 64, 1200, freq, 900);
    for (int b : {1, 2}) compare_calibrated_random(train, test, b, "synthetic");
}

std::string model_path() {
    if (const char* env = std::getenv("VQ_GGUF_MODEL")) return env;
    const std::string here = __FILE__;
    return here.substr(0, here.size() - std::string("tests/test_commvq.cpp").size()) +
           "models/SmolLM2-135M-Instruct.Q4_1.gguf";
}

std::string wikitext_path() {
    if (const char* env = std::getenv("VQ_WIKITEXT_VALID")) return env;
    return "/work/shared/data/wikitext-2/valid.txt";
}

// Post-RoPE keys of `layers` of the real model over `tokens`, read back from fp16 caches, split
// at token `split` into (train, test); positions are the token indices.
std::pair<Activations, Activations> real_keys(const LlamaModel& model,
                                              const std::vector<int32_t>& tokens,
                                              const std::vector<int>& layers, int split) {
    KVCacheConfig fp16;
    fp16.method = "fp16";
    auto caches = model.make_caches(fp16, static_cast<int>(tokens.size()));
    std::vector<float> logits(model.hparams().n_vocab);
    model.forward(tokens.data(), static_cast<int>(tokens.size()), caches, logits.data(), false);
    const LlamaHParams& hp = model.hparams();
    Activations parts[2];
    for (int i = 0; i < hp.rope_dim / 2; ++i)
        parts[0].rope.inv_freq.push_back(
            hp.rope_freq_scale *
            std::pow(static_cast<double>(hp.rope_freq_base), -2.0 * i / hp.rope_dim));
    parts[1].rope = parts[0].rope;
    const int n = static_cast<int>(tokens.size()), d = hp.head_dim, H = hp.n_head_kv;
    for (int l : layers) {
        std::vector<float> k(static_cast<std::size_t>(H) * n * d), v(k.size());
        caches[l]->dequantize(0, n, k.data(), v.data());
        for (int part = 0; part < 2; ++part) {
            LayerActivations la;
            for (int h = 0; h < H; ++h) {
                HeadSamples hs;
                hs.dim = d;
                for (int t = part == 0 ? 0 : split; t < (part == 0 ? split : n); ++t) {
                    const std::size_t o = (static_cast<std::size_t>(h) * n + t) * d;
                    hs.data.insert(hs.data.end(), k.begin() + o, k.begin() + o + d);
                    hs.positions.push_back(t);
                }
                la.keys.push_back(std::move(hs));
            }
            parts[part].layers.push_back(std::move(la));
        }
    }
    return {parts[0], parts[1]};
}

TEST(CommVQCalibration, BeatsRandomCodebooksOnHeldOutModelKeys) {
    const std::string path = model_path();
    if (!std::ifstream(path).good()) GTEST_SKIP() << path << " not present";
    std::ifstream text_file(wikitext_path());
    if (!text_file.good()) GTEST_SKIP() << wikitext_path() << " not present";
    std::stringstream ss;
    ss << text_file.rdbuf();
    const auto model = LlamaModel::load(path);
    const BPETokenizer tok(vocab_from_gguf(model->gguf()));
    std::vector<int32_t> tokens = tok.encode(ss.str().substr(0, 20000), false);
    ASSERT_GE(tokens.size(), 640u);
    tokens.resize(640);
    const std::vector<int> layers = {0, 14, 29};
    const auto [train, test] = real_keys(*model, tokens, layers, 512);
    for (int b : {1, 2}) compare_calibrated_random(train, test, b, "SmolLM2-135M layers 0/14/29");
}

}  // namespace
}  // namespace veloxquant
