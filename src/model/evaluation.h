// Quality, memory and speed of compressed caches on a real model, against the uncompressed
// ("fp16") cache on the same tokens.
//
// Quality follows llama.cpp's perplexity tool: the token stream is cut into chunks of `ctx`
// tokens; each chunk starts from empty caches, its first ctx - 1 tokens are fed through the
// model in sub-chunks of `batch` tokens (so prefill attention itself runs through the cache under
// test), and the tokens at positions [score_from, ctx) are scored from the logits one position
// earlier. The baseline runs once per chunk; every configuration runs over the same chunk, one
// sub-chunk after the baseline's, and is compared on the baseline's log-probabilities:
//   KL(baseline || config) = sum_v p_base(v) (log p_base(v) - log p_config(v)),
//   top-1 agreement = [argmax p_base == argmax p_config],
//   perplexity = exp(mean negative log-likelihood of the actual next token).
// Decode speed and needle-in-a-haystack retrieval complete the picture (end of this file).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "veloxquant/cache.h"
#include "veloxquant/config.h"

namespace veloxquant {

class BPETokenizer;
class LlamaModel;

/// Progress hook: called with the number of tokens just pushed through the model (a delta).
using TokenProgress = std::function<void(int64_t)>;

/// A cache configuration with the label it is reported under.
struct NamedConfig {
    std::string label;
    KVCacheConfig config;
};

/// The uncompressed baseline configuration ("fp16").
NamedConfig baseline_config();

/// The method and the settings that matter to it, e.g. "turboquant_rvq b=1 r=2 v=2",
/// "qjl m=192 v=3", "rabitq b=2 c=64 v=2 outliers8 unfused".
std::string config_label(const KVCacheConfig& config);

/// Methods the main comparison sweeps by default: all eight, in the seed's order.
inline const std::vector<std::string> kSweepMethods = {
    "turboquant_rvq", "vecinfer", "ratequant", "spectral", "rabitq", "qjl", "polarquant", "commvq"};
/// Bit widths the main comparison sweeps by default.
inline const std::vector<int> kSweepBits = {2, 3, 4};

/// The sweep of the main comparison: each method at its defaults (labelled "... (defaults)"),
/// then at each b in `bits` with value_bits = b (turboquant_rvq: one stage of b bits; qjl:
/// sketch_dim = b * head_dim; spectral: signal_bits = b + 1, noise_bits = b - 1; the others:
/// bits = b).
std::vector<NamedConfig> sweep_configs(const std::vector<std::string>& methods,
                                       const std::vector<int>& bits, int head_dim);

// ---------------------------------------------------------------------------------------------
// Next-token statistics.

/// out[i] = logits[i] - log(sum_j exp(logits[j])), computed stably; out may alias logits.
void log_softmax(const float* logits, int n, float* out);

/// Index of the largest element (the first on ties).
int32_t argmax(const float* x, int n);

/// One scored position: both inputs are log-probabilities over the vocabulary.
struct TokenComparison {
    double kld = 0.0;       ///< KL(base || other), in nats
    bool top1 = false;      ///< both argmaxes agree
    double nll_base = 0.0;  ///< -log p_base(target)
    double nll = 0.0;       ///< -log p_other(target)
};
TokenComparison compare_position(const float* base_logprobs, const float* logprobs, int n_vocab,
                                 int32_t target);

/// Running means over scored positions.
class QualityAccumulator {
public:
    void add(const TokenComparison& c);
    int64_t count() const { return n_; }
    double mean_kld() const;
    double top1() const;
    double ppl_base() const;
    double ppl() const;

private:
    int64_t n_ = 0;
    int64_t top1_ = 0;
    double kld_ = 0.0;
    double nll_base_ = 0.0;
    double nll_ = 0.0;
};

// ---------------------------------------------------------------------------------------------
// Chunking.

struct EvalOptions {
    int ctx = 2048;
    /// Tokens at positions [score_from, ctx) of each chunk are scored; -1 means ctx / 2.
    int score_from = -1;
    /// At most this many chunks; 0 means every whole chunk of the text.
    int max_chunks = 0;
    /// Prefill sub-chunk length.
    int batch = 256;

    int resolved_score_from() const { return score_from < 0 ? ctx / 2 : score_from; }
    int64_t scored_per_chunk() const { return ctx - resolved_score_from(); }
    /// Throws std::invalid_argument naming the field for ctx < 2, score_from outside [1, ctx),
    /// max_chunks < 0 or batch < 1.
    void validate() const;
};

/// Whole chunks of ctx tokens in a stream of n_tokens, capped by max_chunks.
int count_chunks(int64_t n_tokens, const EvalOptions& opts);

/// A sub-chunk [begin, end) of a chunk's positions; `logits` when its logits are scored.
struct PrefillSpan {
    int begin = 0;
    int end = 0;
    bool logits = false;
};
/// Covers the fed positions [0, ctx - 1) in spans of at most `batch`, split at score_from - 1
/// so that exactly the spans of [score_from - 1, ctx - 1) carry logits.
std::vector<PrefillSpan> prefill_spans(const EvalOptions& opts);

// ---------------------------------------------------------------------------------------------
// Memory.

struct CacheFootprint {
    int tokens = 0;                     ///< tokens held (caches[0]->size())
    std::size_t storage_bytes = 0;      ///< packed storage summed over layers, slack included
    std::size_t parameter_bytes = 0;    ///< codec parameters summed over layers
    double key_bits = 0.0;              ///< key bits per coordinate, every scalar counted
    double value_bits = 0.0;            ///< value bits per coordinate, every scalar counted
    double code_bytes_per_token = 0.0;  ///< (key_bits + value_bits) / 8 * coordinates

