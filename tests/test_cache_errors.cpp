// Bad input gets a specific error and leaves the cache exactly as it was.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <iterator>
#include <vector>

#include "cache/outlier_store.h"
#include "cache/token_check.h"
#include "calibration/calibrate.h"
#include "calibration_test_helpers.h"
#include "core/binary_io.h"
#include "methods/value_codec.h"
#include "test_helpers.h"
#include "veloxquant/veloxquant.h"

using namespace veloxquant;
using vqtest::randn;

namespace {

KVCacheConfig config_of(const std::string& method) {
    KVCacheConfig c;
    c.method = method;
    c.num_clusters = 4;
    return c;
}

// Attention output and dequantized contents: a fingerprint of everything the cache holds.
std::vector<float> fingerprint(const KVCache& c) {
    const int h = c.num_heads(), d = c.head_dim(), n = c.size();
    std::vector<float> k(static_cast<std::size_t>(h) * n * d), v(k.size()),
        q = randn(static_cast<std::size_t>(h) * d, 1);
    if (n > 0) c.dequantize(0, n, k.data(), v.data());
    std::vector<float> out(q.size());
    if (n > 0) c.attend(q.data(), h, 1, out.data(), 0.1f, false);
    k.insert(k.end(), v.begin(), v.end());
    k.insert(k.end(), out.begin(), out.end());
    k.push_back(static_cast<float>(c.nbytes()));
    k.push_back(static_cast<float>(n));
    return k;
}

template <typename E, typename F>
void expect_error_unchanged(KVCache& c, F f, const std::string& fragment) {
    const auto before = fingerprint(c);
    try {
        f();
        ADD_FAILURE() << "no exception, expected one mentioning '" << fragment << "'";
    } catch (const E& e) {
        EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
    }
    EXPECT_EQ(fingerprint(c), before);
}

}  // namespace

TEST(ConfigErrors, UnknownMethodAndImpossibleSettings) {
    auto throws = [](KVCacheConfig c, const std::string& fragment) {
        try {
            KVCacheFactory::create(c, 2, 64);
            ADD_FAILURE() << "expected an error mentioning " << fragment;
        } catch (const std::invalid_argument& e) {
            EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
        }
    };
    KVCacheConfig c = config_of("turboquant");
    throws(c, "unknown method 'turboquant'");
    c = config_of("turboquant_rvq");
    c.bits = 0;
    throws(c, "bits");
    c.bits = 9;
    throws(c, "bits");
    c = config_of("turboquant_rvq");
    c.value_bits = 12;
    throws(c, "value_bits");
    c = config_of("qjl");
    c.bits = 2;
    throws(c, "qjl");
    c = config_of("polarquant");
    c.bits = 7;
    throws(c, "bits");
    c = config_of("turboquant_rvq");
    c.outlier_bits = 4;
    throws(c, "outlier_bits");
    c = config_of("ratequant");
    c.bit_allocation["x"] = 2;
    throws(c, "bit_allocation");
    c = config_of("vecinfer");
    throws(c, "calibration");
    c = config_of("turboquant_rvq");
    c.num_residuals = 0;
    throws(c, "num_residuals");
    // Head dims a method cannot take.
    try {
        KVCacheFactory::create(config_of("polarquant"), 2, 72);
        ADD_FAILURE();
    } catch (const std::invalid_argument& e) {
        EXPECT_NE(std::string(e.what()).find("72"), std::string::npos) << e.what();
    }
    EXPECT_THROW(KVCacheFactory::create(config_of("turboquant_rvq"), 0, 64), std::invalid_argument);
    EXPECT_THROW(KVCacheFactory::create(config_of("turboquant_rvq"), 2, 64, 0),
                 std::invalid_argument);
}

