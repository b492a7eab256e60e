// Writes the fuzz targets' seed inputs: small valid files of every kind the loaders read.
//   make_fuzz_seeds DIR   ->  DIR/cache/*.bin, DIR/calibration/*.bin, DIR/gguf/*.gguf,
//                             DIR/tokenizer/*.txt, DIR/cache_ops/*.bin
// ctest writes them into the build tree before it replays them (tests/fuzz/CMakeLists.txt).
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "byte_vocab.h"
#include "calibration/activations.h"
#include "calibration/calibrate.h"
#include "core/binary_io.h"
#include "core/half.h"
#include "model/gguf_writer.h"
#include "veloxquant/calibration.h"
#include "veloxquant/veloxquant.h"

namespace fs = std::filesystem;
using namespace veloxquant;

namespace {

constexpr int kLayers = 2, kHeads = 2, kDim = 16, kRows = 256;

std::vector<float> gaussian(std::size_t n, uint32_t seed, float scale) {
    std::mt19937 gen(seed);
    std::normal_distribution<float> dist(0.0f, scale);
    std::vector<float> v(n);
    for (float& x : v) x = dist(gen);
    return v;
}

// Keys, values and queries of kLayers x kHeads heads, heads of different scales, with the
// positions and RoPE frequencies that commvq calibrates against.
Activations activations() {
    Activations a;
    for (int i = 0; i < kDim / 2; ++i)
        a.rope.inv_freq.push_back(std::pow(10000.0, -2.0 * i / kDim));
    std::vector<int32_t> positions(kRows);
    for (int i = 0; i < kRows; ++i) positions[i] = i;
    a.layers.resize(kLayers);
    for (int l = 0; l < kLayers; ++l)
        for (int h = 0; h < kHeads; ++h) {
            const uint32_t s = 100 * l + 10 * h;
            const float scale = 0.5f + l + 0.7f * h;
            a.layers[l].keys.push_back({kDim, gaussian(kRows * kDim, s + 1, scale), positions});
            a.layers[l].values.push_back({kDim, gaussian(kRows * kDim, s + 2, 1.0f), positions});
            a.layers[l].queries.push_back({kDim, gaussian(kRows * kDim, s + 3, 1.0f), positions});
        }
    return a;
}

KVCacheConfig config_of(const std::string& method) {
    KVCacheConfig c;
    c.method = method;
    c.bits = method == "qjl" || method == "commvq" || method == "vecinfer" ? 1 : 2;
    c.num_clusters = 4;
    c.sketch_dim = 16;
    return c;
}

void fill_cache(KVCache& cache, int tokens, uint32_t seed) {
    const auto k = gaussian(static_cast<std::size_t>(kHeads) * tokens * kDim, seed, 1.0f);
    const auto v = gaussian(k.size(), seed + 1, 1.0f);
    cache.append(k.data(), v.data(), tokens);
}

void write_cache_seeds(const fs::path& dir, const Calibration& cal) {
    for (const std::string& method : known_methods()) {
        KVCacheConfig c = config_of(method);
        if (needs_calibration(method)) apply_calibration(cal, c);
        auto cache = KVCacheFactory::create(c, kHeads, kDim, 48, 1);
        fill_cache(*cache, 20, 1);
        cache->save((dir / (method + ".bin")).string());
    }
    KVCacheConfig outliers = config_of("turboquant_rvq");
    outliers.outlier_observer = std::make_shared<KeyNormObserver>(1.0, 4);
    auto with_outliers = KVCacheFactory::create(outliers, kHeads, kDim, 48);
    fill_cache(*with_outliers, 30, 2);
    with_outliers->save((dir / "turboquant_rvq_outliers.bin").string());
    auto inner = KVCacheFactory::create(config_of("polarquant"), kHeads, kDim, 96);
    SlidingWindowKVCache window(
        std::unique_ptr<QuantizedKVCache>(static_cast<QuantizedKVCache*>(inner.release())), 20, 2);
    fill_cache(window, 60, 3);
    window.save((dir / "sliding_window.bin").string());
}

Calibration calibration(const Activations& acts) {
    Calibration cal;
    cal.model.architecture = "llama";
    cal.model.name = "fuzz seed";
    cal.model.shape.layers.assign(kLayers, {kHeads, kDim});
    cal.model.tensor_hash = 0x5eed;
    for (const std::string& method : calibrated_methods())
        calibrate_method(acts, config_of(method), cal);
    return cal;
}

// A llama of 1 layer, n_embd 32, 2 heads of 16, 1 KV head, ffn 48, a vocabulary of the 256
// byte tokens, a merge and a control token; F32 and F16 tensors.
void write_gguf_seed(const fs::path& path) {
    constexpr int kEmbd = 32, kFF = 48;
    GGUFWriter w;
    w.add_string("general.architecture", "llama");
    w.add_string("general.name", "fuzz seed");
    w.add_u32("llama.block_count", 1);
    w.add_u32("llama.context_length", 64);
    w.add_u32("llama.embedding_length", kEmbd);
    w.add_u32("llama.feed_forward_length", kFF);
    w.add_u32("llama.attention.head_count", 2);
    w.add_u32("llama.attention.head_count_kv", 1);
    w.add_f32("llama.rope.freq_base", 10000.0f);
    w.add_f32("llama.attention.layer_norm_rms_epsilon", 1e-5f);
    const BPETokenizer::Vocab vocab = vqfuzz::byte_vocab();
    const int kVocab = static_cast<int>(vocab.tokens.size());
    w.add_string("tokenizer.ggml.model", "gpt2");
    w.add_string("tokenizer.ggml.pre", vocab.pre);
    w.add_string_array("tokenizer.ggml.tokens", vocab.tokens);
    w.add_i32_array("tokenizer.ggml.token_type", vocab.token_types);
    w.add_string_array("tokenizer.ggml.merges", vocab.merges);
    w.add_u32("tokenizer.ggml.bos_token_id", vocab.bos_id);
    w.add_u32("tokenizer.ggml.eos_token_id", vocab.eos_id);
    uint32_t seed = 1;
    auto f32 = [&](const std::string& name, int rows, int cols, float scale, float mean) {
        std::vector<float> x = gaussian(static_cast<std::size_t>(rows) * cols, seed++, scale);
        for (float& v : x) v += mean;
        const std::vector<int64_t> dims =
            rows == 1 ? std::vector<int64_t>{cols} : std::vector<int64_t>{cols, rows};
        w.add_tensor(name, dims, x);
    };
    auto f16 = [&](const std::string& name, int rows, int cols, float scale) {
        std::vector<uint16_t> h;
        for (float v : gaussian(static_cast<std::size_t>(rows) * cols, seed++, scale))
            h.push_back(float_to_half(v));
        w.add_tensor(name, {cols, rows}, GGMLType::F16, h.data(), h.size() * 2);
    };
    f16("token_embd.weight", kVocab, kEmbd, 1.0f);
    f32("output_norm.weight", 1, kEmbd, 0.1f, 1.0f);
    f32("blk.0.attn_norm.weight", 1, kEmbd, 0.1f, 1.0f);
    f16("blk.0.attn_q.weight", kEmbd, kEmbd, 0.2f);
    f32("blk.0.attn_k.weight", 16, kEmbd, 0.2f, 0.0f);
    f32("blk.0.attn_v.weight", 16, kEmbd, 0.2f, 0.0f);
    f16("blk.0.attn_output.weight", kEmbd, kEmbd, 0.2f);
    f32("blk.0.ffn_norm.weight", 1, kEmbd, 0.1f, 1.0f);
    f16("blk.0.ffn_gate.weight", kFF, kEmbd, 0.2f);
    f16("blk.0.ffn_up.weight", kFF, kEmbd, 0.2f);
    f32("blk.0.ffn_down.weight", kEmbd, kFF, 0.15f, 0.0f);
    w.write(path.string());
}

// Texts for the tokenizer: prose, digits, a control token's text, multi-byte and invalid UTF-8.
void write_text_seeds(const fs::path& dir) {
    const std::vector<std::string> texts = {
        "The capital of France is Paris. It's 2026, and we've 12,345 tokens!",
        "<|im_start|>user\nhello there<|im_end|>\n", "  leading   spaces\n\n\ttabs and trailing  ",
        "na\xc3\xafve caf\xc3\xa9 \xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e \xf0\x9f\x98\x80 "
        "\xd9\xa3\xd9\xa4",
        "broken \xff\xfe\xc3 utf-8 \xe6\x97 here\x80"};
    for (std::size_t i = 0; i < texts.size(); ++i)
        write_file_atomic((dir / ("text" + std::to_string(i) + ".txt")).string(), texts[i]);
}

// Call sequences for fuzz_cache_ops (its byte format is in that file): each uncalibrated method,
// with the outlier store at odd indices, then one behind a sliding window of 20 (2 sinks).
void write_ops_seeds(const fs::path& dir) {
    const std::vector<uint8_t> calls = {0, 40, 0, 2, 1,  0, 3, 5, 20, 4, 1, 10,
                                        0, 65, 1, 0, 50, 0, 2, 3, 1,  4, 5, 0};
    for (uint8_t m = 0; m < 6; ++m) {
        std::vector<uint8_t> seed = {m, static_cast<uint8_t>(m % 2), 1, 99};
        seed.insert(seed.end(), calls.begin(), calls.end());
        write_file_atomic((dir / ("method" + std::to_string(m) + ".bin")).string(),
                          std::string(seed.begin(), seed.end()));
    }
    std::vector<uint8_t> windowed = {2, 0x80, 0, 99, 12, 2};
    windowed.insert(windowed.end(), calls.begin(), calls.end());
    write_file_atomic((dir / "sliding_window.bin").string(),
                      std::string(windowed.begin(), windowed.end()));
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: make_fuzz_seeds DIR\n");
        return 2;
    }
    const fs::path root(argv[1]);
    for (const char* sub : {"cache", "calibration", "gguf", "tokenizer", "cache_ops"})
        fs::create_directories(root / sub);
    const Calibration cal = calibration(activations());
    cal.save((root / "calibration" / "all_sections.bin").string());
    write_cache_seeds(root / "cache", cal);
    write_gguf_seed(root / "gguf" / "tiny_llama.gguf");
    write_text_seeds(root / "tokenizer");
    write_ops_seeds(root / "cache_ops");
    std::printf("seeds written under %s\n", root.c_str());
    return 0;
}
