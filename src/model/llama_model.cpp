// Loading: hyper-parameters from the llama.* metadata (ggml docs/gguf.md "LLaMA"; defaults as
// llama.cpp src/llama-model.cpp llm_load_hparams) and the weights' shapes and types.
#include "model/llama_model.h"

#include <cmath>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>

#include "model/dequant.h"

namespace veloxquant {
namespace {

// Reads and checks one file's metadata and tensors, naming the file in every error.
class Loader {
public:
    Loader(const GGUFFile& file, const std::string& path) : file_(file), path_(path) {}

    [[noreturn]] void fail(const std::string& msg) const {
        throw std::runtime_error("llama: " + path_ + ": " + msg);
    }

    // An integer key in [1, 2^30], or `fallback` when absent (required when no fallback).
    int count(const std::string& key, std::optional<int> fallback = std::nullopt) const {
        if (!file_.has(key)) {
            if (fallback) return *fallback;
            fail("missing metadata key '" + key + "'");
        }
        if (file_.value_type(key) == GGUFValueType::ARRAY)
            fail("'" + key + "' is an array; per-layer values are not supported");
        int64_t v = 0;
        try {
            v = file_.get_int(key);
        } catch (const std::exception& e) {
            fail(e.what());
        }
        if (v < 1 || v > (int64_t{1} << 30))
            fail("'" + key + "' = " + std::to_string(v) + " is out of range");
        return static_cast<int>(v);
    }

    // A finite positive float key, or `fallback` when absent (required when no fallback).
    float positive(const std::string& key, std::optional<float> fallback = std::nullopt) const {
        if (!file_.has(key)) {
            if (fallback) return *fallback;
            fail("missing metadata key '" + key + "'");
        }
        double v = 0.0;
        try {
            v = file_.get_float(key);
        } catch (const std::exception& e) {
            fail(e.what());
        }
        if (!std::isfinite(v) || v <= 0.0 || v > std::numeric_limits<float>::max())
            fail("'" + key + "' = " + std::to_string(v) + " must be finite and positive");
        return static_cast<float>(v);
    }

    // A string key, or `fallback` when absent (required when no fallback).
    std::string string(const std::string& key,
                       std::optional<std::string> fallback = std::nullopt) const {
        if (!file_.has(key)) {
            if (fallback) return *fallback;
            fail("missing metadata key '" + key + "'");
        }
        try {
            return file_.get_string(key);
        } catch (const std::exception& e) {
            fail(e.what());
        }
    }

    const GGUFTensor& tensor(const std::string& name, std::vector<int64_t> dims) const {
        const GGUFTensor* t = file_.find_tensor(name);
        if (t == nullptr) fail("missing tensor '" + name + "'");
        if (t->dims != dims)
            fail("tensor '" + name + "' has shape " + shape(t->dims) + ", expected " + shape(dims));
        bytes_ += t->nbytes;
        return *t;
    }

    // A [rows][cols] weight matrix (GGUF dims {cols, rows}).
    QMatrix matrix(const std::string& name, int64_t cols, int64_t rows) const {
        const GGUFTensor& t = tensor(name, {cols, rows});
        try {
            return QMatrix::from_tensor(t);
        } catch (const std::exception& e) {
            fail(e.what());
        }
    }

    // A norm weight of n elements, dequantized.
    std::vector<float> vector(const std::string& name, int64_t n) const {
        const GGUFTensor& t = tensor(name, {n});
        if (!ggml_can_dequantize(t.type))
            fail("tensor '" + name + "' has unsupported type " + ggml_type_name(t.type));
        std::vector<float> v(static_cast<std::size_t>(n));
        dequantize_row(t.type, t.data, v.data(), n);
        return v;
    }

    /// Bytes of every tensor fetched so far.
    std::size_t bytes() const { return bytes_; }

private:
    static std::string shape(const std::vector<int64_t>& dims) {
        std::string s = "[";
        for (std::size_t i = 0; i < dims.size(); ++i)
            s += (i ? ", " : "") + std::to_string(dims[i]);
        return s + "]";
    }

