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

#include "calibration/collect.h"
#include "calibration/rabitq_calibration.h"
#include "calibration/ratequant_calibration.h"
#include "commands.h"
#include "config_options.h"
#include "progress.h"
#include "veloxquant/calibration.h"

namespace veloxquant::cli {
namespace {

const char* const kDefaultCalibrationTexts[] = {"../shared/data/wikitext-2/valid.txt",
                                                "/work/shared/data/wikitext-2/valid.txt"};

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

// One method's calibration: fills its section of `cal` from the activations and describes the
// result in `report` (printed and written with --json).
using CalibrateFn = void (*)(const Activations&, const Options&, Calibration& cal,
                             nlohmann::json& report);

// The configuration whose seed and rotation kind the calibrated codecs will use.
KVCacheConfig base_config(const Options& o) {
    KVCacheConfig c;
    c.method = o.method;
    c.seed = o.seed;
    c.use_hadamard = o.use_hadamard;
    c.num_clusters = o.num_clusters;
    return c;
}

void calibrate_ratequant_cmd(const Activations& acts, const Options& o, Calibration& cal,
                             nlohmann::json& report) {
    RateQuantOptions ro;
    ro.target_bits = o.bits;
    ro.per_head = !o.per_layer;
    cal.ratequant = calibrate_ratequant(acts, base_config(o), ro);
    const auto& r = *cal.ratequant;
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
    std::cout << "ratequant: " << r.units.size() << (o.per_layer ? " layers" : " heads") << ", "
              << total << " bits = " << std::setprecision(4)
              << static_cast<double>(total) / static_cast<double>(r.units.size())
              << " average (target " << r.target_bits << "); widths:";
    for (const auto& [b, n] : histogram) std::cout << " " << n << " x " << b;
    std::cout << "\n";
}

void calibrate_rabitq_cmd(const Activations& acts, const Options& o, Calibration& cal,
                          nlohmann::json& report) {
    Calibration::RaBitQ r;
    r.ivf_centroids = calibrate_rabitq_centroids(acts, base_config(o));
    r.num_clusters = o.num_clusters;
    cal.rabitq = std::move(r);
    report["num_clusters"] = o.num_clusters;
    std::cout << "rabitq: " << o.num_clusters << " IVF centroids per layer and KV head\n";
}

// Methods `calibrate` knows. At merge, the other calibrated methods join here:
//   {"vecinfer", ...}  calibrate_vecinfer(acts, bits, seed)        -> cal.vecinfer
//   {"spectral", ...}  calibrate_spectral_rotation(acts)            -> cal.spectral
//   {"commvq", ...}    calibrate_commvq(acts, bits, seed)          -> cal.commvq
struct Calibrator {
    const char* method;
    CalibrateFn run;
};
const Calibrator kCalibrators[] = {
    {"ratequant", calibrate_ratequant_cmd},
    {"rabitq", calibrate_rabitq_cmd},
};

CalibrateFn find_calibrator(const std::string& method) {
    std::string names;
    for (const Calibrator& c : kCalibrators) {
        if (method == c.method) return c.run;
        names += std::string(names.empty() ? "" : ", ") + c.method;
    }
    throw std::invalid_argument("calibrate: no calibration for method '" + method +
                                "'; choose one of: " + names);
}

std::string calibration_text(const std::string& text) {
    if (!text.empty()) {
        if (!std::filesystem::exists(text))
            throw std::runtime_error("text file '" + text + "' (--text) not found");
        return text;
    }
    for (const char* p : kDefaultCalibrationTexts)
        if (std::filesystem::exists(p)) return p;
    throw std::runtime_error(
        "no default calibration text: the WikiText-2 valid split is not at "
        "../shared/data/wikitext-2/valid.txt; pass a text file with --text");
}

void run(const Options& o) {
    const auto t0 = std::chrono::steady_clock::now();
    const CalibrateFn calibrate = find_calibrator(o.method);
    base_config(o).validate();
    if (!(o.bits >= 1.0 && o.bits <= 8.0))
        throw std::invalid_argument("--bits must be in [1, 8], got " + std::to_string(o.bits));
    LoadedModel m = load_model(o.model);
    const std::string text_path = calibration_text(o.text);
    std::vector<int32_t> tokens = tokenize_file(*m.tokenizer, text_path);
    if (o.tokens > 0 && static_cast<int64_t>(tokens.size()) > o.tokens)
        tokens.resize(static_cast<std::size_t>(o.tokens));

    CollectOptions co;
    co.ctx = o.ctx;
    co.max_kv_rows = o.max_rows;
    co.max_query_rows = o.max_rows;
    co.seed = o.seed;
    Activations acts;
    {
        Progress bar("collect", static_cast<int64_t>(tokens.size()), "tok", o.quiet);
        co.progress = [&](int64_t n) { bar.advance(n); };
        acts = collect_activations(*m.model, tokens, co);
    }
    const double collect_s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

    Calibration cal;
    cal.model = model_fingerprint(*m.model);
    cal.rope_inv_freq = acts.rope.inv_freq;
    nlohmann::json report;
    calibrate(acts, o, cal, report);
    cal.save(o.out);
    const double total_s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const Calibration saved = Calibration::load(o.out);
    std::string sections;
    for (const auto& s : saved.sections()) sections += (sections.empty() ? "" : ", ") + s;
    std::cout << std::fixed << std::setprecision(1) << "calibrated " << o.method << " for "
              << cal.model.describe() << " on " << tokens.size() << " tokens of " << text_path
              << " in " << total_s << " s (collection " << collect_s << " s); " << o.out
              << " holds: " << sections << "\n";
    if (o.json_path.empty()) return;
    report["method"] = o.method;
    report["model"] = o.model;
    report["text"] = text_path;
    report["tokens"] = tokens.size();
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
    std::vector<std::string> methods;
    for (const Calibrator& c : kCalibrators) methods.push_back(c.method);
    sub->add_option("--method", o->method, "method to calibrate")
        ->required()
        ->check(CLI::IsMember(methods));
    sub->add_option("--model", o->model, "Llama-family GGUF model")->capture_default_str();
    sub->add_option("--text", o->text, "calibration text (default: the WikiText-2 valid split)");
    sub->add_option("--out", o->out, "calibration file to write (merged if it exists)")->required();
    sub->add_option("--bits", o->bits, "ratequant: target average key bits (may be fractional)")
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
