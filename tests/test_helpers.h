// Shared test utilities: seeded random tensors and an independent double-precision attention.
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

namespace vqtest {

/// A temp-file path unique to this process, test and call: ctest runs each test in its own
/// process, two at a time in CI, so a fixed name would let two tests write one file.
inline std::string unique_temp_path(const std::string& stem) {
    static int counter = 0;
    const auto* info = testing::UnitTest::GetInstance()->current_test_info();
    std::string name = info ? std::string(info->test_suite_name()) + "." + info->name() : "none";
    for (char& c : name)
        if (!std::isalnum(static_cast<unsigned char>(c)) && c != '.') c = '_';
    return testing::TempDir() + "vq_" + std::to_string(getpid()) + "_" + name + "_" +
           std::to_string(counter++) + "_" + stem;
}

/// The bytes of a file ("" when it cannot be read).
inline std::string file_bytes(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

/// Whether two caches (KVCache, or anything with save(path)) save byte-identical files.
template <class Cache>
::testing::AssertionResult save_the_same_file(const Cache& a, const Cache& b) {
    const std::string path_a = unique_temp_path("a.bin"), path_b = unique_temp_path("b.bin");
    a.save(path_a);
    b.save(path_b);
    const bool same = file_bytes(path_a) == file_bytes(path_b);
    std::remove(path_a.c_str());
    std::remove(path_b.c_str());
    if (same) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << "the saved files differ";
}

// Tokens [t0, t1) of x [heads][n][d], as [heads][t1 - t0][d].
inline std::vector<float> token_slice(const std::vector<float>& x, int heads, int n, int d, int t0,
                                      int t1) {
    std::vector<float> out;
    for (int h = 0; h < heads; ++h)
        out.insert(out.end(), x.begin() + (static_cast<std::size_t>(h) * n + t0) * d,
                   x.begin() + (static_cast<std::size_t>(h) * n + t1) * d);
    return out;
}

inline std::vector<float> randn(std::size_t n, uint64_t seed, float scale = 1.0f) {
    std::mt19937_64 gen(seed);
    std::normal_distribution<float> dist(0.0f, scale);
    std::vector<float> v(n);
    for (auto& x : v) x = dist(gen);
    return v;
}

/// Exact softmax attention in double precision; layouts as KVCache::attend.
inline std::vector<float> reference_attention(const std::vector<float>& q, int num_q_heads, int n_q,
                                              const std::vector<float>& k,
                                              const std::vector<float>& v, int num_kv_heads,
                                              int n_k, int d, float scale, bool causal,
                                              int sinks = 0, int window = 0) {
    std::vector<float> out(static_cast<std::size_t>(num_q_heads) * n_q * d, 0.0f);
    const int group = num_q_heads / num_kv_heads;
    for (int qh = 0; qh < num_q_heads; ++qh) {
        const int h = qh / group;
        for (int i = 0; i < n_q; ++i) {
            const int limit = causal ? n_k - n_q + i + 1 : n_k;
            const float* qq = &q[(static_cast<std::size_t>(qh) * n_q + i) * d];
            std::vector<double> s(n_k, -INFINITY);
            double m = -INFINITY;
            for (int t = 0; t < limit; ++t) {
                if (window > 0 && t >= sinks && t < limit - window) continue;
                const float* kk = &k[(static_cast<std::size_t>(h) * n_k + t) * d];
                double dot = 0.0;
                for (int j = 0; j < d; ++j) dot += static_cast<double>(qq[j]) * kk[j];
                s[t] = dot * scale;
                m = std::max(m, s[t]);
            }
            double l = 0.0;
            std::vector<double> acc(d, 0.0);
            for (int t = 0; t < limit; ++t) {
                if (s[t] == -INFINITY) continue;
                const double w = std::exp(s[t] - m);
                l += w;
                const float* vv = &v[(static_cast<std::size_t>(h) * n_k + t) * d];
                for (int j = 0; j < d; ++j) acc[j] += w * vv[j];
            }
            for (int j = 0; j < d; ++j)
                out[(static_cast<std::size_t>(qh) * n_q + i) * d + j] =
                    l > 0 ? static_cast<float>(acc[j] / l) : 0.0f;
        }
    }
    return out;
}

/// n draws of mean + sigma * N(0, 1) from a library Rng stream.
template <typename R>
std::vector<float> gaussian(R& rng, std::size_t n, double sigma = 1.0, double mean = 0.0) {
    std::vector<float> v(n);
    for (auto& x : v) x = static_cast<float>(mean + sigma * rng.normal());
    return v;
}

// Index i of `bits` bits from an LSB-first bit stream, read bit by bit (the codecs' packing,
// independently of their readers).
inline int read_index(const uint8_t* stream, std::size_t i, int bits) {
    int v = 0;
    for (int b = 0; b < bits; ++b) {
        const std::size_t bit = i * bits + b;
        v |= ((stream[bit / 8] >> (bit % 8)) & 1) << b;
    }
    return v;
}

inline double dot(const float* a, const float* b, int d) {
    double s = 0.0;
    for (int i = 0; i < d; ++i) s += static_cast<double>(a[i]) * b[i];
    return s;
}

inline double norm(const float* a, int d) {
    return std::sqrt(dot(a, a, d));
}

/// ||a - b|| / ||b||.
inline double rel_error(const std::vector<float>& a, const std::vector<float>& b) {
    double num = 0.0, den = 0.0;
    for (std::size_t i = 0; i < a.size(); ++i) {
        num += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
        den += static_cast<double>(b[i]) * b[i];
    }
    return std::sqrt(num / std::max(den, 1e-300));
}

}  // namespace vqtest
