// The caches end to end: fused vs unfused vs exact attention, GQA and head dims, accounting,
// determinism, persistence, and bad input leaving the cache unchanged.
#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <iterator>

#include "attention/dense_attention.h"
#include "core/half.h"
#include "test_helpers.h"
#include "veloxquant/veloxquant.h"

using namespace veloxquant;
using vqtest::randn;
using vqtest::reference_attention;
using vqtest::rel_error;

namespace {

KVCacheConfig make_config(const std::string& method, int bits = 2) {
    KVCacheConfig c;
    c.method = method;
    c.bits = method == "qjl" ? 1 : bits;
    c.num_residuals = 1;
    c.value_bits = 4;
    c.sketch_dim = 128;
    c.num_clusters = 8;
    return c;
}

const std::vector<std::string> kMethods = {"turboquant_rvq", "qjl",       "polarquant",
                                           "rabitq",         "ratequant", "fp16"};

struct Data {
    int heads, q_heads, n, d;
    std::vector<float> k, v, q;
};

Data make_data(int heads, int group, int n, int d, int n_q, uint64_t seed) {
    Data x{heads, heads * group, n, d, {}, {}, {}};
    x.k = randn(static_cast<std::size_t>(heads) * n * d, seed);
    x.v = randn(static_cast<std::size_t>(heads) * n * d, seed + 1);
    x.q = randn(static_cast<std::size_t>(heads) * group * n_q * d, seed + 2);
    return x;
}

std::vector<float> attend(const KVCache& c, const Data& x, int n_q, bool causal) {
    std::vector<float> out(static_cast<std::size_t>(x.q_heads) * n_q * x.d);
    c.attend(x.q.data(), x.q_heads, n_q, out.data(), 1.0f / std::sqrt(static_cast<float>(x.d)),
             causal);
    return out;
}

}  // namespace

class MethodTest : public ::testing::TestWithParam<std::string> {};

// Fused attention on the codes equals dequantize-then-attend, and the unfused path equals an
// independent exact attention over the dequantized keys and values.
TEST_P(MethodTest, FusedMatchesUnfusedAndReference) {
    for (int d : {64, 80, 96, 128, 256}) {
        for (int group : {1, 3, 4, 8}) {
            if (GetParam() == "polarquant" && d % 16) continue;
            const int heads = 2, n = 150, n_q = 3;
            const Data x = make_data(heads, group, n, d, n_q, d * 10 + group);
            KVCacheConfig cfg = make_config(GetParam());
            auto fused = KVCacheFactory::create(cfg, heads, d, 512);
            cfg.use_fused_sdpa = false;
            auto unfused = KVCacheFactory::create(cfg, heads, d, 512);
            fused->append(x.k.data(), x.v.data(), 100);
            unfused->append(x.k.data(), x.v.data(), 100);
            // Second append of the remaining 50 tokens (layout [heads][50][d]).
            std::vector<float> k2, v2;
            for (int h = 0; h < heads; ++h) {
                k2.insert(k2.end(), x.k.begin() + (h * n + 100) * d, x.k.begin() + (h * n + n) * d);
                v2.insert(v2.end(), x.v.begin() + (h * n + 100) * d, x.v.begin() + (h * n + n) * d);
            }
            fused->append(k2.data(), v2.data(), 50);
            unfused->append(k2.data(), v2.data(), 50);
            for (bool causal : {false, true}) {
                const auto a = attend(*fused, x, n_q, causal);
                const auto b = attend(*unfused, x, n_q, causal);
                EXPECT_LT(rel_error(a, b), 1e-4) << GetParam() << " d " << d << " group " << group;
                std::vector<float> kd(x.k.size()), vd(x.v.size());
                fused->dequantize(0, n, kd.data(), vd.data());
                const auto ref =
                    reference_attention(x.q, x.q_heads, n_q, kd, vd, heads, n, d,
                                        1.0f / std::sqrt(static_cast<float>(d)), causal);
                EXPECT_LT(rel_error(b, ref), 1e-4)
                    << GetParam() << " d " << d << " group " << group;
            }
        }
    }
}

TEST_P(MethodTest, CausalPrefillMatchesReference) {
    const int heads = 2, group = 3, n = 200, d = 64;
    const Data x = make_data(heads, group, n, d, n, 77);
    auto cache = KVCacheFactory::create(make_config(GetParam()), heads, d, 1024);
    cache->append(x.k.data(), x.v.data(), n);
    const auto got = attend(*cache, x, n, true);
    std::vector<float> kd(x.k.size()), vd(x.v.size());
    cache->dequantize(0, n, kd.data(), vd.data());
    const auto ref = reference_attention(x.q, x.q_heads, n, kd, vd, heads, n, d, 0.125f, true);
    EXPECT_LT(rel_error(got, ref), 1e-4);
}

