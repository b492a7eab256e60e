// `veloxquant calibrate`: runs the model over calibration text (default: the WikiText-2 valid
// split; evaluation uses the test split), collects keys, values and queries per layer and KV
// head, calibrates one method from them and saves (merges) its section into a calibration file
// that eval, generate and compare take with --calibration.
#include <chrono>
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "calibration/calibrate.h"
#include "calibration/collect.h"
#include "commands.h"
#include "config_options.h"
#include "progress.h"
#include "veloxquant/calibration.h"

namespace veloxquant::cli {
namespace {

struct Options {
    std::string method;
    std::string model = kDefaultModel;
    std::string text;
    std::string out;
    double bits = 2.0;
    // The model forward costs about 10 ms of CPU per token at ctx 512 (SmolLM2-135M), so 8K
    // tokens keep calibration near a minute on two cores; 4096 rows per head are kept either way.
    int64_t tokens = 8192;
    int ctx = 512;
    int max_rows = 4096;
    int num_clusters = 64;
    bool use_hadamard = true;
    bool per_layer = false;
    uint64_t seed = 0;
    bool quiet = false;
    std::string json_path;
};

// The configuration whose seed and rotation kind the calibrated codecs will use.
KVCacheConfig base_config(const Options& o) {
    KVCacheConfig c;
    c.method = o.method;
    c.seed = o.seed;
    c.use_hadamard = o.use_hadamard;
    c.num_clusters = o.num_clusters;
    c.bits = static_cast<int>(o.bits);
    return c;
}

// Describes the section just calibrated in `report` (printed and written with --json).
void report_ratequant(const Calibration::RateQuant& r, bool per_layer, nlohmann::json& report) {
    std::map<int, int> histogram;
    long long total = 0;
    for (const auto& [unit, b] : r.bit_allocation) {
        ++histogram[b];
        total += b;
    }
    nlohmann::json units = nlohmann::json::array();
    for (std::size_t i = 0; i < r.units.size(); ++i)
        units.push_back({{"unit", r.units[i]},
                         {"bits", r.bit_allocation.at(r.units[i])},
                         {"sensitivity", r.sensitivity[i]},
                         {"a", r.curve_a[i]},
                         {"beta", r.curve_beta[i]}});
    report["target_bits"] = r.target_bits;
    report["average_bits"] = static_cast<double>(total) / static_cast<double>(r.units.size());
    report["units"] = units;
    std::cout << "ratequant: " << r.units.size() << (per_layer ? " layers" : " heads") << ", "
              << total << " bits = " << std::setprecision(4)
              << static_cast<double>(total) / static_cast<double>(r.units.size())
              << " average (target " << r.target_bits << "); widths:";
    for (const auto& [b, n] : histogram) std::cout << " " << n << " x " << b;
    std::cout << "\n";
}

void report_section(const Calibration& cal, const Options& o, nlohmann::json& report) {
    if (o.method == "ratequant") {
        report_ratequant(*cal.ratequant, o.per_layer, report);
    } else if (o.method == "rabitq") {
        report["num_clusters"] = cal.rabitq->num_clusters;
        std::cout << "rabitq: " << cal.rabitq->num_clusters
                  << " IVF centroids per layer and KV head\n";
    } else if (o.method == "spectral") {
        report["layers"] = cal.spectral->rotations.size();
        std::cout << "spectral: eigenbasis, eigenvalues, key mean and query second moments of "
                  << cal.spectral->rotations.size() << " layers\n";
    } else if (o.method == "vecinfer") {
        const auto& shape = cal.vecinfer->codebook.shape;
        report["bits"] = cal.vecinfer->bits;
        report["codebook_shape"] = shape;
        std::cout << "vecinfer: " << cal.vecinfer->num_subspaces << " subspaces x "
                  << shape[shape.size() - 2] << " codewords per layer and KV head ("
                  << cal.vecinfer->bits << " bits per coordinate)\n";
    } else if (o.method == "commvq") {
        report["bits"] = cal.commvq->bits;
        report["codebook_shape"] = cal.commvq->codebook.shape;
        std::cout << "commvq: " << cal.commvq->num_codebooks << " additive codebooks per layer and "
                  << "KV head (" << cal.commvq->bits << " bits per coordinate), RoPE-commuting\n";
    }
}

void run(const Options& o) {
    const auto t0 = std::chrono::steady_clock::now();
    base_config(o).validate();
    if (!(o.bits >= 1.0 && o.bits <= 8.0))
        throw std::invalid_argument("--bits must be in [1, 8], got " + std::to_string(o.bits));
    if (o.method != "ratequant" && o.bits != static_cast<int>(o.bits))
        throw std::invalid_argument("--bits must be a whole number for " + o.method + ", got " +
                                    std::to_string(o.bits));
    LoadedModel m = load_model(o.model);
    const std::string text_path = resolve_calibration_text(o.text);
    CalibrationSource source{text_path, o.tokens, o.ctx, o.max_rows, o.seed};
    int64_t tokens = 0;
    const Activations acts = collect_calibration(m, source, o.quiet, &tokens);
    const double collect_s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

    Calibration cal;
    cal.model = model_fingerprint(*m.model);
    cal.rope_inv_freq = acts.rope.inv_freq;
    nlohmann::json report;
    calibrate_method(acts, base_config(o), cal, o.bits);
    report_section(cal, o, report);
    cal.save(o.out);
    const double total_s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const Calibration saved = Calibration::load(o.out);
    std::string sections;
    for (const auto& s : saved.sections()) sections += (sections.empty() ? "" : ", ") + s;
    std::cout << std::fixed << std::setprecision(1) << "calibrated " << o.method << " for "
              << cal.model.describe() << " on " << tokens << " tokens of " << text_path << " in "
              << total_s << " s (collection " << collect_s << " s); " << o.out
              << " holds: " << sections << "\n";
    if (o.json_path.empty()) return;
    report["method"] = o.method;
    report["model"] = o.model;
    report["text"] = text_path;
    report["tokens"] = tokens;
    report["ctx"] = o.ctx;
    report["seed"] = o.seed;
    report["out"] = o.out;
    report["sections"] = saved.sections();
    report["collect_seconds"] = collect_s;
    report["total_seconds"] = total_s;
    write_json(o.json_path, report);
}

}  // namespace

void register_calibrate(CLI::App& app) {
    auto o = std::make_shared<Options>();
    CLI::App* sub = app.add_subcommand(
        "calibrate",
        "Calibrate a method from a model's activations on a text and save it into a calibration "
        "file (merged with the file's other sections) for --calibration");
    sub->add_option("--method", o->method, "method to calibrate")
        ->required()
        ->check(CLI::IsMember(calibrated_methods()));
    sub->add_option("--model", o->model, "Llama-family GGUF model")->capture_default_str();
    sub->add_option("--text", o->text, "calibration text (default: the WikiText-2 valid split)");
    sub->add_option("--out", o->out, "calibration file to write (merged if it exists)")->required();
    sub->add_option("--bits", o->bits,
                    "key bits per coordinate (vecinfer, commvq); ratequant: the target average, "
                    "which may be fractional")
        ->capture_default_str();
    sub->add_option("--tokens", o->tokens, "calibration tokens to run (0 = the whole text)")
        ->capture_default_str()
        ->check(CLI::NonNegativeNumber);
    sub->add_option("--ctx", o->ctx, "tokens per calibration sequence")
        ->capture_default_str()
        ->check(CLI::Range(2, 1 << 20));
    sub->add_option("--max-rows", o->max_rows,
                    "rows kept per layer and KV head (keys, values, queries)")
        ->capture_default_str()
        ->check(CLI::PositiveNumber);
    sub->add_option("--num-clusters", o->num_clusters,
                    "rabitq: IVF centroids per layer and KV head")
        ->capture_default_str();
    sub->add_flag("--use-hadamard,!--no-hadamard", o->use_hadamard,
                  "rotation kind of the codecs whose training is reproduced (rabitq k-means, "
                  "ratequant curves)");
    sub->add_flag("--per-layer", o->per_layer,
                  "ratequant: one width per layer (\"L\") instead of per head (\"L.H\")");
    sub->add_option("--seed", o->seed, "seed of the sampling and of the codecs")
        ->capture_default_str();
    sub->add_flag("--quiet", o->quiet, "no progress bar");
    sub->add_option("--json", o->json_path, "also write a report as JSON to this file");
    sub->callback([o] { run(*o); });
}

}  // namespace veloxquant::cli