// The input check finds the first coordinate that is NaN, infinite or not below the bound, at
// every position of runs shorter than, equal to and longer than its blocks of 64.
TEST(TokenCheck, FindsTheFirstBadCoordinateAnywhere) {
    const float bound = 100.0f;
    for (const std::size_t count : {1, 63, 64, 65, 130, 200}) {
        std::vector<float> x(count, 1.5f);
        EXPECT_EQ(first_bad_coordinate(x.data(), count, bound), count);
        for (std::size_t p = 0; p < count; ++p)
            for (const float bad : {NAN, INFINITY, -INFINITY, bound, -bound}) {
                std::vector<float> y = x;
                y[p] = bad;
                if (p + 3 < count) y[p + 3] = NAN;  // a later one does not hide it
                ASSERT_EQ(first_bad_coordinate(y.data(), count, bound), p)
                    << "count " << count << " at " << p << " value " << bad;
            }
    }
}

class ErrorTest : public ::testing::TestWithParam<std::string> {};

TEST_P(ErrorTest, BadAppendsAndAttendsLeaveCacheUnchanged) {
    const int h = 2, d = 64, n = 40;
    KVCacheConfig cfg = config_of(GetParam());
    cfg.outlier_observer = std::make_shared<KeyNormObserver>(2.0, 8);
    auto cache = KVCacheFactory::create(cfg, h, d, 100);
    auto k = randn(static_cast<std::size_t>(h) * n * d, 3), v = randn(k.size(), 4);
    cache->append(k.data(), v.data(), n);

    auto bad = k;
    bad[static_cast<std::size_t>(n) * d + 5] = NAN;  // head 1, token 0
    expect_error_unchanged<std::invalid_argument>(
        *cache, [&] { cache->append(bad.data(), v.data(), n); },
        "keys contain NaN or Inf (head 1, token 0)");
    bad = v;
    bad.back() = INFINITY;
    expect_error_unchanged<std::invalid_argument>(
        *cache, [&] { cache->append(k.data(), bad.data(), n); }, "values contain NaN or Inf");
    expect_error_unchanged<std::length_error>(
        *cache, [&] { cache->append(k.data(), v.data(), 61); }, "exceed max_seq_len 100");
    expect_error_unchanged<std::invalid_argument>(
        *cache, [&] { cache->append(k.data(), v.data(), -1); }, "n_tokens");
    expect_error_unchanged<std::invalid_argument>(
        *cache, [&] { cache->append(nullptr, v.data(), 1); }, "null");
    std::vector<float> q(static_cast<std::size_t>(3) * d), out(q.size());
    expect_error_unchanged<std::invalid_argument>(
        *cache, [&] { cache->attend(q.data(), 3, 1, out.data(), 0.1f, false); }, "num_q_heads");
    std::vector<float> big(static_cast<std::size_t>(h) * 41 * d);
    expect_error_unchanged<std::invalid_argument>(
        *cache, [&] { cache->attend(big.data(), h, 41, big.data(), 0.1f, true); }, "causal");
    std::vector<float> ko(k.size()), vo(v.size());
    expect_error_unchanged<std::out_of_range>(
        *cache, [&] { cache->dequantize(30, 11, ko.data(), vo.data()); }, "outside");
    expect_error_unchanged<std::invalid_argument>(
        *cache, [&] { cache->trim(41); }, "trim");
    // A valid append still works afterwards, up to capacity exactly.
    auto k60 = randn(static_cast<std::size_t>(h) * 60 * d, 5), v60 = randn(k60.size(), 6);
    cache->append(k60.data(), v60.data(), 60);
    EXPECT_EQ(cache->size(), 100);
}

// An empty cache attends to nothing: zeros, for every method. (rabitq, untrained until its first
// append, threw std::logic_error inside the OpenMP region, which ended the process; an operation
// fuzzer found it.)
TEST_P(ErrorTest, AttendOnAnEmptyCacheGivesZeros) {
    const int h = 2, d = 64;
    auto cache = KVCacheFactory::create(config_of(GetParam()), h, d, 100);
    const auto q = randn(static_cast<std::size_t>(2 * h) * 3 * d, 1);
    std::vector<float> out(q.size(), 7.0f);
    cache->attend(q.data(), 2 * h, 3, out.data(), 0.125f, false);
    for (float x : out) ASSERT_EQ(x, 0.0f);
}