// A prefill chunk after cached tokens, as a long prompt fed in chunks meets it: 300 queries of
// 4 query heads a KV head after 400 tokens (appended apart) make 1200 rows a KV head, ten row
// tiles of the decoded-page path whose bounds fall inside a query head's positions, and pages
// that a tile's first rows do not see.
TEST_P(MethodTest, PrefillChunkAfterCachedTokensMatchesReference) {
    const int heads = 2, group = 4, n = 700, n_q = 300, d = 64, cached = n - n_q;
    const Data x = make_data(heads, group, n, d, n_q, 91);
    auto cache = KVCacheFactory::create(make_config(GetParam()), heads, d, 1024);
    for (const auto& [t0, t1] : {std::pair{0, cached}, std::pair{cached, n}}) {
        const auto k = vqtest::token_slice(x.k, heads, n, d, t0, t1);
        const auto v = vqtest::token_slice(x.v, heads, n, d, t0, t1);
        cache->append(k.data(), v.data(), t1 - t0);
    }
    std::vector<float> kd(x.k.size()), vd(x.v.size());
    cache->dequantize(0, n, kd.data(), vd.data());
    for (bool causal : {true, false}) {
        const auto ref =
            reference_attention(x.q, x.q_heads, n_q, kd, vd, heads, n, d, 0.125f, causal);
        EXPECT_LT(rel_error(attend(*cache, x, n_q, causal), ref), 1e-4) << causal;
    }
}

TEST_P(MethodTest, SaveLoadGivesIdenticalAttention) {
    const int heads = 3, d = 128, n = 130;
    const Data x = make_data(heads, 3, n, d, 2, 5);
    auto cache = KVCacheFactory::create(make_config(GetParam()), heads, d, 1024, 4);
    cache->append(x.k.data(), x.v.data(), n);
    const auto before = attend(*cache, x, 2, true);
    const std::string path = ::testing::TempDir() + "/vq_" + GetParam() + ".bin";
    cache->save(path);
    auto loaded = KVCache::load(path);
    EXPECT_EQ(loaded->class_name(), cache->class_name());
    EXPECT_EQ(loaded->size(), n);
    EXPECT_EQ(loaded->nbytes(), cache->nbytes());
    EXPECT_EQ(attend(*loaded, x, 2, true), before);
    // Appending after load continues exactly as the original would.
    const Data more = make_data(heads, 3, 10, d, 2, 6);
    cache->append(more.k.data(), more.v.data(), 10);
    loaded->append(more.k.data(), more.v.data(), 10);
    EXPECT_EQ(attend(*loaded, x, 2, false), attend(*cache, x, 2, false));
    std::remove(path.c_str());
}

// A saved file depends only on the tokens held: trimmed slots are zeroed, as in a fresh page.
TEST_P(MethodTest, TrimmedCacheSavesAsOneThatNeverHeldTheTokens) {
    const int heads = 2, d = 64;
    const Data first = make_data(heads, 1, 40, d, 1, 13), more = make_data(heads, 1, 30, d, 1, 14);
    KVCacheConfig cfg = make_config(GetParam());
    auto trimmed = KVCacheFactory::create(cfg, heads, d);
    auto plain = KVCacheFactory::create(cfg, heads, d);
    trimmed->append(first.k.data(), first.v.data(), 40);
    trimmed->append(more.k.data(), more.v.data(), 30);  // into a second page
    trimmed->trim(30);
    plain->append(first.k.data(), first.v.data(), 40);
    EXPECT_TRUE(vqtest::save_the_same_file(*trimmed, *plain));
}

