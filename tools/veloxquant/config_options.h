// Options and helpers shared by the model subcommands: cache options named after the
// KVCacheConfig fields, --model/--text/--ctx, loading, and JSON output.
#pragma once

#include <CLI/CLI.hpp>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "calibration/activations.h"
#include "model/evaluation.h"
#include "model/llama_model.h"
#include "model/tokenizer.h"
#include "veloxquant/config.h"

namespace veloxquant::cli {

constexpr const char* kDefaultModel = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// --method, --bits, --value-bits, --num-residuals, --sketch-dim, --num-clusters,
/// --use-hadamard/--no-hadamard, --fused/--unfused, --outliers, --outlier-bits, --seed,
/// --calibration.
struct ConfigOptions {
    KVCacheConfig config;
    bool outliers = false;
    std::string calibration;  ///< --calibration FILE: applied with apply_calibration

    ConfigOptions() { config.method = "turboquant_rvq"; }
    /// The configuration, with a fresh KeyNormObserver when --outliers and the --calibration
    /// file applied (its model is then checked by the next load_model); validated, so a bad
    /// setting or file fails before the model loads.
    KVCacheConfig build() const;
};
void add_config_options(CLI::App* app, ConfigOptions& opts);
/// Gives a center_keys configuration without RoPE frequencies the model's, so that its key
/// mean follows RoPE (KVCacheConfig::center_keys).
void set_model_rope(KVCacheConfig& config, const LlamaModel& model);
/// A warning on standard error where a center_keys configuration's caches will take a first
/// append of fewer than CenteredKeyCodec::kMinEstimateTokens tokens (a short prompt, or a small
/// --batch), which leaves their keys uncentred for good.
void warn_if_left_uncentred(const KVCacheConfig& config, int first_append);

/// --model, --text, --ctx and --quiet.
struct ModelOptions {
    std::string model = kDefaultModel;
    std::string text;  ///< empty: the WikiText-2 test split, where it exists
    int ctx = 2048;
    bool quiet = false;
};
/// with_text adds --text; ctx_help describes --ctx for this subcommand.
void add_model_options(CLI::App* app, ModelOptions& opts, bool with_text,
                       const std::string& ctx_help);

/// The model and its tokenizer.
struct LoadedModel {
    std::unique_ptr<LlamaModel> model;
    std::unique_ptr<BPETokenizer> tokenizer;
};
/// Throws std::runtime_error naming --model when the file is missing, and
/// std::invalid_argument naming both models when a --calibration file applied by
/// ConfigOptions::build() was made for another model.
LoadedModel load_model(const std::string& path);

/// Where calibration activations come from: tokens of a text (default: the WikiText-2 valid
/// split; evaluation uses the test split), run in sequences of ctx tokens.
struct CalibrationSource {
    std::string text;       ///< empty: the WikiText-2 valid split
    int64_t tokens = 8192;  ///< tokens run (0 = the whole text); about 10 ms of CPU each
    int ctx = 512;
    int max_rows = 4096;  ///< rows kept per layer and KV head
    uint64_t seed = 0;
};
/// The resolved text path of `source` (throws std::runtime_error when missing).
std::string resolve_calibration_text(const std::string& text);
/// Runs the model over the source's tokens with a "collect" progress bar; *tokens_run (when
/// given) receives how many tokens that was.
Activations collect_calibration(const LoadedModel& m, const CalibrationSource& source, bool quiet,
                                int64_t* tokens_run = nullptr);

/// --calibration FILE, for subcommands that build their own configurations (compare).
void add_calibration_option(CLI::App* app, std::string& path);
/// Loads the calibration at `path` (nothing when empty), checks it against the model, and
/// applies it to every configuration whose method has a section in it, appending
/// " (calibrated)" to their labels; the others are left as they are.
void apply_calibration_file(const std::string& path, const LlamaModel& model,
                            std::vector<NamedConfig>& configs);

/// The --text file, or the default WikiText-2 test split; throws std::runtime_error naming
/// --text when neither exists.
std::string resolve_text_path(const std::string& text);
/// Tokens of the whole file (no special-token parsing).
std::vector<int32_t> tokenize_file(const BPETokenizer& tokenizer, const std::string& path);

/// The fields a run's settings are reproduced from.
nlohmann::json config_json(const KVCacheConfig& config);
nlohmann::json footprint_json(const CacheFootprint& f);
/// A quality result with its KV MiB at `ctx` tokens.
nlohmann::json quality_json(const QualityResult& r, int ctx);
nlohmann::json needle_json(const NeedleResult& r);

/// One line of the results table; needle and tokens_per_second are optional columns.
struct TableRow {
    const QualityResult* quality = nullptr;
    const NeedleResult* needle = nullptr;
    std::vector<double> tokens_per_second;  ///< one per decode context
};
/// Bits per coordinate, KV MiB at ctx, KLD, top-1, delta perplexity, then a needle column when
/// any row has one and a tokens/s column per decode context.
void print_table(std::ostream& os, const std::vector<TableRow>& rows, int ctx,
                 const std::vector<int>& decode_contexts);

/// Writes `doc` (indented) to `path`; throws std::runtime_error when the file cannot be written.
void write_json(const std::string& path, const nlohmann::json& doc);

/// "2K" for a multiple of 1024, else the plain number.
std::string short_count(int n);

}  // namespace veloxquant::cli
