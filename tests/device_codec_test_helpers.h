// Checks a device codec (src/device_codecs/) on the host against its CPU codec: the same codes
// and scalars byte for byte, the same reconstruction, scores from prepare + score equal to the
// CPU scorer's, and the feature form of the score where the codec names one. The device kernels run
// these very functions, one thread per token.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "core/half.h"
#include "device_codecs/device_common.h"
#include "methods/key_codec.h"
#include "veloxquant/caches.h"

namespace vqtest {

/// Largest |a - b| over max(1e-6, max |b|).
inline double max_rel_error(const std::vector<float>& a, const std::vector<float>& b) {
    double err = 0.0, ref = 1e-6;
    for (std::size_t i = 0; i < a.size(); ++i) {
        err = std::max(err, std::fabs(static_cast<double>(a[i]) - b[i]));
        ref = std::max(ref, std::fabs(static_cast<double>(b[i])));
    }
    return err / ref;
}

/// score<R> on R interleaved states (queries cycled) gives each row's score_one exactly.
template <class Dev, int R>
void expect_rows_match_single(const typename Dev::Params& p, const std::vector<float>& queries,
                              const uint8_t* codes, std::size_t code_bytes, const float* scalars,
                              int n, int pos0) {
    const int d = p.d, S = Dev::state_floats(p);
    const int nq = static_cast<int>(queries.size() / d);
    std::vector<float> single(static_cast<std::size_t>(R) * S), rows(single.size());
    for (int r = 0; r < R; ++r) {
        Dev::prepare(p, queries.data() + (r % nq) * d, single.data() + r * S);
        for (int i = 0; i < S; ++i) rows[static_cast<std::size_t>(i) * R + r] = single[r * S + i];
    }
    for (int t = 0; t < n; ++t) {
        float out[R];
        Dev::template score<R>(p, rows.data(), codes + t * code_bytes, scalars + t,
                               veloxquant::kTokensPerPage, pos0 + t, out);
        for (int r = 0; r < R; ++r)
            ASSERT_EQ(out[r], veloxquant::dev::score_one<Dev>(p, single.data() + r * S,
                                                              codes + t * code_bytes, scalars + t,
                                                              veloxquant::kTokensPerPage, pos0 + t))
                << "token " << t << " row " << r;
    }
}

/// The feature form of the score (device_common.h), where the codec names it and its Params
/// allow it, token by token against score_one: state[extra] + factor * sum_i f_i state[offset + i]
/// within 1e-5 of the terms' magnitude (|extra| + |factor| sum_i |f_i state_i|), within 2e-3
/// with the features rounded to fp16 as the decode kernels' tile holds them, and within 1e-5 with
/// them as the wide prefill kernel's high and low halves (the device keeps ~22 bits of the
/// states: their rounding is left out). A codec that declares kExactHalfFeatures (the wide
/// kernel then takes the high halves only) has every feature exact in fp16.
template <class Dev>
void expect_feature_form(const typename Dev::Params& p, const std::vector<float>& state,
                         const uint8_t* codes, std::size_t code_bytes, const float* scalars, int n,
                         int pos0) {
    using namespace veloxquant;
    if constexpr (dev::HasFeatures<Dev>::value) {
        if (!Dev::features_usable(p)) return;
        const int F = Dev::feature_count(p), G = Dev::kFeatureGroup, off = Dev::feature_offset(p);
        ASSERT_LE(off + F, Dev::state_floats(p));
        std::vector<float> f((F + G - 1) / G * G);
        for (int t = 0; t < n; ++t) {
            const uint8_t* code = codes + t * code_bytes;
            for (int g = 0; g * G < F; ++g) Dev::features(p, code, pos0 + t, g, f.data() + g * G);
            double dot = 0.0, dot16 = 0.0, dot_split = 0.0, magnitude = 0.0;
            for (int i = 0; i < F; ++i) {
                ASSERT_LT(std::fabs(f[i]), dev::kFeatureHalfLimit) << "feature " << i;
                const double s = state[off + i];
                const float high = half_to_float(float_to_half(f[i]));
                const float low = half_to_float(float_to_half(f[i] - high));
                if constexpr (dev::ExactHalfFeatures<Dev>::value)
                    ASSERT_EQ(high, f[i]) << "feature " << i << " is not exact in fp16";
                dot += f[i] * s;
                dot16 += high * s;
                dot_split += (static_cast<double>(high) + low) * s;
                magnitude += std::fabs(f[i] * s);
            }
            const int extra = Dev::extra_entry(p, code);
            ASSERT_LT(extra, Dev::state_floats(p));
            const double base = extra >= 0 ? state[extra] : 0.0;
            const double factor = Dev::feature_factor(scalars + t);
            const double direct =
                dev::score_one<Dev>(p, state.data(), code, scalars + t, kTokensPerPage, pos0 + t);
            const double scale = std::fabs(base) + std::fabs(factor) * magnitude + 1e-30;
            EXPECT_LE(std::fabs(base + factor * dot - direct), 1e-5 * scale)
                << "feature form, token " << t;
            EXPECT_LE(std::fabs(base + factor * dot16 - direct), 2e-3 * scale)
                << "fp16 features, token " << t;
            EXPECT_LE(std::fabs(base + factor * dot_split - direct), 1e-5 * scale)
                << "fp16 high and low features, token " << t;
        }
    }
}

/// Encodes n keys (rows of `keys`, positions pos0 + t) with both codecs in the page layout
/// (scalars strided by the page size) and compares everything the cache would use.
/// `score_tolerance` bounds the scores' relative error (summation orders differ).
template <class Dev>
void expect_device_codec_matches(const veloxquant::KeyCodec& cpu, const std::vector<float>& keys,
                                 const std::vector<float>& queries, int pos0 = 0,
                                 double score_tolerance = 1e-4) {
    using namespace veloxquant;
    const int d = cpu.dim();
    const int n = static_cast<int>(keys.size() / d);
    const int nq = static_cast<int>(queries.size() / d);
    const int stride = kTokensPerPage;
    ASSERT_LE(n, stride);
    dev::ParamArena arena;
    typename Dev::Params p = Dev::build(cpu, arena);
    std::vector<uint8_t> blob = arena.bytes();
    p.rebase(blob.data());
    ASSERT_EQ(static_cast<std::size_t>(Dev::code_bytes(p)), cpu.code_bytes());
    ASSERT_EQ(Dev::num_scalars(p), cpu.num_scalars());
    ASSERT_LE(Dev::state_floats(p), dev::kMaxStateFloats);

    const std::size_t cb = cpu.code_bytes();
    const int ns = std::max(cpu.num_scalars(), 1);
    std::vector<uint8_t> cpu_codes(n * cb + 1, 0xAB), dev_codes(n * cb + 1, 0xCD);
    std::vector<float> cpu_scalars(ns * stride, 0.0f), dev_scalars(ns * stride, 0.0f);
    cpu.encode_at(keys.data(), n, pos0, cpu_codes.data(), cpu_scalars.data(), stride);
    for (int t = 0; t < n; ++t)
        Dev::encode(p, keys.data() + t * d, pos0 + t, dev_codes.data() + t * cb,
                    dev_scalars.data() + t, stride);
    int code_mismatch = 0;
    for (std::size_t i = 0; i < n * cb; ++i) code_mismatch += cpu_codes[i] != dev_codes[i];
    EXPECT_EQ(code_mismatch, 0) << "code bytes differ";
    EXPECT_EQ(
        0, std::memcmp(cpu_scalars.data(), dev_scalars.data(), sizeof(float) * cpu_scalars.size()))
        << "scalars differ";

    std::vector<float> cpu_keys(static_cast<std::size_t>(n) * d), dev_keys(cpu_keys.size());
    cpu.decode_at(cpu_codes.data(), cpu_scalars.data(), stride, n, pos0, cpu_keys.data());
    for (int t = 0; t < n; ++t)
        Dev::decode(p, cpu_codes.data() + t * cb, cpu_scalars.data() + t, stride, pos0 + t,
                    dev_keys.data() + t * d);
    EXPECT_LT(max_rel_error(dev_keys, cpu_keys), 1e-5) << "decode differs";

    std::vector<float> cpu_state(cpu.query_state_size()), dev_state(Dev::state_floats(p));
    std::vector<float> cpu_scores(n), dev_scores(n);
    for (int i = 0; i < nq; ++i) {
        cpu.prepare_query(queries.data() + i * d, cpu_state.data());
        cpu.score_at(cpu_state.data(), cpu_codes.data(), cpu_scalars.data(), stride, n, pos0,
                     cpu_scores.data());
        Dev::prepare(p, queries.data() + i * d, dev_state.data());
        for (int t = 0; t < n; ++t)
            dev_scores[t] = dev::score_one<Dev>(p, dev_state.data(), cpu_codes.data() + t * cb,
                                                cpu_scalars.data() + t, stride, pos0 + t);
        EXPECT_LT(max_rel_error(dev_scores, cpu_scores), score_tolerance) << "query " << i;
        expect_feature_form<Dev>(p, dev_state, cpu_codes.data(), cb, cpu_scalars.data(), n, pos0);
    }
    expect_rows_match_single<Dev, 4>(p, queries, cpu_codes.data(), cb, cpu_scalars.data(), n, pos0);
}

}  // namespace vqtest