// The fp16 / bf16 entry points are the float32 path on the same values: the inputs' exact float
// values stored alike (the saved files equal), the outputs those of the float32 calls rounded.
// (The conversions themselves are checked against known values in test_core.)
TEST_P(MethodTest, HalfEntryPointsAreTheFloat32PathOnTheSameValues) {
    const int heads = 2, group = 3, d = 64, n = 70, n_q = 2;
    const Data x = make_data(heads, group, n, d, n_q, 21);
    for (const HalfFormat f : {HalfFormat::kFloat16, HalfFormat::kBFloat16}) {
        const bool fp16 = f == HalfFormat::kFloat16;
        SCOPED_TRACE(fp16 ? "fp16" : "bf16");
        auto bits = [&](const std::vector<float>& a) {
            std::vector<uint16_t> b(a.size());
            for (std::size_t i = 0; i < a.size(); ++i)
                b[i] = fp16 ? float_to_half(a[i]) : float_to_bf16(a[i]);
            return b;
        };
        auto widened = [&](const std::vector<uint16_t>& b) {
            std::vector<float> a(b.size());
            for (std::size_t i = 0; i < b.size(); ++i)
                a[i] = fp16 ? half_to_float(b[i]) : bf16_to_float(b[i]);
            return a;
        };
        const auto kb = bits(x.k), vb = bits(x.v), qb = bits(x.q);
        const auto kw = widened(kb), vw = widened(vb), qw = widened(qb);
        const KVCacheConfig cfg = make_config(GetParam());
        auto half = KVCacheFactory::create(cfg, heads, d),
             full = KVCacheFactory::create(cfg, heads, d);
        half->append_half(kb.data(), vb.data(), n, f);
        full->append(kw.data(), vw.data(), n);
        EXPECT_TRUE(vqtest::save_the_same_file(*half, *full));

        std::vector<uint16_t> out16(qb.size());
        half->attend_half(qb.data(), x.q_heads, n_q, out16.data(), 0.125f, true, f);
        std::vector<float> out(qw.size());
        full->attend(qw.data(), x.q_heads, n_q, out.data(), 0.125f, true);
        EXPECT_EQ(out16, bits(out));

        const int start = 5, count = 40;
        std::vector<uint16_t> k16(static_cast<std::size_t>(heads) * count * d), v16(k16.size());
        half->dequantize_half(start, count, k16.data(), v16.data(), f);
        std::vector<float> kd(k16.size()), vd(k16.size());
        full->dequantize(start, count, kd.data(), vd.data());
        EXPECT_EQ(k16, bits(kd));
        EXPECT_EQ(v16, bits(vd));

        // Refusals are the float32 methods' own, and change nothing.
        auto nan_keys = kb;
        nan_keys[3 * d + 7] = fp16 ? 0x7E00 : 0x7FC0;
        EXPECT_THROW(half->append_half(nan_keys.data(), vb.data(), n, f), std::invalid_argument);
        EXPECT_THROW(half->append_half(nullptr, vb.data(), 3, f), std::invalid_argument);
        EXPECT_THROW(half->append_half(kb.data(), vb.data(), -1, f), std::invalid_argument);
        EXPECT_THROW(half->attend_half(qb.data(), 0, n_q, out16.data(), 0.125f, false, f),
                     std::invalid_argument);
        EXPECT_THROW(half->dequantize_half(n - 3, 10, k16.data(), v16.data(), f),
                     std::out_of_range);
        EXPECT_THROW(half->append_half(kb.data(), vb.data(), n, static_cast<HalfFormat>(7)),
                     std::invalid_argument);
        EXPECT_EQ(half->size(), n);
        half->dequantize_half(0, 0, nullptr, nullptr, f);  // an empty range writes nothing
    }
}

TEST_P(MethodTest, SameSeedSameBytesOtherSeedOtherCodes) {
    const int heads = 2, d = 64, n = 70;
    const Data x = make_data(heads, 1, n, d, 1, 9);
    KVCacheConfig cfg = make_config(GetParam());
    auto a = KVCacheFactory::create(cfg, heads, d);
    auto b = KVCacheFactory::create(cfg, heads, d);
    a->append(x.k.data(), x.v.data(), n);
    b->append(x.k.data(), x.v.data(), n);
    EXPECT_TRUE(vqtest::save_the_same_file(*a, *b));
    if (GetParam() == "fp16") return;  // nothing random
    cfg.seed = 1;
    auto c = KVCacheFactory::create(cfg, heads, d);
    c->append(x.k.data(), x.v.data(), n);
    std::vector<float> ka(x.k.size()), kc(x.k.size()), va(x.v.size()), vc(x.v.size());
    a->dequantize(0, n, ka.data(), va.data());
    c->dequantize(0, n, kc.data(), vc.data());
    EXPECT_NE(ka, kc);
    EXPECT_NE(va, vc);
}

TEST_P(MethodTest, NbytesIsCodesScalarsAndPageSlack) {
    const int heads = 4, d = 128;
    auto made = KVCacheFactory::create(make_config(GetParam()), heads, d, 4096);
    auto* cache = dynamic_cast<QuantizedKVCache*>(made.get());
    ASSERT_NE(cache, nullptr);
    EXPECT_EQ(cache->nbytes(), cache->parameter_bytes());  // nothing stored yet
    const Data x = make_data(heads, 1, 1000, d, 1, 11);
    cache->append(x.k.data(), x.v.data(), 1000);
    // Per token and head: the key and value bits per coordinate say how many bytes one token
    // takes; the 16 pages (of 64 tokens) hold 1024 slots, each region padded to 64 bytes.
    const double token_bytes =
        (cache->key_bits_per_coordinate() + cache->value_bits_per_coordinate()) * d / 8;
    const double pages = 16, slots = pages * kTokensPerPage;
    const double storage = static_cast<double>(cache->storage_bytes());
    const double table = 16 * sizeof(void*);
    EXPECT_GE(storage, heads * slots * token_bytes + table);
    EXPECT_LE(storage, heads * slots * token_bytes + table + pages * heads * 4 * 64);
    EXPECT_EQ(cache->nbytes(), cache->storage_bytes() + cache->parameter_bytes());
    // Far below float32 keys and values for every compressed method.
    if (GetParam() != "fp16") EXPECT_LT(storage, 0.25 * 1000 * heads * d * 8);
}