// Finite but extreme tokens are not bad input: a zero token, one whose coordinates are all
// subnormal (its norm's float reciprocal overflows) and a large one (within fp16's range, which
// the fp16 storage has) encode to finite codes, so neither the dequantized tokens nor any later
// attention turns NaN or Inf.
namespace {
void expect_extreme_tokens_stay_finite(const KVCacheConfig& config) {
    const int h = 2, d = 64, n = 40;
    auto cache = KVCacheFactory::create(config, h, d, 100);
    auto k = randn(static_cast<std::size_t>(h) * n * d, 21), v = randn(k.size(), 22);
    for (int j = 0; j < d; ++j) {
        const float tiny = static_cast<float>(j % 3 - 1) * 3e-40f;
        k[3 * d + j] = v[3 * d + j] = 0.0f;              // head 0, token 3
        k[5 * d + j] = v[5 * d + j] = tiny;              // head 0, token 5
        k[(n + 7) * d + j] = v[(n + 7) * d + j] = tiny;  // head 1, token 7
        k[9 * d + j] *= 1e3f, v[9 * d + j] *= 1e3f;      // head 0, token 9
    }
    cache->append(k.data(), v.data(), n);
    std::vector<float> ko(k.size()), vo(v.size());
    cache->dequantize(0, n, ko.data(), vo.data());
    for (std::size_t i = 0; i < ko.size(); ++i)
        ASSERT_TRUE(std::isfinite(ko[i]) && std::isfinite(vo[i])) << "dequantized coordinate " << i;
    auto q = randn(static_cast<std::size_t>(h) * n * d, 23);
    std::vector<float> out(q.size());
    cache->attend(q.data(), h, n, out.data(), 0.125f, true);
    for (std::size_t i = 0; i < out.size(); ++i)
        ASSERT_TRUE(std::isfinite(out[i])) << "output " << i;
}
}  // namespace

TEST_P(ErrorTest, ZeroSubnormalAndLargeTokensStayFinite) {
    expect_extreme_tokens_stay_finite(config_of(GetParam()));
}

// The methods that need a calibration, calibrated on synthetic activations of one layer.
TEST(CalibratedMethods, ZeroSubnormalAndLargeTokensStayFinite) {
    const Activations acts = vqtest::synthetic_activations(1, 2, 64, 512, 41);
    for (const std::string method : {"vecinfer", "spectral", "commvq"}) {
        SCOPED_TRACE(method);
        KVCacheConfig c = config_of(method);
        c.bits = 2, c.value_bits = 4;
        Calibration cal;
        calibrate_method(acts, c, cal);
        apply_calibration(cal, c);
        expect_extreme_tokens_stay_finite(c);
    }
}

// fp16 storage turns magnitudes of 65520 and more into infinity: a config that stores keys or
// values in fp16 (the fp16 method, 16-bit values, an fp16 outlier store) refuses such inputs
// and changes nothing; the others take them, and 65519 (which rounds to 65504) passes everywhere.
TEST(InputRange, Fp16StorageRefusesWhatItCannotHold) {
    const int h = 2, d = 64, n = 8;
    const auto k = randn(static_cast<std::size_t>(h) * n * d, 31), v = randn(k.size(), 32);
    auto with = [&](std::vector<float> x, float big) {
        x[static_cast<std::size_t>(n) * d + 2 * d + 3] = big;  // head 1, token 2
        return x;
    };
    struct Case {
        std::string method;
        int value_bits, outlier_bits;  // outlier_bits 0: no outlier store
        bool keys_refused, values_refused;
    };
    for (const Case& c :
         {Case{"fp16", 2, 0, true, true}, Case{"turboquant_rvq", 16, 0, false, true},
          Case{"turboquant_rvq", 4, 0, false, false}, Case{"turboquant_rvq", 4, 16, true, true},
          Case{"qjl", 4, 8, false, false}}) {
        SCOPED_TRACE(c.method + " v" + std::to_string(c.value_bits) + " outliers " +
                     std::to_string(c.outlier_bits));
        KVCacheConfig cfg = config_of(c.method);
        cfg.value_bits = c.value_bits;
        if (c.outlier_bits > 0) {
            cfg.outlier_observer = std::make_shared<KeyNormObserver>(2.0, 8);
            cfg.outlier_bits = c.outlier_bits;
        }
        auto cache = KVCacheFactory::create(cfg, h, d, 100);
        cache->append(k.data(), v.data(), n);
        const auto kb = with(k, -7e4f), vb = with(v, 7e4f);
        if (c.keys_refused)
            expect_error_unchanged<std::invalid_argument>(
                *cache, [&] { cache->append(kb.data(), v.data(), n); },
                "keys exceed fp16's range, |x| < 65520 (head 1, token 2)");
        else
            EXPECT_NO_THROW(cache->append(kb.data(), v.data(), n));
        if (c.values_refused)
            expect_error_unchanged<std::invalid_argument>(
                *cache, [&] { cache->append(k.data(), vb.data(), n); },
                "values exceed fp16's range");
        else
            EXPECT_NO_THROW(cache->append(k.data(), vb.data(), n));
        const auto ke = with(k, 65519.0f), ve = with(v, -65519.0f);
        EXPECT_NO_THROW(cache->append(ke.data(), ve.data(), n));
    }
}

