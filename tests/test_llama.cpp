// Llama forward pass (its matmul: test_llama_matmul.cpp). A tiny random-weight model is written
// with GGUFWriter (weights quantized by the test's own Q8_0 / Q4_1 / F16 quantizers) and its logits
// are checked against a naive double-precision forward pass written here from the conventions
// (RMSNorm, adjacent-pair RoPE, grouped-query causal softmax attention, SwiGLU), independent of
// src/model.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/half.h"
#include "llama_test_helpers.h"
#include "model/gguf.h"
#include "model/gguf_writer.h"
#include "model/llama_model.h"
#include "model/tokenizer.h"
#include "test_helpers.h"

using namespace veloxquant;
using namespace llamatest;

namespace {

// ---- The tiny model: 2 layers, n_embd 64, 4 heads, 2 KV heads, head_dim 16, ffn 96, vocab 50.

struct TinySpec {
    bool tied = false;
    int rope_dim = 16;
    std::string arch = "llama";
    std::string omit_tensor;                     // leave this tensor out of the file
    std::string omit_key;                        // leave this metadata key out
    std::map<std::string, std::string> strings;  // extra string metadata
    float linear_rope_factor = 0.0f;             // > 0: llama.rope.scaling.type "linear"
    uint32_t block_count = 0;                    // > 0: llama.block_count says this instead
};

struct TinyWeights {
    static constexpr int kLayers = 2, kEmbd = 64, kHeads = 4, kKVHeads = 2, kHeadDim = 16, kFF = 96,
                         kVocab = 50;
    static constexpr float kBase = 10000.0f, kEps = 1e-5f;
    int rope_dim = 16;
    double position_scale = 1.0;  // linear RoPE scaling divides positions by the factor
    Matrix embd, output, output_norm;
    struct Layer {
        Matrix attn_norm, ffn_norm, q, k, v, o, gate, up, down;
    };
    std::vector<Layer> layers;
};

// A GGUF file under the test temp dir, removed when the object dies.
class TinyModelFile {
public:
    explicit TinyModelFile(const TinySpec& spec, uint32_t seed = 7) {
        path_ = vqtest::unique_temp_path("llama.gguf");
        build(spec, seed);
    }
    ~TinyModelFile() { std::remove(path_.c_str()); }
    const std::string& path() const { return path_; }
    const TinyWeights& weights() const { return w_; }

private:
    void build(const TinySpec& spec, uint32_t seed) {
        using W = TinyWeights;
        std::mt19937 gen(seed);
        GGUFWriter gw;
        auto key = [&](const std::string& k) { return k != spec.omit_key; };
        if (key("general.architecture")) gw.add_string("general.architecture", spec.arch);
        const std::string a = spec.arch + ".";
        if (key(a + "block_count"))
            gw.add_u32(a + "block_count", spec.block_count > 0 ? spec.block_count : W::kLayers);
        if (key(a + "context_length")) gw.add_u32(a + "context_length", 2048);
        if (key(a + "embedding_length")) gw.add_u32(a + "embedding_length", W::kEmbd);
        if (key(a + "feed_forward_length")) gw.add_u32(a + "feed_forward_length", W::kFF);
        if (key(a + "attention.head_count")) gw.add_u32(a + "attention.head_count", W::kHeads);
        gw.add_u32(a + "attention.head_count_kv", W::kKVHeads);
        gw.add_u32(a + "rope.dimension_count", spec.rope_dim);
        gw.add_f32(a + "rope.freq_base", W::kBase);
        if (key(a + "attention.layer_norm_rms_epsilon"))
            gw.add_f32(a + "attention.layer_norm_rms_epsilon", W::kEps);
        for (const auto& [k, v] : spec.strings) gw.add_string(k, v);
        if (spec.linear_rope_factor > 0.0f) {
            gw.add_string(a + "rope.scaling.type", "linear");
            gw.add_f32(a + "rope.scaling.factor", spec.linear_rope_factor);
            w_.position_scale = 1.0 / spec.linear_rope_factor;
        }
        w_.rope_dim = spec.rope_dim;

        auto add = [&](const std::string& name, GGMLType type, int rows, int cols, float scale,
                       float mean = 0.0f) {
            const Quantized q =
                quantize(type, randn(static_cast<std::size_t>(rows) * cols, gen, scale, mean));
            if (name == spec.omit_tensor) return q.values;
            const std::vector<int64_t> dims =
                rows == 1 ? std::vector<int64_t>{cols} : std::vector<int64_t>{cols, rows};
            gw.add_tensor(name, dims, type, q.bytes);
            return q.values;
        };
        const float e = 1.0f / std::sqrt(static_cast<float>(W::kEmbd));
        const float f = 1.0f / std::sqrt(static_cast<float>(W::kFF));
        w_.embd = add("token_embd.weight", GGMLType::Q8_0, W::kVocab, W::kEmbd, 1.0f);
        w_.output_norm = add("output_norm.weight", GGMLType::F32, 1, W::kEmbd, 0.1f, 1.0f);
        w_.output =
            spec.tied ? w_.embd : add("output.weight", GGMLType::F16, W::kVocab, W::kEmbd, 2 * e);
        for (int l = 0; l < W::kLayers; ++l) {
            const std::string p = "blk." + std::to_string(l) + ".";
            TinyWeights::Layer L;
            L.attn_norm = add(p + "attn_norm.weight", GGMLType::F32, 1, W::kEmbd, 0.1f, 1.0f);
            L.q =
                add(p + "attn_q.weight", GGMLType::Q4_1, W::kHeads * W::kHeadDim, W::kEmbd, 2 * e);
            L.k = add(p + "attn_k.weight", GGMLType::Q8_0, W::kKVHeads * W::kHeadDim, W::kEmbd,
                      2 * e);
            L.v = add(p + "attn_v.weight", GGMLType::F32, W::kKVHeads * W::kHeadDim, W::kEmbd, e);
            L.o =
                add(p + "attn_output.weight", GGMLType::Q4_1, W::kEmbd, W::kHeads * W::kHeadDim, e);
            L.ffn_norm = add(p + "ffn_norm.weight", GGMLType::F32, 1, W::kEmbd, 0.1f, 1.0f);
            L.gate = add(p + "ffn_gate.weight", GGMLType::Q8_0, W::kFF, W::kEmbd, e);
            L.up = add(p + "ffn_up.weight", GGMLType::Q4_1, W::kFF, W::kEmbd, e);
            L.down = add(p + "ffn_down.weight", GGMLType::Q8_0, W::kEmbd, W::kFF, f);
            w_.layers.push_back(std::move(L));
        }
        gw.write(path_);
    }

