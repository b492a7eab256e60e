// Calibration infrastructure: activation collection on a tiny random-weight GGUF (against an
// independent fp16 run), calibration files (round trip, merge, every rejection), apply_calibration
// and the calibrated builder. The per-method calibrations are in test_calibration_methods.cpp.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "calibration/collect.h"
#include "calibration_test_helpers.h"
#include "core/binary_io.h"
#include "core/half.h"
#include "model/gguf_writer.h"
#include "model/llama_model.h"
#include "test_helpers.h"
#include "veloxquant/calibration.h"
#include "veloxquant/factory.h"

using namespace veloxquant;
using vqtest::array;

namespace {

// ---- A tiny llama GGUF with F32 weights: 2 layers, n_embd 64, 4 heads, 2 KV heads, d 16.
constexpr int kLayers = 2, kEmbd = 64, kHeads = 4, kKVHeads = 2, kDim = 16, kFF = 96, kVocab = 50;
constexpr float kBase = 10000.0f;

class TinyModel {
public:
    explicit TinyModel(uint32_t seed = 3) {
        path_ = vqtest::unique_temp_path("calib.gguf");
        std::mt19937 gen(seed);
        GGUFWriter gw;
        gw.add_string("general.architecture", "llama");
        gw.add_string("general.name", "tiny" + std::to_string(seed));
        gw.add_u32("llama.block_count", kLayers);
        gw.add_u32("llama.context_length", 2048);
        gw.add_u32("llama.embedding_length", kEmbd);
        gw.add_u32("llama.feed_forward_length", kFF);
        gw.add_u32("llama.attention.head_count", kHeads);
        gw.add_u32("llama.attention.head_count_kv", kKVHeads);
        gw.add_u32("llama.rope.dimension_count", kDim);
        gw.add_f32("llama.rope.freq_base", kBase);
        gw.add_f32("llama.attention.layer_norm_rms_epsilon", 1e-5f);
        auto add = [&](const std::string& name, int rows, int cols, float scale,
                       float mean = 0.0f) {
            std::normal_distribution<float> dist(mean, scale);
            std::vector<float> v(static_cast<std::size_t>(rows) * cols);
            for (float& x : v) x = dist(gen);
            gw.add_tensor(
                name, rows == 1 ? std::vector<int64_t>{cols} : std::vector<int64_t>{cols, rows}, v);
        };
        const float e = 1.0f / std::sqrt(static_cast<float>(kEmbd));
        add("token_embd.weight", kVocab, kEmbd, 1.0f);
        add("output_norm.weight", 1, kEmbd, 0.1f, 1.0f);
        add("output.weight", kVocab, kEmbd, 2 * e);
        for (int l = 0; l < kLayers; ++l) {
            const std::string p = "blk." + std::to_string(l) + ".";
            add(p + "attn_norm.weight", 1, kEmbd, 0.1f, 1.0f);
            add(p + "attn_q.weight", kHeads * kDim, kEmbd, 2 * e);
            add(p + "attn_k.weight", kKVHeads * kDim, kEmbd, 2 * e);
            add(p + "attn_v.weight", kKVHeads * kDim, kEmbd, e);
            add(p + "attn_output.weight", kEmbd, kHeads * kDim, e);
            add(p + "ffn_norm.weight", 1, kEmbd, 0.1f, 1.0f);
            add(p + "ffn_gate.weight", kFF, kEmbd, e);
            add(p + "ffn_up.weight", kFF, kEmbd, e);
            add(p + "ffn_down.weight", kEmbd, kFF, 1.0f / std::sqrt(static_cast<float>(kFF)));
        }
        gw.write(path_);
        model_ = LlamaModel::load(path_);
    }
    ~TinyModel() { std::remove(path_.c_str()); }
    const LlamaModel& model() const { return *model_; }

private:
    std::string path_;
    std::unique_ptr<LlamaModel> model_;
};

std::vector<int32_t> random_tokens(int n, uint32_t seed) {
    std::mt19937 gen(seed);
    std::uniform_int_distribution<int> dist(0, kVocab - 1);
    std::vector<int32_t> t(n);
    for (auto& x : t) x = dist(gen);
    return t;
}

std::string temp_path(const std::string& name) {
    return vqtest::unique_temp_path(name);
}

float fp16_round(float x) {
    return half_to_float(float_to_half(x));
}

// ---- Collection -------------------------------------------------------------------------------

TEST(CalibrationCollect, CountsShapesPositionsAndKeysMatchAnFp16Run) {
    const TinyModel tiny;
    const std::vector<int32_t> tokens = random_tokens(40, 11);
    CollectOptions o;
    o.ctx = 16;  // sequences of 16, 16 and 8 tokens
    o.max_kv_rows = 1000;
    o.max_query_rows = 1000;
    int64_t progressed = 0;
    o.progress = [&](int64_t n) { progressed += n; };
    const Activations acts = collect_activations(tiny.model(), tokens, o);
    EXPECT_EQ(progressed, 40);
    ASSERT_EQ(acts.layers.size(), static_cast<std::size_t>(kLayers));
    ASSERT_EQ(acts.rope.inv_freq.size(), static_cast<std::size_t>(kDim / 2));
    for (int i = 0; i < kDim / 2; ++i)
        EXPECT_NEAR(acts.rope.inv_freq[i], std::pow(10000.0, -2.0 * i / kDim), 1e-12);

    // Expected positions: each sequence restarts at 0.
    std::vector<int32_t> pos;
    for (int s : {16, 16, 8})
        for (int p = 0; p < s; ++p) pos.push_back(p);

    // The reference: the same sequences through plain fp16 caches, read back with dequantize.
    KVCacheConfig fp16;
    fp16.method = "fp16";
    std::vector<std::vector<float>> ref_k(kLayers * kKVHeads), ref_v(kLayers * kKVHeads);
    std::vector<float> logits(kVocab);
    for (int start = 0; start < 40; start += 16) {
        const int n = std::min(16, 40 - start);
        auto caches = tiny.model().make_caches(fp16, n);
        tiny.model().forward(tokens.data() + start, n, caches, logits.data(), false);
        for (int l = 0; l < kLayers; ++l) {
            std::vector<float> k(static_cast<std::size_t>(kKVHeads) * n * kDim), v(k.size());
            caches[l]->dequantize(0, n, k.data(), v.data());
            for (int h = 0; h < kKVHeads; ++h) {
                const auto first = static_cast<std::size_t>(h) * n * kDim;
                ref_k[l * kKVHeads + h].insert(ref_k[l * kKVHeads + h].end(), k.begin() + first,
                                               k.begin() + first + n * kDim);
                ref_v[l * kKVHeads + h].insert(ref_v[l * kKVHeads + h].end(), v.begin() + first,
                                               v.begin() + first + n * kDim);
            }
        }
    }
    for (int l = 0; l < kLayers; ++l) {
        const LayerActivations& la = acts.layers[l];
        ASSERT_EQ(la.keys.size(), static_cast<std::size_t>(kKVHeads));
        ASSERT_EQ(la.values.size(), static_cast<std::size_t>(kKVHeads));
        ASSERT_EQ(la.queries.size(), static_cast<std::size_t>(kKVHeads));
        for (int h = 0; h < kKVHeads; ++h) {
            const HeadSamples& k = la.keys[h];
            const HeadSamples& v = la.values[h];
            const HeadSamples& q = la.queries[h];
            EXPECT_EQ(k.dim, kDim);
            ASSERT_EQ(k.count(), 40);
            ASSERT_EQ(v.count(), 40);
            EXPECT_EQ(q.count(), 40 * (kHeads / kKVHeads));  // both query heads of the group
            EXPECT_EQ(k.positions, pos);
            EXPECT_EQ(v.positions, pos);
            // Layer 0 sees only the embeddings: bit-exact. Later layers follow an attention that
            // sums in another order than the fp16 cache's scorer, so their fp16 values may sit
            // one ulp (2^-11 relative) apart.
            for (std::size_t i = 0; i < k.data.size(); ++i) {
                const float rk = ref_k[l * kKVHeads + h][i], rv = ref_v[l * kKVHeads + h][i];
                const float tk = l == 0 ? 0.0f : 1.1e-3f * std::fabs(rk) + 1e-6f;
                const float tv = l == 0 ? 0.0f : 1.1e-3f * std::fabs(rv) + 1e-6f;
                ASSERT_NEAR(fp16_round(k.data[i]), rk, tk) << "layer " << l << " head " << h;
                ASSERT_NEAR(fp16_round(v.data[i]), rv, tv) << "layer " << l << " head " << h;
            }
            // Queries arrive per forward chunk as [q head][token]: the two heads of the group
            // each bring every position of the sequence.
            std::vector<int32_t> qpos;
            for (int s : {16, 16, 8})
                for (int g = 0; g < 2; ++g)
                    for (int p = 0; p < s; ++p) qpos.push_back(p);
            EXPECT_EQ(q.positions, qpos);
        }
    }
}

TEST(CalibrationCollect, ReservoirKeepsAUniformSubsetWithKeysAndValuesOfOneToken) {
    const TinyModel tiny;
    const std::vector<int32_t> tokens = random_tokens(64, 5);
    CollectOptions all;
    all.ctx = 32;
    const Activations full = collect_activations(tiny.model(), tokens, all);
    CollectOptions few = all;
    few.max_kv_rows = 10;
    few.max_query_rows = 7;
    const Activations sub = collect_activations(tiny.model(), tokens, few);
    const Activations again = collect_activations(tiny.model(), tokens, few);
    for (int l = 0; l < kLayers; ++l)
        for (int h = 0; h < kKVHeads; ++h) {
            const HeadSamples& fk = full.layers[l].keys[h];
            const HeadSamples& sk = sub.layers[l].keys[h];
            ASSERT_EQ(sk.count(), 10);
            EXPECT_EQ(sub.layers[l].queries[h].count(), 7);
            EXPECT_EQ(sk.data, again.layers[l].keys[h].data);  // seeded
            int late = 0;
            for (int64_t i = 0; i < sk.count(); ++i) {
                // The kept row is some token's key; its value is that token's value.
                int64_t match = -1;
                for (int64_t j = 0; j < fk.count() && match < 0; ++j)
                    if (std::memcmp(sk.row(i), fk.row(j), kDim * sizeof(float)) == 0) match = j;
                ASSERT_GE(match, 0);
                EXPECT_EQ(sk.positions[i], fk.positions[match]);
                EXPECT_EQ(0,
                          std::memcmp(sub.layers[l].values[h].row(i),
                                      full.layers[l].values[h].row(match), kDim * sizeof(float)));
                late += match >= 10;
            }
            EXPECT_GT(late, 0) << "a reservoir that only keeps the first rows is not uniform";
        }
}

TEST(CalibrationCollect, RejectsBadOptions) {
    const TinyModel tiny;
    CollectOptions o;
    o.ctx = 1;
    EXPECT_THROW(collect_activations(tiny.model(), random_tokens(8, 1), o), std::invalid_argument);
    o = {};
    o.max_kv_rows = 0;
    EXPECT_THROW(collect_activations(tiny.model(), random_tokens(8, 1), o), std::invalid_argument);
    EXPECT_THROW(collect_activations(tiny.model(), random_tokens(1, 1), {}), std::invalid_argument);
}

TEST(CalibrationCollect, FingerprintTellsModelsApart) {
    const TinyModel a(3), b(4);
    const ModelFingerprint fa = model_fingerprint(a.model()), fb = model_fingerprint(b.model());
    EXPECT_EQ(fa, model_fingerprint(a.model()));
    EXPECT_NE(fa, fb);  // same architecture and shapes, other weights
    EXPECT_EQ(fa.shape.layers.size(), static_cast<std::size_t>(kLayers));
    EXPECT_EQ(fa.name, "tiny3");
}

// ---- Calibration files ----------------------------------------------------------------------

ModelFingerprint fake_model(uint64_t hash = 0x1234) {
    ModelFingerprint f;
    f.architecture = "llama";
    f.name = "fake";
    f.shape.layers.assign(2, {2, 16});
    f.tensor_hash = hash;
    return f;
}

Calibration full_calibration() {
    Calibration c;
    c.model = fake_model();
    c.rope_inv_freq = {1.0, 0.1, 0.01};
    c.vecinfer = Calibration::VecInfer{array({2, 2, 4, 16, 4}, 1), array({2, 2, 16}, 2), 4, 1};
    c.spectral = Calibration::Spectral{{array({2, 19, 16}, 3), array({2, 19, 16}, 4)}};
    Calibration::RateQuant r;
    r.bit_allocation = {{"0.0", 2}, {"0.1", 3}, {"1.0", 2}, {"1.1", 3}};
    r.target_bits = 2.5;
    r.units = {"0.0", "0.1", "1.0", "1.1"};
    r.sensitivity = {1, 2, 3, 4};
    r.curve_a = {1, 1, 1, 1};
    r.curve_beta = {3.5, 3.6, 3.7, 3.8};
    c.ratequant = r;
    c.commvq = Calibration::CommVQ{array({2, 2, 8, 16, 2}, 5), 8, 2};
    c.rabitq = Calibration::RaBitQ{array({2, 2, 8, 16}, 6), 8};
    return c;
}

std::string read_all(const std::string& path) {
    return read_file(path);
}
void write_all(const std::string& path, const std::string& bytes) {
    std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
}

// Header: magic (8), version (4), payload length (8), CRC (4).
constexpr std::size_t kHeader = 24;

std::string load_error(const std::string& path) {
    try {
        Calibration::load(path);
    } catch (const std::runtime_error& e) {
        return e.what();
    }
    return "";
}

TEST(CalibrationFile, RoundTripsEverySection) {
    const std::string path = temp_path("roundtrip.vqc");
    std::remove(path.c_str());
    const Calibration c = full_calibration();
    c.save(path);
    const Calibration d = Calibration::load(path);
    EXPECT_EQ(d.model, c.model);
    EXPECT_EQ(d.model.name, "fake");
    EXPECT_EQ(d.rope_inv_freq, c.rope_inv_freq);
    EXPECT_EQ(d.sections(),
              (std::vector<std::string>{"vecinfer", "spectral", "ratequant", "commvq", "rabitq"}));
    EXPECT_EQ(d.vecinfer->codebook.data, c.vecinfer->codebook.data);
    EXPECT_EQ(d.vecinfer->smooth_factors.shape, c.vecinfer->smooth_factors.shape);
    EXPECT_EQ(d.vecinfer->num_subspaces, 4);
    EXPECT_EQ(d.spectral->rotations[1].data, c.spectral->rotations[1].data);
    EXPECT_EQ(d.ratequant->bit_allocation, c.ratequant->bit_allocation);
    EXPECT_EQ(d.ratequant->curve_beta, c.ratequant->curve_beta);
    EXPECT_EQ(d.ratequant->target_bits, 2.5);
    EXPECT_EQ(d.commvq->codebook.shape, c.commvq->codebook.shape);
    EXPECT_EQ(d.commvq->num_codebooks, 8);
    EXPECT_EQ(d.rabitq->ivf_centroids.data, c.rabitq->ivf_centroids.data);
    std::remove(path.c_str());
}

TEST(CalibrationFile, SavingMergesSectionsOfTheSameModelAndRefusesAnother) {
    const std::string path = temp_path("merge.vqc");
    std::remove(path.c_str());
    Calibration a = full_calibration();
    a.vecinfer.reset(), a.spectral.reset(), a.commvq.reset(), a.rabitq.reset();
    a.save(path);
    Calibration b = full_calibration();
    b.vecinfer.reset(), b.spectral.reset(), b.commvq.reset(), b.ratequant.reset();
    b.rabitq->num_clusters = 8;
    b.save(path);
    EXPECT_EQ(Calibration::load(path).sections(),
              (std::vector<std::string>{"ratequant", "rabitq"}));
    // A newer section replaces the old one.
    a.ratequant->target_bits = 3.0;
    a.save(path);
    EXPECT_EQ(Calibration::load(path).ratequant->target_bits, 3.0);
    EXPECT_TRUE(Calibration::load(path).rabitq.has_value());

    Calibration other = full_calibration();
    other.model = fake_model(0x9999);
    other.model.name = "other";
    const std::string before = read_all(path);
    try {
        other.save(path);
        FAIL() << "saving another model's calibration into the file must throw";
    } catch (const std::invalid_argument& e) {
        EXPECT_NE(std::string(e.what()).find("fake"), std::string::npos) << e.what();
        EXPECT_NE(std::string(e.what()).find("other"), std::string::npos) << e.what();
    }
    EXPECT_EQ(read_all(path), before);
    std::remove(path.c_str());
}

TEST(CalibrationFile, RejectsTruncatedCorruptedForgedAndForeignFiles) {
    const std::string good = temp_path("good.vqc"), bad = temp_path("bad.vqc");
    std::remove(good.c_str());
    full_calibration().save(good);
    const std::string bytes = read_all(good);

    EXPECT_NE(load_error(temp_path("missing.vqc")).find("cannot open"), std::string::npos);
    write_all(bad, bytes.substr(0, bytes.size() - 5));
    EXPECT_NE(load_error(bad).find("truncated"), std::string::npos) << load_error(bad);
    write_all(bad, bytes.substr(0, 12));
    EXPECT_NE(load_error(bad).find("truncated"), std::string::npos) << load_error(bad);

    std::string flipped = bytes;
    flipped[kHeader + flipped.size() / 2 - kHeader / 2] ^= 0x10;
    write_all(bad, flipped);
    EXPECT_NE(load_error(bad).find("CRC"), std::string::npos) << load_error(bad);

    std::string version = bytes;
    version[8] = 7;
    write_all(bad, version);
    EXPECT_NE(load_error(bad).find("version 7"), std::string::npos) << load_error(bad);
    // A version 1 file (spectral rotations without the query moments) asks for recalibration.
    version[8] = 1;
    write_all(bad, version);
    EXPECT_NE(load_error(bad).find("version 1 (this build reads 2); recalibrate"),
              std::string::npos)
        << load_error(bad);

    std::string magic = bytes;
    magic[0] = 'X';
    write_all(bad, magic);
    EXPECT_NE(load_error(bad).find("bad magic"), std::string::npos) << load_error(bad);

    // Forged: a payload edited and its CRC recomputed. The last int32 of the file is the
    // rabitq num_clusters, which must match the centroid array's shape.
    std::string forged = bytes;
    int32_t clusters = 9;
    std::memcpy(&forged[forged.size() - 4], &clusters, 4);
    const uint32_t crc = crc32(forged.data() + kHeader, forged.size() - kHeader);
    std::memcpy(&forged[20], &crc, 4);
    write_all(bad, forged);
    const std::string err = load_error(bad);
    EXPECT_NE(err.find("corrupted calibration file"), std::string::npos) << err;
    EXPECT_NE(err.find("ivf_centroids"), std::string::npos) << err;

    // A foreign calibration: check_calibration_model names both models.
    const Calibration c = Calibration::load(good);
    ModelFingerprint mine = fake_model(0x5555);
    mine.name = "mine";
    try {
        check_calibration_model(c, mine);
        FAIL();
    } catch (const std::invalid_argument& e) {
        EXPECT_NE(std::string(e.what()).find("fake"), std::string::npos) << e.what();
        EXPECT_NE(std::string(e.what()).find("mine"), std::string::npos) << e.what();
    }
    EXPECT_NO_THROW(check_calibration_model(c, fake_model()));
    std::remove(good.c_str());
    std::remove(bad.c_str());
}

// ---- apply_calibration and the calibrated builder ------------------------------------------

TEST(CalibrationApply, FillsTheMethodFieldsAndNamesTheMissingProducer) {
    const Calibration full = full_calibration();
    KVCacheConfig c;
    c.method = "ratequant";
    apply_calibration(full, c);
    EXPECT_EQ(c.bit_allocation, full.ratequant->bit_allocation);
    c.method = "rabitq";
    apply_calibration(full, c);
    EXPECT_EQ(c.num_clusters, 8);
    EXPECT_EQ(c.ivf_centroids.shape, full.rabitq->ivf_centroids.shape);
    c.method = "commvq";
    apply_calibration(full, c);
    EXPECT_EQ(c.rope_inv_freq, full.rope_inv_freq);
    EXPECT_EQ(c.num_subspaces.value_or(0), 8);
    EXPECT_EQ(c.bits, 2);
    c.method = "spectral";
    apply_calibration(full, c);
    EXPECT_EQ(c.rotations.size(), 2u);
    c.method = "turboquant_rvq";
    EXPECT_NO_THROW(apply_calibration(full, c));

    Calibration empty;
    empty.model = fake_model();
    for (const char* m : {"vecinfer", "spectral", "ratequant", "commvq", "rabitq"}) {
        KVCacheConfig k;
        k.method = m;
        try {
            apply_calibration(empty, k);
            FAIL() << m;
        } catch (const std::invalid_argument& e) {
            const std::string what = e.what();
            EXPECT_NE(what.find(std::string("veloxquant calibrate --method ") + m),
                      std::string::npos)
                << what;
            EXPECT_NE(what.find("calibrat"), std::string::npos) << what;
        }
    }
}

TEST(CalibrationApply, BuilderChecksTheShapeAndBuildsCalibratedCaches) {
    const Calibration full = full_calibration();
    KVCacheConfig c;
    c.method = "ratequant";
    ModelShape wrong;
    wrong.layers.assign(3, {2, 16});
    try {
        KVCacheBuilder::build(wrong, c, full, 64);
        FAIL();
    } catch (const std::invalid_argument& e) {
        EXPECT_NE(std::string(e.what()).find("fake"), std::string::npos) << e.what();
        EXPECT_NE(std::string(e.what()).find("3 layers"), std::string::npos) << e.what();
    }
    const auto caches = KVCacheBuilder::build(full.model.shape, c, full, 64);
    ASSERT_EQ(caches.size(), 2u);
    EXPECT_EQ(caches[1]->config().bit_allocation.at("1.1"), 3);
    c.method = "rabitq";
    const auto rb = KVCacheBuilder::build(full.model.shape, c, full, 64);
    EXPECT_EQ(rb[0]->config().num_clusters, 8);
}

}  // namespace