    /// storage_bytes / tokens (0 for empty caches).
    double bytes_per_token() const;
    double bits_per_coordinate() const { return 0.5 * (key_bits + value_bits); }
};
/// Caches must be QuantizedKVCache (what LlamaModel::make_caches builds); bits are averaged
/// over layers weighted by heads * head_dim.
CacheFootprint measure_footprint(const std::vector<std::unique_ptr<KVCache>>& caches);

// ---------------------------------------------------------------------------------------------
// Running the model.

/// Feeds tokens through the model in pieces of at most `batch`; `last_logits` (n_vocab floats)
/// receives the logits of the last token.
void prefill(const LlamaModel& model, const int32_t* tokens, int n,
             std::vector<std::unique_ptr<KVCache>>& caches, int batch, float* last_logits,
             const TokenProgress& progress = {});

/// Greedy decoding after a prefill that left its last logits in `logits` (n_vocab floats):
/// picks the argmax, calls on_token with it, and feeds it back, until an end-of-generation token
/// (not reported) or max_tokens picked (the last pick is not fed, so caches need room for
/// max_tokens - 1 more tokens). Returns the picked tokens.
std::vector<int32_t> greedy_decode(const LlamaModel& model, const BPETokenizer& tokenizer,
                                   std::vector<std::unique_ptr<KVCache>>& caches,
                                   std::vector<float>& logits, int max_tokens,
                                   const std::function<void(int32_t)>& on_token = {});

struct QualityResult {
    NamedConfig named;
    int64_t tokens_scored = 0;
    double kld = 0.0;
    double top1 = 0.0;
    double ppl_base = 0.0;
    double ppl = 0.0;
    CacheFootprint footprint;  ///< at the end of the last chunk
    double seconds = 0.0;      ///< model time of this configuration over every chunk
};

struct QualityReport {
    int chunks = 0;
    EvalOptions options;
    QualityResult baseline;  ///< kld 0, top-1 1, ppl = ppl_base
    std::vector<QualityResult> results;
};

/// Scores every configuration against the baseline over the first count_chunks() chunks of
/// `tokens`. Throws std::invalid_argument when the text holds no whole chunk.
QualityReport evaluate_quality(const LlamaModel& model, const std::vector<int32_t>& tokens,
                               const std::vector<NamedConfig>& configs, const EvalOptions& opts,
                               const TokenProgress& progress = {});

/// Decode speed at each context length in `contexts`: the baseline prefills tokens[0, ctx)
/// once, every configuration's fresh caches are filled with the baseline's keys and values
/// (encoded by that configuration; the logits are not used, so this only saves prefill time),
/// then `steps` greedy decode steps are timed. Returns tokens/s as [config][context].
/// Progress counts decode steps and prefilled tokens.
std::vector<std::vector<double>> measure_decode_speed(const LlamaModel& model,
                                                      const std::vector<int32_t>& tokens,
                                                      const std::vector<NamedConfig>& configs,
                                                      const std::vector<int>& contexts, int steps,
                                                      int batch,
                                                      const TokenProgress& progress = {});

// ---------------------------------------------------------------------------------------------
// Needle-in-a-haystack retrieval: a sentence holding a random 5-digit number is hidden at a
// chosen depth of a long stretch of text, a chat-templated question asks for the number, and the
// model answers greedily through the cache under test. A case passes when the answer contains
// the number; the score is the fraction of (length, depth) cases that pass.

struct NeedleOptions {
    std::vector<int> lengths = {2048, 4096, 8192};  ///< tokens of prompt plus answer
    std::vector<double> depths = {0.1, 0.5, 0.9};   ///< needle position, fraction of haystack
    int max_new_tokens = 20;
    int batch = 256;    ///< prefill sub-chunk
    uint64_t seed = 0;  ///< draws the numbers
};

struct NeedlePrompt {
    int length = 0;
    double depth = 0.0;
    std::string number;
    std::vector<int32_t> tokens;
};

/// One prompt per (length, depth), lengths outermost. The haystack is the decoded text of
/// haystack_tokens[0, H), H chosen so that prompt plus max_new_tokens is about `length`; the
/// needle goes after the first sentence or line end at or past depth * H. Throws
/// std::invalid_argument when a length is too short for the question or longer than the text.
std::vector<NeedlePrompt> build_needle_prompts(const BPETokenizer& tokenizer,
                                               const std::vector<int32_t>& haystack_tokens,
                                               const NeedleOptions& opts);

struct NeedleCase {
    int length = 0;
    double depth = 0.0;
    int prompt_tokens = 0;
    std::string number;
    std::string answer;
    bool found = false;
};

struct NeedleResult {
    std::vector<NeedleCase> cases;
    double score = 0.0;    ///< fraction of cases found
    double seconds = 0.0;  ///< wall time of every case
};

/// Runs every prompt with fresh caches of `config`. Progress counts tokens through the model.
NeedleResult run_needle(const LlamaModel& model, const BPETokenizer& tokenizer,
                        const std::vector<NeedlePrompt>& prompts, const KVCacheConfig& config,
                        const NeedleOptions& opts, const TokenProgress& progress = {});

/// Work units run_needle reports (prompt tokens plus max_new_tokens per case).
int64_t needle_work(const std::vector<NeedlePrompt>& prompts, const NeedleOptions& opts);

}  // namespace veloxquant