    const GGUFFile& file_;
    std::string path_;
    mutable std::size_t bytes_ = 0;
};

bool ends_with(const std::string& s, const std::string& suffix) {
    return s.size() >= suffix.size() &&
           s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

LlamaHParams read_hparams(const GGUFFile& f, const Loader& ld) {
    const std::string arch = ld.string("general.architecture");
    if (arch != "llama") ld.fail("unsupported architecture '" + arch + "' (only 'llama')");

    LlamaHParams hp;
    hp.n_layer = ld.count("llama.block_count");
    hp.n_embd = ld.count("llama.embedding_length");
    hp.n_ff = ld.count("llama.feed_forward_length");
    hp.n_head = ld.count("llama.attention.head_count");
    hp.n_head_kv = ld.count("llama.attention.head_count_kv", hp.n_head);
    hp.n_ctx_train = ld.count("llama.context_length");
    if (hp.n_head % hp.n_head_kv != 0) {
        ld.fail("head_count " + std::to_string(hp.n_head) + " is not a multiple of head_count_kv " +
                std::to_string(hp.n_head_kv));
    }
    if (!f.has("llama.attention.key_length") && hp.n_embd % hp.n_head != 0)
        ld.fail("embedding_length is not a multiple of head_count and key_length is absent");
    hp.head_dim = ld.count("llama.attention.key_length", hp.n_embd / hp.n_head);
    if (ld.count("llama.attention.value_length", hp.head_dim) != hp.head_dim)
        ld.fail("value_length differs from key_length, which is not supported");
    hp.rope_dim = ld.count("llama.rope.dimension_count", hp.head_dim);
    if (hp.rope_dim % 2 != 0 || hp.rope_dim > hp.head_dim) {
        ld.fail("rope.dimension_count " + std::to_string(hp.rope_dim) +
                " must be even and at most the head dimension " + std::to_string(hp.head_dim));
    }
    hp.rope_freq_base = ld.positive("llama.rope.freq_base", 10000.0f);
    hp.rms_eps = ld.positive("llama.attention.layer_norm_rms_epsilon");

    // RoPE scaling: only linear position interpolation (llama.cpp LLAMA_ROPE_SCALING_TYPE_LINEAR:
    // freq_scale = 1 / factor); the older key llama.rope.scale_linear means the same.
    const std::string scaling = ld.string("llama.rope.scaling.type", "none");
    if (scaling == "linear") {
        hp.rope_freq_scale = 1.0f / ld.positive("llama.rope.scaling.factor");
    } else if (scaling != "none") {
        ld.fail("RoPE scaling type '" + scaling + "' is not supported (only none and linear)");
    }
    if (f.has("llama.rope.scale_linear"))
        hp.rope_freq_scale = 1.0f / ld.positive("llama.rope.scale_linear");
    if (f.has("llama.expert_count") && f.get_int("llama.expert_count") > 0)
        ld.fail("mixture-of-experts models (llama.expert_count > 0) are not supported");
    return hp;
}

}  // namespace

std::unique_ptr<LlamaModel> LlamaModel::load(const std::string& gguf_path) {
    std::unique_ptr<LlamaModel> m(new LlamaModel());
    m->file_ = GGUFFile::open(gguf_path);
    const GGUFFile& f = *m->file_;
    const Loader ld(f, gguf_path);
    LlamaHParams& hp = m->hp_;
    hp = read_hparams(f, ld);

    for (const GGUFTensor& t : f.tensors()) {
        if (t.name == "rope_freqs.weight")
            ld.fail("per-frequency RoPE factors (rope_freqs.weight) are not supported");
        if (t.name.rfind("blk.", 0) == 0 && ends_with(t.name, ".bias"))
            ld.fail("bias tensors such as '" + t.name + "' are not supported");
    }
    const GGUFTensor* embd = f.find_tensor("token_embd.weight");
    if (embd == nullptr) ld.fail("missing tensor 'token_embd.weight'");
    if (embd->dims.size() != 2) ld.fail("tensor 'token_embd.weight' is not 2-D");
    if (embd->dims[1] < 1 || embd->dims[1] > (int64_t{1} << 30)) ld.fail("bad vocabulary size");
    hp.n_vocab = ld.count("llama.vocab_size", static_cast<int>(embd->dims[1]));

    const int64_t E = hp.n_embd, Q = int64_t{hp.n_head} * hp.head_dim;
    const int64_t KV = int64_t{hp.n_head_kv} * hp.head_dim, F = hp.n_ff;
    m->tok_embd_ = ld.matrix("token_embd.weight", E, hp.n_vocab);
    hp.tied_embeddings = f.find_tensor("output.weight") == nullptr;
    m->output_ = hp.tied_embeddings ? m->tok_embd_ : ld.matrix("output.weight", E, hp.n_vocab);
    m->output_norm_ = ld.vector("output_norm.weight", E);

    // Nine tensors a block: a block count the file cannot hold fails before it sizes anything.
    if (static_cast<std::size_t>(hp.n_layer) > f.tensors().size() / 9)
        ld.fail("block_count " + std::to_string(hp.n_layer) + " needs " +
                std::to_string(9 * static_cast<int64_t>(hp.n_layer)) +
                " block tensors; the file holds " + std::to_string(f.tensors().size()) +
                " tensors");
    m->layers_.resize(hp.n_layer);
    for (int l = 0; l < hp.n_layer; ++l) {
        const std::string p = "blk." + std::to_string(l) + ".";
        Layer& L = m->layers_[l];
        L.attn_norm = ld.vector(p + "attn_norm.weight", E);
        L.ffn_norm = ld.vector(p + "ffn_norm.weight", E);
        L.wq = ld.matrix(p + "attn_q.weight", E, Q);
        L.wk = ld.matrix(p + "attn_k.weight", E, KV);
        L.wv = ld.matrix(p + "attn_v.weight", E, KV);
        L.wo = ld.matrix(p + "attn_output.weight", Q, E);
        L.w_gate = ld.matrix(p + "ffn_gate.weight", E, F);
        L.w_up = ld.matrix(p + "ffn_up.weight", E, F);
        L.w_down = ld.matrix(p + "ffn_down.weight", F, E);
    }
    m->weight_bytes_ = ld.bytes();

    m->inv_freq_.resize(hp.rope_dim / 2);
    for (int i = 0; i < hp.rope_dim / 2; ++i) {
        m->inv_freq_[i] = hp.rope_freq_scale *
                          std::pow(static_cast<double>(hp.rope_freq_base), -2.0 * i / hp.rope_dim);
    }
    return m;
}

ModelShape LlamaModel::cache_shape() const {
    ModelShape shape;
    shape.layers.assign(hp_.n_layer, ModelShape::Layer{hp_.n_head_kv, hp_.head_dim});
    return shape;
}

std::vector<std::unique_ptr<KVCache>> LlamaModel::make_caches(const KVCacheConfig& config,
                                                              int max_seq_len) const {
    return KVCacheBuilder::build(cache_shape(), config, max_seq_len);
}

}  // namespace veloxquant