    std::string path_;
    TinyWeights w_;
};

// ---- Naive reference forward pass, in double: logits [T][vocab] for tokens at positions 0..T-1;
// with fp16_kv, keys and values are rounded to fp16 as the "fp16" cache stores them.

std::vector<double> mat_vec(const Matrix& w, int rows, int cols, const std::vector<double>& x) {
    std::vector<double> y(rows, 0.0);
    for (int r = 0; r < rows; ++r)
        for (int c = 0; c < cols; ++c) y[r] += static_cast<double>(w[r * cols + c]) * x[c];
    return y;
}

std::vector<double> rms(const std::vector<double>& x, const Matrix& w, double eps) {
    double ss = 0.0;
    for (double v : x) ss += v * v;
    const double s = 1.0 / std::sqrt(ss / x.size() + eps);
    std::vector<double> y(x.size());
    for (std::size_t i = 0; i < x.size(); ++i) y[i] = x[i] * s * w[i];
    return y;
}

// Adjacent pairs (2i, 2i + 1) of each head rotated by pos * base^(-2i / rope_dim).
void rotate(std::vector<double>& v, int heads, int d, int rope_dim, double pos, double base) {
    for (int h = 0; h < heads; ++h)
        for (int i = 0; i < rope_dim / 2; ++i) {
            const double a = pos * std::pow(base, -2.0 * i / rope_dim);
            double& x0 = v[h * d + 2 * i];
            double& x1 = v[h * d + 2 * i + 1];
            const double r0 = x0 * std::cos(a) - x1 * std::sin(a);
            const double r1 = x0 * std::sin(a) + x1 * std::cos(a);
            x0 = r0, x1 = r1;
        }
}

// The "fp16" cache stores keys and values as IEEE half.
std::vector<double> to_fp16(std::vector<double> v) {
    for (double& x : v) x = half_to_float(float_to_half(static_cast<float>(x)));
    return v;
}

std::vector<float> reference_logits(const TinyWeights& w, const std::vector<int32_t>& tokens,
                                    bool fp16_kv) {
    using W = TinyWeights;
    const int E = W::kEmbd, H = W::kHeads, Hkv = W::kKVHeads, D = W::kHeadDim, F = W::kFF;
    const int T = static_cast<int>(tokens.size());
    std::vector<std::vector<std::vector<double>>> keys(W::kLayers), values(W::kLayers);
    std::vector<float> logits;
    for (int pos = 0; pos < T; ++pos) {
        std::vector<double> x(w.embd.begin() + tokens[pos] * E,
                              w.embd.begin() + (tokens[pos] + 1) * E);
        for (int l = 0; l < W::kLayers; ++l) {
            const auto& L = w.layers[l];
            const auto xn = rms(x, L.attn_norm, W::kEps);
            auto q = mat_vec(L.q, H * D, E, xn);
            auto k = mat_vec(L.k, Hkv * D, E, xn);
            rotate(q, H, D, w.rope_dim, pos * w.position_scale, W::kBase);
            rotate(k, Hkv, D, w.rope_dim, pos * w.position_scale, W::kBase);
            auto v = mat_vec(L.v, Hkv * D, E, xn);
            keys[l].push_back(fp16_kv ? to_fp16(k) : k);
            values[l].push_back(fp16_kv ? to_fp16(v) : v);
            std::vector<double> att(H * D, 0.0);
            for (int h = 0; h < H; ++h) {
                const int kv = h / (H / Hkv);
                std::vector<double> s(pos + 1);
                double mx = -INFINITY, sum = 0.0;
                for (int t = 0; t <= pos; ++t) {
                    double dot = 0.0;
                    for (int j = 0; j < D; ++j) dot += q[h * D + j] * keys[l][t][kv * D + j];
                    s[t] = dot / std::sqrt(static_cast<double>(D));
                    mx = std::max(mx, s[t]);
                }
                for (int t = 0; t <= pos; ++t) sum += s[t] = std::exp(s[t] - mx);
                for (int t = 0; t <= pos; ++t)
                    for (int j = 0; j < D; ++j)
                        att[h * D + j] += s[t] / sum * values[l][t][kv * D + j];
            }
            const auto o = mat_vec(L.o, E, H * D, att);
            for (int i = 0; i < E; ++i) x[i] += o[i];
            const auto xf = rms(x, L.ffn_norm, W::kEps);
            const auto g = mat_vec(L.gate, F, E, xf), u = mat_vec(L.up, F, E, xf);
            std::vector<double> hdn(F);
            for (int i = 0; i < F; ++i) hdn[i] = g[i] / (1.0 + std::exp(-g[i])) * u[i];
            const auto down = mat_vec(L.down, E, F, hdn);
            for (int i = 0; i < E; ++i) x[i] += down[i];
        }
        const auto out = mat_vec(w.output, W::kVocab, E, rms(x, w.output_norm, W::kEps));
        logits.insert(logits.end(), out.begin(), out.end());
    }
    return logits;
}

// A float32 cache with exact attention (test_helpers.h), so that the forward pass can be checked
// without the rounding of a real cache's storage.
class ExactCache : public KVCache {
public:
    ExactCache(int heads, int d, int max_seq_len) : heads_(heads), d_(d), max_(max_seq_len) {
        config_.method = "fp16";
    }
    void append(const float* keys, const float* values, int n) override {
        for (int h = 0; h < heads_; ++h)
            for (int t = 0; t < n; ++t) {
                const std::size_t src = (static_cast<std::size_t>(h) * n + t) * d_;
                k_[h].insert(k_[h].end(), keys + src, keys + src + d_);
                v_[h].insert(v_[h].end(), values + src, values + src + d_);
            }
        size_ += n;
    }
    void attend(const float* queries, int num_q_heads, int n_queries, float* out, float scale,
                bool causal) const override {
        std::vector<float> k, v;
        for (int h = 0; h < heads_; ++h) {
            k.insert(k.end(), k_[h].begin(), k_[h].end());
            v.insert(v.end(), v_[h].begin(), v_[h].end());
        }
        const std::vector<float> q(
            queries, queries + static_cast<std::size_t>(num_q_heads) * n_queries * d_);
        const auto o = vqtest::reference_attention(q, num_q_heads, n_queries, k, v, heads_, size_,
                                                   d_, scale, causal);
        std::copy(o.begin(), o.end(), out);
    }
    void dequantize(int, int, float*, float*) const override { ADD_FAILURE() << "unused"; }
    int size() const override { return size_; }
    int max_seq_len() const override { return max_; }
    std::size_t nbytes() const override { return 0; }
    void trim(int n) override {
        for (int h = 0; h < heads_; ++h) {
            k_[h].resize(k_[h].size() - static_cast<std::size_t>(n) * d_);
            v_[h].resize(v_[h].size() - static_cast<std::size_t>(n) * d_);
        }
        size_ -= n;
    }
    void reset() override { trim(size_); }
    void save(const std::string&) const override { ADD_FAILURE() << "unused"; }
    int num_heads() const override { return heads_; }
    int head_dim() const override { return d_; }
    const KVCacheConfig& config() const override { return config_; }
    std::string class_name() const override { return "ExactCache"; }

private:
    int heads_, d_, max_, size_ = 0;
    std::vector<float> k_[TinyWeights::kKVHeads], v_[TinyWeights::kKVHeads];
    KVCacheConfig config_;
};

using Caches = std::vector<std::unique_ptr<KVCache>>;

Caches exact_caches(int max_seq_len) {
    Caches c;
    for (int l = 0; l < TinyWeights::kLayers; ++l)
        c.push_back(std::make_unique<ExactCache>(TinyWeights::kKVHeads, TinyWeights::kHeadDim,
                                                 max_seq_len));
    return c;
}

std::vector<int32_t> random_tokens(int n, uint32_t seed) {
    std::mt19937 gen(seed);
    std::vector<int32_t> t(n);
    for (auto& x : t) x = static_cast<int32_t>(gen() % TinyWeights::kVocab);
    return t;
}

KVCacheConfig fp16_config() {
    KVCacheConfig c;
    c.method = "fp16";
    return c;
}

// Logits of every token, fed in forward() calls of the given sizes.
std::vector<float> run_all(const LlamaModel& m, const std::vector<int32_t>& tokens,
                           const std::vector<int>& calls, bool exact = true) {
    Caches caches = exact ? exact_caches(1024) : m.make_caches(fp16_config(), 1024);
    const int V = m.hparams().n_vocab;
    std::vector<float> logits(tokens.size() * V);
    int at = 0;
    for (int n : calls) {
        m.forward(tokens.data() + at, n, caches, logits.data() + static_cast<std::size_t>(at) * V,
                  true);
        at += n;
    }
    EXPECT_EQ(at, static_cast<int>(tokens.size()));
    return logits;
}

}  // namespace