TEST_P(ErrorTest, TruncatedOrCorruptedFilesAreRejected) {
    const int h = 2, d = 64, n = 70;
    auto cache = KVCacheFactory::create(config_of(GetParam()), h, d, 200);
    auto k = randn(static_cast<std::size_t>(h) * n * d, 8), v = randn(k.size(), 9);
    cache->append(k.data(), v.data(), n);
    const std::string path = ::testing::TempDir() + "/vq_err_" + GetParam() + ".bin";
    cache->save(path);
    const std::string good = read_file(path);
    auto rejects = [&](const std::string& contents, const std::string& fragment) {
        write_file_atomic(path, contents);
        try {
            KVCache::load(path);
            ADD_FAILURE() << "accepted a bad file (" << fragment << ")";
        } catch (const std::runtime_error& e) {
            EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
        }
    };
    for (std::size_t cut :
         {std::size_t{0}, std::size_t{5}, std::size_t{20}, good.size() / 2, good.size() - 1})
        rejects(good.substr(0, cut), "truncated");
    std::string flipped = good;
    flipped[good.size() / 2] ^= 0x40;
    rejects(flipped, "CRC");
    std::string magic = good;
    magic[0] = 'X';
    rejects(magic, "magic");
    std::string version = good;
    version[8] = 9;
    rejects(version, "version");
    rejects(good + "x", "truncated");  // payload length disagrees
    // The untouched file still loads (forged payloads with a valid CRC: see Persistence below).
    write_file_atomic(path, good);
    EXPECT_NO_THROW(KVCache::load(path));
    EXPECT_THROW(KVCache::load(path + ".missing"), std::runtime_error);
    std::remove(path.c_str());
}

INSTANTIATE_TEST_SUITE_P(AllMethods, ErrorTest,
                         ::testing::Values("turboquant_rvq", "qjl", "polarquant", "rabitq",
                                           "ratequant", "fp16"),
                         [](const auto& info) { return info.param; });

namespace {

// A saved file with `patch` applied to its payload and the CRC recomputed.
void forge(const std::string& path, const std::function<void(std::string&)>& patch) {
    std::string file = read_file(path);
    patch(file);
    const uint32_t crc = crc32(file.data() + 28, file.size() - 28);
    std::memcpy(&file[24], &crc, 4);
    write_file_atomic(path, file);
}

std::string load_error(const std::string& path) {
    try {
        KVCache::load(path);
    } catch (const std::runtime_error& e) {
        return e.what();
    }
    return "";
}

// Where a one-page file's page starts: the file ends with the page size (u64), the page count
// (int32, 1), the page's held flag (1) and the page.
std::size_t only_page_at(const std::string& file) {
    for (std::size_t bytes = 64; bytes + 13 < file.size(); bytes += 64) {
        const std::size_t at = file.size() - bytes;
        uint64_t stored = 0;
        int32_t slots = 0;
        std::memcpy(&stored, &file[at - 13], 8);
        std::memcpy(&slots, &file[at - 5], 4);
        if (stored == bytes && slots == 1 && file[at - 1] == 1) return at;
    }
    ADD_FAILURE() << "no page found";
    return 0;
}

}  // namespace

