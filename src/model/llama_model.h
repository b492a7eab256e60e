// Llama-family transformer on the CPU, straight from a GGUF file (weights stay memory-mapped in
// their quantized formats; see model/matmul.h for the products).
//
// Conventions (ggml docs/gguf.md "LLaMA" and "Standardized tensor names"; llama.cpp
// src/llama-model.cpp, LLM_ARCH_LLAMA):
//   token_embd -> per block: attn_norm (RMSNorm), attn_q / attn_k / attn_v, RoPE, causal
//   grouped-query attention through the layer's KVCache, attn_output, residual; ffn_norm,
//   SwiGLU ffn_down(silu(ffn_gate x) * ffn_up x), residual -> output_norm -> output (or the tied
//   token_embd when output.weight is absent).
//   RoPE is the "normal" (GPT-J) rotation of adjacent pairs (x[2i], x[2i+1]) by pos * theta_i,
//   theta_i = base^(-2i / rope_dim), because the GGUF converter permutes the Q/K rows of llama
//   models (llama.cpp llama_model_rope_type: LLAMA_ROPE_TYPE_NORM).
//   RMSNorm: x / sqrt(mean(x^2) + eps) * weight.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "model/gguf.h"
#include "model/matmul.h"
#include "veloxquant/cache.h"
#include "veloxquant/config.h"
#include "veloxquant/factory.h"

namespace veloxquant {

/// Hyper-parameters from the llama.* metadata keys.
struct LlamaHParams {
    int n_layer = 0;                  ///< llama.block_count
    int n_embd = 0;                   ///< llama.embedding_length
    int n_head = 0;                   ///< llama.attention.head_count
    int n_head_kv = 0;                ///< llama.attention.head_count_kv (default: n_head)
    int head_dim = 0;                 ///< llama.attention.key_length (default: n_embd / n_head)
    int n_ff = 0;                     ///< llama.feed_forward_length
    int n_vocab = 0;                  ///< llama.vocab_size (default: rows of token_embd)
    int n_ctx_train = 0;              ///< llama.context_length
    int rope_dim = 0;                 ///< llama.rope.dimension_count (default: head_dim)
    float rope_freq_base = 10000.0f;  ///< llama.rope.freq_base (llama.cpp's default)
    float rope_freq_scale = 1.0f;     ///< 1 / llama.rope.scaling.factor for "linear" scaling
    float rms_eps = 0.0f;             ///< llama.attention.layer_norm_rms_epsilon
    bool tied_embeddings = false;     ///< no output.weight: token_embd is the output head
};

class LlamaModel {
public:
    /// Opens the GGUF file, reads and checks the hyper-parameters and every weight's shape and
    /// type. Throws std::runtime_error naming the file and the problem: an architecture other
    /// than "llama", a missing or malformed key, a missing tensor, a wrong shape, an unsupported
    /// tensor type or feature (MoE, RoPE scaling other than linear, attention biases).
    static std::unique_ptr<LlamaModel> load(const std::string& gguf_path);
    LlamaModel(const LlamaModel&) = delete;
    LlamaModel& operator=(const LlamaModel&) = delete;

    const LlamaHParams& hparams() const { return hp_; }
    /// One entry per layer: n_head_kv KV heads of head_dim.
    ModelShape cache_shape() const;
    /// One cache per layer (KVCacheBuilder::build over cache_shape()).
    std::vector<std::unique_ptr<KVCache>> make_caches(const KVCacheConfig& config,
                                                      int max_seq_len) const;

    /// Runs n tokens at positions caches[0]->size() .. + n - 1: appends their keys and values to
    /// the caches (one per layer) and attends through them causally. Writes logits
    /// [n][n_vocab] when all_logits, else only the last token's [n_vocab]. Prompts are processed
    /// in chunks so scratch memory stays bounded. Throws std::invalid_argument (bad tokens,
    /// caches of the wrong count or shape, unequal cache sizes) or std::length_error (capacity)
    /// before touching any cache; if a cache throws midway, every cache is trimmed back to its
    /// size at entry. Calls on one model are serialised (scratch buffers are shared).
    void forward(const int32_t* tokens, int n, std::vector<std::unique_ptr<KVCache>>& caches,
                 float* logits, bool all_logits) const;

    /// Bytes of the weights the forward pass reads (quantized, as stored in the file).
    std::size_t weight_bytes() const { return weight_bytes_; }
    const GGUFFile& gguf() const { return *file_; }

    /// Tokens per chunk of a long forward() call.
    static constexpr int kChunk = 128;

private:
    struct Layer {
        std::vector<float> attn_norm, ffn_norm;
        QMatrix wq, wk, wv, wo, w_gate, w_up, w_down;
    };
    // Activations of one chunk, reused across calls: token-major [n][...] unless noted.
    struct Scratch {
        std::vector<float> x, xn, q, k, v, tmp, gate, up;
        std::vector<float> qh, kh, vh, att;  // head-major [heads][n][head_dim]
        std::vector<float> rope_cs;          // [n][rope_dim / 2] (cos, sin) pairs
    };

    LlamaModel() = default;
    // One chunk through every layer; leaves the final normalised hidden states in scratch.
    void run_chunk(const int32_t* tokens, int n, int pos0,
                   std::vector<std::unique_ptr<KVCache>>& caches) const;
    void embed(const int32_t* tokens, int n, float* x) const;
    void rope_table(int n, int pos0) const;
    void rope(float* v, int n, int n_heads) const;

    std::unique_ptr<GGUFFile> file_;
    LlamaHParams hp_;
    QMatrix tok_embd_, output_;
    std::vector<float> output_norm_;
    std::vector<Layer> layers_;
    std::vector<double> inv_freq_;  // theta_i = rope_freq_scale * base^(-2i / rope_dim)
    std::size_t weight_bytes_ = 0;
    mutable std::mutex mutex_;
    mutable Scratch scratch_;
};

}  // namespace veloxquant
