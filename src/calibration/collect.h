// Collection of calibration activations: runs a model over calibration text with caches that
// record what they receive (keys and values at append, queries at attend) and keeps, per layer
// and KV head, a uniform sub-sample of bounded size.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "calibration/activations.h"
#include "veloxquant/calibration.h"

namespace veloxquant {

class LlamaModel;

struct CollectOptions {
    /// Tokens per sequence: the text is cut into sequences of ctx tokens, each run from empty
    /// caches (positions restart at 0), as evaluation does. A last partial sequence of at least
    /// two tokens is run too.
    int ctx = 512;
    /// Rows kept per layer and KV head for keys and values (the same tokens for both), and for
    /// queries (rows of every query head of the group).
    int max_kv_rows = 4096;
    int max_query_rows = 4096;
    /// Seeds the reservoir sampling.
    uint64_t seed = 0;
    /// Called with the number of tokens just run (a delta).
    std::function<void(int64_t)> progress;

    /// Throws std::invalid_argument naming the field for ctx < 2 or row caps < 1.
    void validate() const;
};

/// Runs `model` over `tokens` and returns per layer and KV head a uniform sub-sample (reservoir
/// sampling, Vitter's algorithm R, one seeded stream per layer, head and kind) of the post-RoPE
/// keys, the values and the post-RoPE queries, with their positions, plus the model's RoPE
/// frequencies. Rows are in arrival order while fewer than the cap have been seen. The caches
/// are fp16 caches, so the activations are those of the uncompressed model. Throws
/// std::invalid_argument for bad options or fewer than two tokens.
Activations collect_activations(const LlamaModel& model, const std::vector<int32_t>& tokens,
                                const CollectOptions& options = {});

/// theta_i = rope_freq_scale * rope_freq_base^(-2i / rope_dim), i < rope_dim / 2, as the model
/// rotates pair (2i, 2i + 1).
std::vector<double> model_rope_inv_freq(const LlamaModel& model);

/// Architecture, name, attention shape and a hash of the GGUF tensor table (names, types,
/// shapes) and of the first 64 bytes of each tensor's data.
ModelFingerprint model_fingerprint(const LlamaModel& model);

}  // namespace veloxquant