// Page contents encode() cannot produce are refused at load (scripts/fuzz.sh found each): an
// infinite fp16 coordinate, an IVF cluster id past the centroids, a NaN per-token scalar.
TEST(Persistence, ForgedPageContentsAreRejected) {
    const int d = 64, n = 5;
    auto k = randn(static_cast<std::size_t>(n) * d, 1), v = randn(k.size(), 2);
    // Token 0's key is (pi, 0, ..., 0): polarquant stores its norm, pi, as the token's scalar.
    std::fill(k.begin(), k.begin() + d, 0.0f);
    k[0] = 3.14159274f;
    const std::string path = vqtest::unique_temp_path("forged_page.bin");
    for (const std::string method : {"fp16", "rabitq", "polarquant"}) {
        auto cache = KVCacheFactory::create(config_of(method), 1, d, 64);
        cache->append(k.data(), v.data(), n);
        cache->save(path);
        forge(path, [&](std::string& file) {
            const std::size_t page = only_page_at(file);
            if (method == "fp16") {  // token 0's first coordinate: +infinity
                file[page] = 0x00, file[page + 1] = 0x7C;
            } else if (method == "rabitq") {  // token 0's cluster id: 255 of 4
                file[page] = static_cast<char>(0xFF);
            } else {  // the scalar pi: NaN
                const float pi = 3.14159274f, nan = NAN;
                const auto at = file.find(std::string(reinterpret_cast<const char*>(&pi), 4), page);
                ASSERT_NE(at, std::string::npos);
                std::memcpy(&file[at], &nan, 4);
            }
        });
        const std::string error = load_error(path);
        const char* expected = method == "fp16"     ? "corrupted fp16 keys"
                               : method == "rabitq" ? "cluster id 255 out of range"
                                                    : "non-finite key scalar";
        EXPECT_NE(error.find(expected), std::string::npos) << method << ": " << error;
    }
    std::remove(path.c_str());
}

// The outlier store's records and fp16 values, read from a file, get the same checks.
TEST(Persistence, ForgedOutliersAndFp16ValuesAreRejected) {
    const int d = 4;
    const float key[d] = {1.0f, -2.0f, 0.5f, 3.0f}, value[d] = {0.25f, 0.0f, -1.0f, 2.0f};
    for (const int bits : {8, 16}) {
        OutlierStore store(1, d, bits);
        store.add(0, 3, key, value);
        BinaryWriter out;
        store.write(out);
        const std::string good = out.buffer();
        auto read = [&](const std::string& bytes, int n_tokens) {
            OutlierStore back(1, d, bits);
            BinaryReader in(bytes.data(), bytes.size());
            back.read(in, n_tokens);
        };
        EXPECT_NO_THROW(read(good, 4));
        try {  // position 3 of a cache of 3 tokens: a later append would break the order
            read(good, 3);
            ADD_FAILURE() << bits;
        } catch (const std::runtime_error& e) {
            EXPECT_NE(std::string(e.what()).find("within the tokens"), std::string::npos);
        }
        // The key record follows the positions (u64 count, one int32) and its u64 length.
        std::string forged = good;
        const std::size_t record = 8 + 4 + 8;
        if (bits == 8) {
            const float nan = NAN;
            std::memcpy(&forged[record + d], &nan, 4);  // the key's int8 scale
        } else {
            forged[record + 2] = 0x00, forged[record + 3] = 0x7C;  // its second half: +infinity
        }
        try {
            read(forged, 4);
            ADD_FAILURE() << bits;
        } catch (const std::runtime_error& e) {
            EXPECT_NE(std::string(e.what()).find("non-finite outlier vector"), std::string::npos)
                << e.what();
        }
    }
    const ValueCodec fp16(d, 16, false, 1);
    const uint16_t halves[2 * d] = {0x3C00, 0x0000, 0xBC00, 0x4000, 0x3C00, 0x7E00, 0, 0};
    EXPECT_NO_THROW(fp16.check_codes(reinterpret_cast<const uint8_t*>(halves), 1));
    EXPECT_THROW(fp16.check_codes(reinterpret_cast<const uint8_t*>(halves), 2),
                 std::runtime_error);  // token 1 holds a NaN
    const ValueCodec packed(d, 2, false, 1);
    EXPECT_NO_THROW(packed.check_codes(reinterpret_cast<const uint8_t*>(halves), 2));
}

