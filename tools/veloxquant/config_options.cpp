#include "config_options.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <ostream>
#include <sstream>
#include <stdexcept>
#include <utility>

#include "calibration/collect.h"
#include "methods/centered_key_codec.h"
#include "progress.h"
#include "veloxquant/calibration.h"
#include "veloxquant/observer.h"

namespace veloxquant::cli {
namespace {

// The WikiText-2 test split beside the repository (shared/), then its usual absolute place.
const char* const kDefaultTexts[] = {"../shared/data/wikitext-2/test.txt",
                                     "/work/shared/data/wikitext-2/test.txt"};
const char* const kDefaultCalibrationTexts[] = {"../shared/data/wikitext-2/valid.txt",
                                                "/work/shared/data/wikitext-2/valid.txt"};

// Calibration files applied by ConfigOptions::build() before the model is loaded, with the model
// each was made for; load_model() checks the loaded model against them.
std::vector<std::pair<std::string, ModelFingerprint>>& pending_calibrations() {
    static std::vector<std::pair<std::string, ModelFingerprint>> files;
    return files;
}

const char* const kCalibrationHelp =
    "calibration file from `veloxquant calibrate` (codebooks, rotations, bit allocation, IVF "
    "centroids of the calibrated methods)";

}  // namespace

KVCacheConfig ConfigOptions::build() const {
    KVCacheConfig c = config;
    if (outliers) c.outlier_observer = std::make_shared<KeyNormObserver>();
    if (!calibration.empty()) {
        const Calibration cal = Calibration::load(calibration);
        apply_calibration(cal, c);
        pending_calibrations().emplace_back(calibration, cal.model);
    }
    c.validate();
    return c;
}

void add_config_options(CLI::App* app, ConfigOptions& opts) {
    KVCacheConfig& c = opts.config;
    app->add_option("--method", c.method, "cache method")
        ->check(CLI::IsMember(known_methods()))
        ->capture_default_str();
    app->add_option("--bits", c.bits, "key bits per coordinate")->capture_default_str();
    app->add_option("--value-bits", c.value_bits, "value bits per coordinate (16 = fp16)")
        ->capture_default_str();
    app->add_option("--num-residuals", c.num_residuals, "turboquant_rvq stages")
        ->capture_default_str();
    app->add_option("--signal-bits", c.signal_bits,
                    "spectral: key bits of the signal coordinates (the budget's upper width)")
        ->capture_default_str();
    app->add_option("--noise-bits", c.noise_bits,
                    "spectral: key bits of the noise coordinates (the budget's lower width)")
        ->capture_default_str();
    app->add_option("--sketch-dim", c.sketch_dim, "qjl sketch rows")->capture_default_str();
    app->add_option("--num-clusters", c.num_clusters, "rabitq IVF centroids")
        ->capture_default_str();
    app->add_flag("--use-hadamard,!--no-hadamard", c.use_hadamard,
                  "randomized Walsh-Hadamard rotation (default) or a dense orthogonal one");
    app->add_flag("--fused,!--unfused", c.use_fused_sdpa,
                  "attention on the codes (default) or on dequantized blocks");
    app->add_flag("--outliers", opts.outliers,
                  "keep tokens with outlying key norms at --outlier-bits (KeyNormObserver)");
    app->add_option("--outlier-bits", c.outlier_bits, "outlier store precision: 8 or 16")
        ->capture_default_str();
    app->add_flag("--center-keys", c.center_keys,
                  "code keys minus their per-head mean, which follows the model's RoPE "
                  "(estimated from the first append)");
    app->add_option("--seed", c.seed, "seed of the random rotations and sketches")
        ->capture_default_str();
    add_calibration_option(app, opts.calibration);
}

void set_model_rope(KVCacheConfig& config, const LlamaModel& model) {
    if (config.center_keys && config.rope_inv_freq.empty())
        config.rope_inv_freq = model_rope_inv_freq(model);
}

void warn_if_left_uncentred(const KVCacheConfig& config, int first_append) {
    if (!config.center_keys || first_append >= CenteredKeyCodec::kMinEstimateTokens) return;
    std::cerr << "warning: --center-keys: the caches' first append holds " << first_append
              << " tokens, fewer than the " << CenteredKeyCodec::kMinEstimateTokens
              << " the keys' mean is estimated from, so their keys stay uncentred (a longer "
                 "prompt or --batch avoids it)\n";
}

void add_calibration_option(CLI::App* app, std::string& path) {
    app->add_option("--calibration", path, kCalibrationHelp)->check(CLI::ExistingFile);
}

void apply_calibration_file(const std::string& path, const LlamaModel& model,
                            std::vector<NamedConfig>& configs) {
    if (path.empty()) return;
    const Calibration cal = Calibration::load(path);
    check_calibration_model(cal, model_fingerprint(model));
    const std::vector<std::string> sections = cal.sections();
    for (NamedConfig& nc : configs) {
        if (std::find(sections.begin(), sections.end(), nc.config.method) == sections.end())
            continue;
        apply_calibration(cal, nc.config);
        nc.label += " (calibrated)";
    }
}

void add_model_options(CLI::App* app, ModelOptions& opts, bool with_text,
                       const std::string& ctx_help) {
    app->add_option("--model", opts.model, "Llama-family GGUF model")->capture_default_str();
    if (with_text)
        app->add_option("--text", opts.text,
                        "text file to evaluate on (default: the WikiText-2 test split)");
    app->add_option("--ctx", opts.ctx, ctx_help)
        ->capture_default_str()
        ->check(CLI::Range(2, 1 << 20));
    app->add_flag("--quiet", opts.quiet, "no progress bars");
}

LoadedModel load_model(const std::string& path) {
    if (!std::filesystem::exists(path))
        throw std::runtime_error("model file '" + path +
                                 "' not found; pass a Llama-family GGUF with --model");
    LoadedModel m;
    m.model = LlamaModel::load(path);
    m.tokenizer = std::make_unique<BPETokenizer>(vocab_from_gguf(m.model->gguf()));
    if (!pending_calibrations().empty()) {
        const ModelFingerprint fp = model_fingerprint(*m.model);
        for (const auto& [file, made_for] : pending_calibrations())
            if (made_for != fp)
                throw std::invalid_argument("--calibration " + file + " was made for " +
                                            made_for.describe() + ", not for --model " + path +
                                            ", " + fp.describe());
    }
    return m;
}

std::string resolve_text_path(const std::string& text) {
    if (!text.empty()) {
        if (!std::filesystem::exists(text))
            throw std::runtime_error("text file '" + text + "' (--text) not found");
        return text;
    }
    for (const char* p : kDefaultTexts)
        if (std::filesystem::exists(p)) return p;
    throw std::runtime_error(
        "no default text: the WikiText-2 test split is not at ../shared/data/wikitext-2/test.txt; "
        "pass a text file with --text");
}

std::string resolve_calibration_text(const std::string& text) {
    if (!text.empty()) {
        if (!std::filesystem::exists(text))
            throw std::runtime_error("calibration text file '" + text + "' not found");
        return text;
    }
    for (const char* p : kDefaultCalibrationTexts)
        if (std::filesystem::exists(p)) return p;
    throw std::runtime_error(
        "no default calibration text: the WikiText-2 valid split is not at "
        "../shared/data/wikitext-2/valid.txt; pass a text file");
}

Activations collect_calibration(const LoadedModel& m, const CalibrationSource& source, bool quiet,
                                int64_t* tokens_run) {
    std::vector<int32_t> tokens =
        tokenize_file(*m.tokenizer, resolve_calibration_text(source.text));
    if (source.tokens > 0 && static_cast<int64_t>(tokens.size()) > source.tokens)
        tokens.resize(static_cast<std::size_t>(source.tokens));
    if (tokens_run) *tokens_run = static_cast<int64_t>(tokens.size());
    CollectOptions co;
    co.ctx = source.ctx;
    co.max_kv_rows = source.max_rows;
    co.max_query_rows = source.max_rows;
    co.seed = source.seed;
    Progress bar("collect", static_cast<int64_t>(tokens.size()), "tok", quiet);
    co.progress = [&](int64_t n) { bar.advance(n); };
    return collect_activations(*m.model, tokens, co);
}

std::vector<int32_t> tokenize_file(const BPETokenizer& tokenizer, const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw std::runtime_error("cannot read text file '" + path + "'");
    std::ostringstream text;
    text << in.rdbuf();
    return tokenizer.encode(text.str(), false);
}

nlohmann::json config_json(const KVCacheConfig& c) {
    return {{"method", c.method},
            {"bits", c.bits},
            {"value_bits", c.value_bits},
            {"num_residuals", c.num_residuals},
            {"sketch_dim", c.sketch_dim},
            {"num_clusters", c.num_clusters},
            {"use_hadamard", c.use_hadamard},
            {"use_fused_sdpa", c.use_fused_sdpa},
            {"outliers", c.outlier_observer != nullptr},
            {"outlier_bits", c.outlier_bits},
            {"center_keys", c.center_keys},
            {"seed", c.seed}};
}

nlohmann::json footprint_json(const CacheFootprint& f) {
    return {{"tokens", f.tokens},
            {"storage_bytes", f.storage_bytes},
            {"parameter_bytes", f.parameter_bytes},
            {"kv_bytes_per_token", f.bytes_per_token()},
            {"code_bytes_per_token", f.code_bytes_per_token},
            {"key_bits_per_coordinate", f.key_bits},
            {"value_bits_per_coordinate", f.value_bits},
            {"bits_per_coordinate", f.bits_per_coordinate()}};
}

nlohmann::json quality_json(const QualityResult& r, int ctx) {
    return {{"label", r.named.label},
            {"config", config_json(r.named.config)},
            {"tokens_scored", r.tokens_scored},
            {"kld", r.kld},
            {"top1", r.top1},
            {"ppl", r.ppl},
            {"ppl_base", r.ppl_base},
            {"delta_ppl", r.ppl - r.ppl_base},
            {"kv_mib", r.footprint.bytes_per_token() * ctx / (1024.0 * 1024.0)},
            {"footprint", footprint_json(r.footprint)},
            {"seconds", r.seconds}};
}

nlohmann::json needle_json(const NeedleResult& r) {
    nlohmann::json cases = nlohmann::json::array();
    for (const NeedleCase& c : r.cases)
        cases.push_back({{"length", c.length},
                         {"depth", c.depth},
                         {"prompt_tokens", c.prompt_tokens},
                         {"number", c.number},
                         {"answer", c.answer},
                         {"found", c.found}});
    return {{"score", r.score}, {"seconds", r.seconds}, {"cases", cases}};
}

void print_table(std::ostream& os, const std::vector<TableRow>& rows, int ctx,
                 const std::vector<int>& decode_contexts) {
    bool needle = false;
    std::size_t width = 16;
    for (const TableRow& r : rows) {
        needle = needle || r.needle;
        width = std::max(width, r.quality->named.label.size() + 2);
    }
    const std::ios::fmtflags flags = os.flags();
    const std::streamsize precision = os.precision();
    os << std::left << std::setw(static_cast<int>(width)) << "config" << std::right << std::setw(7)
       << "K bits" << std::setw(7) << "V bits" << std::setw(9) << ("MiB@" + short_count(ctx))
       << std::setw(9) << "KLD" << std::setw(8) << "top-1" << std::setw(11) << "dPPL";
    if (needle) os << std::setw(8) << "needle";
    for (int c : decode_contexts) os << std::setw(11) << ("tok/s@" + short_count(c));
    os << "\n" << std::fixed;
    for (const TableRow& r : rows) {
        const QualityResult& q = *r.quality;
        const CacheFootprint& f = q.footprint;
        os << std::left << std::setw(static_cast<int>(width)) << q.named.label << std::right
           << std::setprecision(2) << std::setw(7) << f.key_bits << std::setw(7) << f.value_bits
           << std::setw(9) << f.bytes_per_token() * ctx / (1024.0 * 1024.0) << std::setprecision(4)
           << std::setw(9) << q.kld << std::setprecision(1) << std::setw(7) << 100.0 * q.top1 << "%"
           << std::setprecision(3) << std::setw(11) << std::showpos << q.ppl - q.ppl_base
           << std::noshowpos;
        if (needle) {
            if (r.needle) {
                const int found =
                    static_cast<int>(std::lround(r.needle->score * r.needle->cases.size()));
                os << std::setw(8)
                   << (std::to_string(found) + "/" + std::to_string(r.needle->cases.size()));
            } else {
                os << std::setw(8) << "-";
            }
        }
        os << std::setprecision(1);
        for (double t : r.tokens_per_second) os << std::setw(11) << t;
        os << "\n";
    }
    os.flags(flags);
    os.precision(precision);
}

void write_json(const std::string& path, const nlohmann::json& doc) {
    std::ofstream out(path);
    out << doc.dump(2) << "\n";
    if (!out) throw std::runtime_error("cannot write JSON to '" + path + "'");
}

std::string short_count(int n) {
    return n % 1024 == 0 ? std::to_string(n / 1024) + "K" : std::to_string(n);
}

}  // namespace veloxquant::cli
