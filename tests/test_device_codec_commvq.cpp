// The commvq device codec on the host against CommVQCodec: identical codes, decode and scores,
// with and without a known RoPE, at the start of the sequence and thousands of positions in.
#include <gtest/gtest.h>

#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "calibration/commvq_calibration.h"
#include "core/cpu_isa.h"
#include "device_codec_test_helpers.h"
#include "device_codecs/commvq_device.h"
#include "methods/commvq.h"
#include "methods/turboquant_rvq.h"
#include "test_helpers.h"

namespace {

using namespace veloxquant;

struct CommVQShape {
    int d, bits, codewords, group_pairs;
    int rope_pairs;  ///< RoPE frequencies known for this many pairs (0: keys coded as given)
};

std::vector<double> inv_freq(int d, int pairs) {
    std::vector<double> f(pairs);
    for (int i = 0; i < pairs; ++i) f[i] = std::pow(10000.0, -2.0 * i / d);
    return f;
}

// A codec calibrated (briefly) on offset Gaussian keys, as calibrate_commvq fits each head.
CommVQCodec calibrated_codec(const CommVQShape& s) {
    const int n = 2 * s.codewords + 64;
    auto train = vqtest::randn(static_cast<std::size_t>(n) * s.d, 31 + s.d + s.bits);
    for (float& x : train) x += 0.3f;
    CommVQFitOptions options;
    options.codewords = s.codewords;
    options.group_pairs = s.group_pairs;
    options.init_iterations = 2;
    options.em_sweeps = 1;
    const CommVQHeadFit fit = fit_commvq_head(train.data(), n, s.d, s.bits, 5, options);
    return CommVQCodec(s.d, fit.codebook.data(), fit.stages, fit.groups, fit.codewords,
                       fit.group_dim, inv_freq(s.d, s.rope_pairs));
}

// A page of keys at positions pos0..: a zero key, two of large norm, offset Gaussian keys, and
// in the second half near-ties: each group halfway between two codewords of the first stage
// (then RoPE-rotated to pos), so that the search's decisions hang on float rounding and any
// change of operation order shows in the codes.
std::vector<float> page_of_keys(const CommVQCodec& cpu, int pos0, uint64_t seed) {
    const int d = cpu.dim(), gd = cpu.group_dim(), C = cpu.codewords();
    auto keys = vqtest::randn(static_cast<std::size_t>(kTokensPerPage) * d, seed);
    for (float& x : keys) x += 0.3f;
    for (int j = 0; j < d; ++j) {
        keys[j] = 0.0f;
        keys[d + j] *= 1000.0f;
        keys[5 * d + j] = 3e4f * (j % 3 == 0 ? 1.0f : -0.5f);
    }
    for (int t = kTokensPerPage / 2; t < kTokensPerPage; ++t) {
        float* k = &keys[static_cast<std::size_t>(t) * d];
        for (int g = 0; g < cpu.groups(); ++g) {
            const float* a = cpu.word(0, g, (t * 7 + g) % C);
            const float* b = cpu.word(0, g, (t * 13 + 5 * g + 1) % C);
            for (int j = 0; j < gd; ++j) k[g * gd + j] = 0.5f * (a[j] + b[j]);
        }
        commvq_rope(k, d, cpu.rope_inv_freq(), pos0 + t);
    }
    return keys;
}

// From a page boundary the device decodes with the CPU's phases and sums the codewords in the
// CPU's order, so the keys are equal to the bit (expect_device_codec_matches allows 1e-5, which
// would hide a phase off by an ulp).
void expect_bit_identical_decode(const CommVQCodec& cpu, const std::vector<float>& keys, int pos0) {
    dev::ParamArena arena;
    dev::CommVQDevice::Params p = dev::CommVQDevice::build(cpu, arena);
    std::vector<uint8_t> blob = arena.bytes();
    p.rebase(blob.data());
    const int n = kTokensPerPage, d = cpu.dim();
    const std::size_t cb = cpu.code_bytes();
    std::vector<uint8_t> codes(n * cb);
    cpu.encode_at(keys.data(), n, pos0, codes.data(), nullptr, n);
    std::vector<float> cpu_keys(keys.size()), dev_keys(keys.size());
    cpu.decode_at(codes.data(), nullptr, n, n, pos0, cpu_keys.data());
    for (int t = 0; t < n; ++t)
        dev::CommVQDevice::decode(p, codes.data() + t * cb, nullptr, n, pos0 + t,
                                  dev_keys.data() + t * d);
    EXPECT_EQ(cpu_keys, dev_keys) << "decode is not bit-identical";
}

class CommVQDeviceCodec : public testing::TestWithParam<CommVQShape> {};

TEST_P(CommVQDeviceCodec, MatchesCpuCodecOnPages) {
    const CommVQShape s = GetParam();
    const CommVQCodec cpu = calibrated_codec(s);
    const auto queries = vqtest::randn(static_cast<std::size_t>(3) * s.d, 99);
    // Runs from page boundaries (prefill, decode and score calls) and from mid-page (an append
    // to a partly filled page): phases depend only on the position, so codes are identical. On
    // every CPU kernel set: the encoder's codeword distances have an AVX2 build. The keys lie
    // midway between two codewords, so a distance rounded differently would pick another.
    const std::string start = cpu_isa_name();
    for (const std::string& isa : cpu_isas()) {
        SCOPED_TRACE(isa);
        use_cpu_isa(isa);
        for (const int pos0 : {0, 78 * kTokensPerPage, 5000, 2048 * kTokensPerPage + 17}) {
            SCOPED_TRACE(pos0);
            const auto keys = page_of_keys(cpu, pos0, 7 + s.bits);
            vqtest::expect_device_codec_matches<dev::CommVQDevice>(cpu, keys, queries, pos0);
            expect_bit_identical_decode(cpu, keys, pos0);
        }
    }
    use_cpu_isa(start);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, CommVQDeviceCodec,
    testing::Values(CommVQShape{64, 1, 256, 4, 32}, CommVQShape{64, 2, 256, 4, 0},
                    CommVQShape{128, 3, 256, 4, 64}, CommVQShape{128, 4, 256, 4, 40},
                    CommVQShape{128, 2, 16, 2, 64}, CommVQShape{64, 3, 8, 1, 32},
                    CommVQShape{64, 2, 4, 2, 32}));

TEST(CommVQDeviceCodec, RejectsOtherCodecs) {
    TurboQuantRVQCodec tq(64, 2, 1, true, 1);
    dev::ParamArena arena;
    EXPECT_THROW(dev::CommVQDevice::build(tq, arena), std::invalid_argument);
    // head_dim 512: a valid CPU codec, wider than the device's per-thread scratch.
    const std::vector<float> book(static_cast<std::size_t>(64) * 2 * 8, 0.5f);
    const CommVQCodec wide(512, book.data(), 1, 64, 2, 8, {});
    EXPECT_THROW(dev::CommVQDevice::build(wide, arena), std::invalid_argument);
}

}  // namespace