// ---- The tiny model against the reference.

TEST(LlamaTiny, MatchesNaiveReferenceAcrossChunks) {
    const TinyModelFile file(TinySpec{});
    const auto model = LlamaModel::load(file.path());
    // More tokens than LlamaModel::kChunk, so one call runs several internal chunks.
    const auto tokens = random_tokens(LlamaModel::kChunk + 45, 11);
    const auto ours = run_all(*model, tokens, {static_cast<int>(tokens.size())});
    EXPECT_LT(max_rel(ours, reference_logits(file.weights(), tokens, false)), 1e-4);
}

TEST(LlamaTiny, WithTheFp16CacheMatchesReferenceWithFp16KeysAndValues) {
    const TinyModelFile file(TinySpec{});
    const auto model = LlamaModel::load(file.path());
    const auto tokens = random_tokens(60, 15);
    const auto ours = run_all(*model, tokens, {60}, /*exact=*/false);
    // Looser: a key or value whose float and double values round to neighbouring halves moves
    // the logits by ~1e-4 (one fp16 ulp of one coordinate).
    EXPECT_LT(max_rel(ours, reference_logits(file.weights(), tokens, true)), 5e-4);
}

TEST(LlamaTiny, TiedEmbeddingsPartialRopeAndLinearScaling) {
    TinySpec spec;
    spec.tied = true;
    spec.rope_dim = 8;
    spec.linear_rope_factor = 4.0f;
    const TinyModelFile file(spec, 9);
    const auto model = LlamaModel::load(file.path());
    EXPECT_TRUE(model->hparams().tied_embeddings);
    EXPECT_EQ(model->hparams().rope_dim, 8);
    EXPECT_FLOAT_EQ(model->hparams().rope_freq_scale, 0.25f);
    const auto tokens = random_tokens(40, 12);
    EXPECT_LT(
        max_rel(run_all(*model, tokens, {40}), reference_logits(file.weights(), tokens, false)),
        1e-4);
}