// A turboquant_rvq cache of 10 tokens (2 heads, head_dim 64, capacity 200), saved at `path`.
std::unique_ptr<KVCache> saved_ten_tokens(const std::string& path) {
    auto cache = KVCacheFactory::create(config_of("turboquant_rvq"), 2, 64, 200);
    auto k = randn(2 * 10 * 64, 1), v = randn(k.size(), 2);
    cache->append(k.data(), v.data(), 10);
    cache->save(path);
    return cache;
}

TEST(Persistence, VersionTwoAndThreeFilesLoadUncentredWithAdjacentPairs) {
    for (const uint32_t version : {2u, 3u}) {
        const std::string path = vqtest::unique_temp_path("old_version.bin");
        auto cache = saved_ten_tokens(path);
        // Version 3 added the center_keys flag after the outlier observer's flag, version 4 the
        // rope_half_split flag after it: of the three zero bytes before num_heads 2, head_dim
        // 64, max_seq_len 200, keep the observer's and the flags the version had.
        forge(path, [version](std::string& file) {
            const std::string tail("\0\0\0\x02\0\0\0\x40\0\0\0\xc8\0\0\0", 15);
            const std::size_t at = file.find(tail);
            ASSERT_NE(at, std::string::npos);
            ASSERT_EQ(file.find(tail, at + 1), std::string::npos);
            file.erase(at + 1, 4 - version);
            const uint64_t length = file.size() - 28;
            std::memcpy(&file[8], &version, 4);
            std::memcpy(&file[16], &length, 8);
        });
        auto loaded = KVCache::load(path);
        std::remove(path.c_str());
        EXPECT_FALSE(loaded->config().center_keys);
        EXPECT_FALSE(loaded->config().rope_half_split);
        std::vector<float> q = randn(4 * 64, 3), a(q.size()), b(q.size());
        cache->attend(q.data(), 4, 1, a.data(), 0.125f, false);
        loaded->attend(q.data(), 4, 1, b.data(), 0.125f, false);
        EXPECT_EQ(a, b) << "version " << version;
    }
}

TEST(Persistence, ForgedConfigFlagsAreRejected) {
    // The center_keys and rope_half_split flags, the last two of the three zero bytes before
    // num_heads 2, head_dim 64, max_seq_len 200: a 2 in either is refused by name.
    for (const auto& [offset, name] : {std::pair<int, std::string>{1, "center_keys flag"},
                                       std::pair<int, std::string>{2, "rope_half_split flag"}}) {
        const std::string path = vqtest::unique_temp_path("flags.bin");
        saved_ten_tokens(path);
        forge(path, [offset = offset](std::string& file) {
            const std::size_t at = file.find(std::string("\0\0\0\x02\0\0\0\x40\0\0\0\xc8", 12));
            ASSERT_NE(at, std::string::npos);
            file[at + offset] = 2;
        });
        EXPECT_NE(load_error(path).find(name), std::string::npos) << load_error(path);
        std::remove(path.c_str());
    }
}

TEST(Persistence, ForgedPayloadWithValidCrcIsRejected) {
    const std::string path = vqtest::unique_temp_path("forged.bin");
    saved_ten_tokens(path);
    // Header: magic(8) version(4) kind(4) length(8) crc(4) = 28 bytes; the payload starts with
    // the method string (u64 length, bytes) followed by bits (int32).
    forge(path, [](std::string& file) {
        const std::size_t bits_at = 28 + 8 + std::string("turboquant_rvq").size();
        const int32_t bits = 42;
        std::memcpy(&file[bits_at], &bits, 4);
    });
    EXPECT_NE(load_error(path).find("bits"), std::string::npos) << load_error(path);
    std::remove(path.c_str());
}
