// Calibration: activation collection on a tiny random-weight GGUF (against an independent fp16
// run), calibration files (round trip, merge, every rejection), apply_calibration and the
// calibrated builder, RaBitQ calibrated centroids (against the codec's own first-prefill
// training), and RateQuant (curve fit, measured distortion against the TurboQuant paper,
// sensitivities against naive loops, water-filling against brute force, and KLD on the real
// model where it exists).
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
#include "calibration/rabitq_calibration.h"
#include "calibration/ratequant_calibration.h"
#include "core/binary_io.h"
#include "core/half.h"
#include "model/evaluation.h"
#include "model/gguf_writer.h"
#include "model/llama_model.h"
#include "model/tokenizer.h"
#include "test_helpers.h"
#include "veloxquant/calibration.h"
#include "veloxquant/factory.h"

using namespace veloxquant;

namespace {

// ---- A tiny llama GGUF with F32 weights: 2 layers, n_embd 64, 4 heads, 2 KV heads, d 16.
constexpr int kLayers = 2, kEmbd = 64, kHeads = 4, kKVHeads = 2, kDim = 16, kFF = 96, kVocab = 50;
constexpr float kBase = 10000.0f;

class TinyModel {
public:
    explicit TinyModel(uint32_t seed = 3) {
        static int counter = 0;
        path_ = testing::TempDir() + "vq_calib_" + std::to_string(counter++) + ".gguf";
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
    return testing::TempDir() + "vq_calib_" + name;
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

FloatArray array(std::vector<int64_t> shape, uint64_t seed) {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    return FloatArray{vqtest::randn(static_cast<std::size_t>(n), seed), std::move(shape)};
}

Calibration full_calibration() {
    Calibration c;
    c.model = fake_model();
    c.rope_inv_freq = {1.0, 0.1, 0.01};
    c.vecinfer = Calibration::VecInfer{array({2, 2, 4, 16, 4}, 1), array({2, 2, 16}, 2), 4, 1};
    c.spectral = Calibration::Spectral{{array({2, 18, 16}, 3), array({2, 18, 16}, 4)}};
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

// ---- RaBitQ calibrated centroids ------------------------------------------------------------

Activations synthetic_activations(int layers, int heads, int d, int rows, uint64_t seed) {
    Activations a;
    a.layers.resize(layers);
    for (int l = 0; l < layers; ++l)
        for (int h = 0; h < heads; ++h) {
            const float scale = 0.5f + l + 0.7f * h;  // heads differ in key scale
            HeadSamples k{
                d, vqtest::randn(static_cast<std::size_t>(rows) * d, seed + 7 * l + h, scale), {}};
            HeadSamples q{
                d,
                vqtest::randn(static_cast<std::size_t>(rows) * d, seed + 100 + 7 * l + h, 1.0f + h),
                {}};
            for (float& x : k.data) x += 0.3f;  // not centred, so centroids matter
            a.layers[l].keys.push_back(k);
            a.layers[l].values.push_back(k);
            a.layers[l].queries.push_back(q);
        }
    return a;
}

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
    const std::string here = __FILE__;  // <repo>/tests/test_calibration.cpp
    return here.substr(0, here.size() - std::string("tests/test_calibration.cpp").size());
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