TEST(LlamaTiny, HyperParametersAndShapes) {
    const TinyModelFile file(TinySpec{});
    const auto model = LlamaModel::load(file.path());
    const LlamaHParams& hp = model->hparams();
    EXPECT_EQ(hp.n_layer, 2);
    EXPECT_EQ(hp.n_embd, 64);
    EXPECT_EQ(hp.n_head, 4);
    EXPECT_EQ(hp.n_head_kv, 2);
    EXPECT_EQ(hp.head_dim, 16);
    EXPECT_EQ(hp.n_ff, 96);
    EXPECT_EQ(hp.n_vocab, 50);
    EXPECT_EQ(hp.n_ctx_train, 2048);
    EXPECT_FLOAT_EQ(hp.rope_freq_base, 10000.0f);
    EXPECT_FLOAT_EQ(hp.rms_eps, 1e-5f);
    EXPECT_FALSE(hp.tied_embeddings);
    std::size_t bytes = 0;
    for (const GGUFTensor& t : model->gguf().tensors()) bytes += t.nbytes;
    EXPECT_EQ(model->weight_bytes(), bytes);
    const ModelShape shape = model->cache_shape();
    ASSERT_EQ(shape.layers.size(), 2u);
    EXPECT_EQ(shape.layers[1].num_kv_heads, 2);
    EXPECT_EQ(shape.layers[1].head_dim, 16);
    const auto caches = model->make_caches(fp16_config(), 64);
    ASSERT_EQ(caches.size(), 2u);
    EXPECT_EQ(caches[0]->max_seq_len(), 64);
}