INSTANTIATE_TEST_SUITE_P(AllMethods, MethodTest, ::testing::ValuesIn(kMethods),
                         [](const auto& info) { return info.param; });

// Attention error against exact float attention falls as key bits rise (values fp16), as the
// qjl sketch grows, and as value bits rise (keys at 4 bits x 3 stages).
TEST(Quality, AttentionErrorFallsWithBits) {
    const int heads = 2, group = 4, n = 512, d = 128, n_q = 4;
    const Data x = make_data(heads, group, n, d, n_q, 21);
    const auto exact = reference_attention(x.q, x.q_heads, n_q, x.k, x.v, heads, n, d, 0.2f, false);
    auto error = [&](KVCacheConfig cfg) {
        auto c = KVCacheFactory::create(cfg, heads, d, n);
        c->append(x.k.data(), x.v.data(), n);
        std::vector<float> out(x.q.size());
        c->attend(x.q.data(), x.q_heads, n_q, out.data(), 0.2f, false);
        return rel_error(out, exact);
    };
    for (const std::string m : {"turboquant_rvq", "polarquant", "rabitq", "ratequant"}) {
        double prev = 1e9;
        for (int bits = 1; bits <= 4; ++bits) {
            KVCacheConfig cfg = make_config(m, bits);
            cfg.value_bits = 16;
            const double e = error(cfg);
            EXPECT_LT(e, prev) << m << " bits " << bits;
            prev = e;
        }
    }
    double prev = 1e9;
    for (int m : {16, 64, 256, 1024}) {
        KVCacheConfig cfg = make_config("qjl");
        cfg.sketch_dim = m;
        cfg.value_bits = 16;
        const double e = error(cfg);
        EXPECT_LT(e, prev) << "qjl sketch " << m;
        prev = e;
    }
    prev = 1e9;
    for (int vb : {1, 2, 3, 4, 8}) {
        KVCacheConfig tq = make_config("turboquant_rvq", 4);
        tq.num_residuals = 3;
        tq.value_bits = vb;
        const double e = error(tq);
        EXPECT_LT(e, prev) << "value bits " << vb;
        prev = e;
    }
}

TEST(Quality, ResidualStagesLowerAttentionError) {
    const int heads = 1, n = 256, d = 64;
    const Data x = make_data(heads, 2, n, d, 2, 31);
    const auto exact = reference_attention(x.q, x.q_heads, 2, x.k, x.v, heads, n, d, 0.3f, false);
    double prev = 1e9;
    for (int stages = 1; stages <= 3; ++stages) {
        KVCacheConfig cfg = make_config("turboquant_rvq", 1);
        cfg.num_residuals = stages;
        cfg.value_bits = 16;
        auto c = KVCacheFactory::create(cfg, heads, d, n);
        c->append(x.k.data(), x.v.data(), n);
        std::vector<float> out(x.q.size());
        c->attend(x.q.data(), x.q_heads, 2, out.data(), 0.3f, false);
        const double e = rel_error(out, exact);
        EXPECT_LT(e, prev);
        prev = e;
    }
}

// The dense baseline the benchmarks time against is itself checked against the reference.
TEST(DenseAttention, MatchesReferenceAcrossShapes) {
    for (int d : {64, 80, 128}) {
        for (int group : {1, 3, 8}) {
            for (int n_q : {1, 5, 40}) {
                const int heads = 2, n = 300;
                const Data x = make_data(heads, group, n, d, n_q, d + group + n_q);
                for (bool causal : {false, true}) {
                    std::vector<float> out(x.q.size());
                    dense_attention(x.q.data(), x.q_heads, n_q, x.k.data(), x.v.data(), heads, n, d,
                                    out.data(), 0.1f, causal);
                    const auto ref = reference_attention(x.q, x.q_heads, n_q, x.k, x.v, heads, n, d,
                                                         0.1f, causal);
                    EXPECT_LT(rel_error(out, ref), 1e-5)
                        << d << " " << group << " " << n_q << " " << causal;
                }
            }
        }
    }
}