TEST(LlamaTiny, ChunkedPrefillEqualsOneShot) {
    const TinyModelFile file(TinySpec{});
    const auto model = LlamaModel::load(file.path());
    const auto tokens = random_tokens(40, 13);
    const auto one = run_all(*model, tokens, {40});
    EXPECT_LT(max_rel(run_all(*model, tokens, {5, 1, 13, 21}), one), 1e-5);
    EXPECT_LT(max_rel(run_all(*model, tokens, {3, 3, 3, 31}), one), 1e-5);
}

TEST(LlamaTiny, DecodingOneTokenAtATimeEqualsPrefill) {
    const TinyModelFile file(TinySpec{});
    const auto model = LlamaModel::load(file.path());
    const auto tokens = random_tokens(30, 14);
    const int V = model->hparams().n_vocab;
    const auto prefill = run_all(*model, tokens, {30});

    Caches caches = exact_caches(64);
    std::vector<float> last(V);
    model->forward(tokens.data(), 10, caches, last.data(), /*all_logits=*/false);
    EXPECT_LT(max_rel(last, {prefill.begin() + 9 * V, prefill.begin() + 10 * V}), 1e-5);
    for (int t = 10; t < 30; ++t) {
        model->forward(&tokens[t], 1, caches, last.data(), false);
        EXPECT_LT(max_rel(last, {prefill.begin() + t * V, prefill.begin() + (t + 1) * V}), 1e-5)
            << "position " << t;
    }
    EXPECT_EQ(caches[0]->size(), 30);
    EXPECT_EQ(caches[1]->size(), 30);
}

TEST(LlamaTiny, BadCallsThrowAndLeaveCachesUnchanged) {
    const TinyModelFile file(TinySpec{});
    const auto model = LlamaModel::load(file.path());
    auto caches = model->make_caches(fp16_config(), 8);
    std::vector<float> logits(8 * 50);
    const std::vector<int32_t> ok = {1, 2, 3}, bad = {1, 50, 3}, negative = {-1};
    model->forward(ok.data(), 3, caches, logits.data(), true);
    expect_error<std::invalid_argument>(
        [&] { model->forward(bad.data(), 3, caches, logits.data(), true); }, "vocabulary");
    expect_error<std::invalid_argument>(
        [&] { model->forward(negative.data(), 1, caches, logits.data(), true); }, "vocabulary");
    const std::vector<int32_t> six(6, 4);
    expect_error<std::length_error>(
        [&] { model->forward(six.data(), 6, caches, logits.data(), true); }, "capacity");
    EXPECT_EQ(caches[0]->size(), 3);
    EXPECT_EQ(caches[1]->size(), 3);

    auto one_layer = model->make_caches(fp16_config(), 8);
    one_layer.pop_back();
    expect_error<std::invalid_argument>(
        [&] { model->forward(ok.data(), 3, one_layer, logits.data(), true); }, "1 caches for 2");
    caches[1]->trim(1);
    expect_error<std::invalid_argument>(
        [&] { model->forward(ok.data(), 1, caches, logits.data(), true); }, "different numbers");
    ModelShape wrong;
    wrong.layers.assign(2, ModelShape::Layer{4, 16});
    auto wide = KVCacheBuilder::build(wrong, fp16_config(), 8);
    expect_error<std::invalid_argument>(
        [&] { model->forward(ok.data(), 3, wide, logits.data(), true); }, "heads");
}

TEST(LlamaTiny, LoadErrorsNameTheProblem) {
    auto load_error = [](const TinySpec& spec, const std::string& needle) {
        const TinyModelFile file(spec);
        expect_error<std::runtime_error>([&] { LlamaModel::load(file.path()); }, needle);
    };
    TinySpec spec;
    spec.omit_tensor = "blk.1.ffn_up.weight";
    load_error(spec, "missing tensor 'blk.1.ffn_up.weight'");
    spec = TinySpec{};
    spec.arch = "gpt2";
    load_error(spec, "unsupported architecture 'gpt2'");
    spec = TinySpec{};
    spec.omit_key = "llama.block_count";
    load_error(spec, "missing metadata key 'llama.block_count'");
    spec = TinySpec{};
    spec.omit_key = "llama.attention.layer_norm_rms_epsilon";
    load_error(spec, "layer_norm_rms_epsilon");
    spec = TinySpec{};
    spec.omit_key = "general.architecture";
    load_error(spec, "general.architecture");
    spec = TinySpec{};
    spec.strings["llama.rope.scaling.type"] = "yarn";
    load_error(spec, "RoPE scaling type 'yarn'");
    spec = TinySpec{};
    spec.rope_dim = 18;
    load_error(spec, "rope.dimension_count");
    // A block count the file cannot hold fails before it sizes anything (the GGUF fuzzer's
    // 150994944 blocks asked the allocator for 49 GB).
    spec = TinySpec{};
    spec.block_count = 1u << 29;
    load_error(spec, "block_count 536870912 needs 4831838208 block tensors; the file holds 21");
    expect_error<std::runtime_error>([] { LlamaModel::load("/nonexistent/model.gguf"); },
                                     "/nonexistent/model.gguf");
}

// ---- The real model, where present: greedy decoding answers a factual question.

namespace {

std::string source_root() {
    const std::string file = __FILE__;
    const std::size_t cut = file.rfind("tests/");
    return cut == std::string::npos || cut == 0 ? "." : file.substr(0, cut - 1);
}

std::string model_path() {
    const char* v = std::getenv("VQ_MODEL");
    return v != nullptr && *v != '\0' ? v
                                      : source_root() + "/models/SmolLM2-135M-Instruct.Q4_1.gguf";
}

}  // namespace

TEST(LlamaSmolLM2, GreedyAnswerNamesParis) {
    const std::string path = model_path();
    if (!std::ifstream(path)) GTEST_SKIP() << path << " not found (set VQ_MODEL)";
    const auto model = LlamaModel::load(path);
    const LlamaHParams& hp = model->hparams();
    EXPECT_EQ(hp.n_layer, 30);
    EXPECT_EQ(hp.n_head_kv, 3);
    EXPECT_EQ(hp.head_dim, 64);
    EXPECT_TRUE(hp.tied_embeddings);
    const BPETokenizer tok(vocab_from_gguf(model->gguf()));
    const auto prompt =
        tok.encode(tok.apply_chat_template({{"user", "What is the capital of France?"}}, true));
    auto caches = model->make_caches(fp16_config(), 256);
    std::vector<float> logits(hp.n_vocab);
    model->forward(prompt.data(), static_cast<int>(prompt.size()), caches, logits.data(), false);
    std::vector<int32_t> out;
    for (int i = 0; i < 20; ++i) {
        const int32_t next =
            static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
        if (tok.is_eog(next)) break;
        out.push_back(next);
        model->forward(&next, 1, caches, logits.data(), false);
    }
    const std::string text = tok.decode(out);
    EXPECT_NE(text.find("Paris"), std::string::npos) << text;
}
