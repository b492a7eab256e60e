// `veloxquant compare`: the main job. Every method at its defaults and at several bit widths
// against the fp16 cache on the default model and text, as one table: bits per coordinate, KV
// MiB at the evaluated context, KLD, top-1, delta perplexity, needle score and decode tokens/s;
// optionally JSON and a PNG plot of quality against bits (scripts/plot_quality.py).
#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <memory>
#include <numeric>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "calibration/calibrate.h"
#include "calibration/collect.h"
#include "commands.h"
#include "config_options.h"
#include "progress.h"

namespace veloxquant::cli {
namespace {

namespace fs = std::filesystem;

struct Options {
    ModelOptions model;
    std::vector<std::string> methods = kSweepMethods;
    std::vector<int> bits = kSweepBits;
    int chunks = 8;
    int score_from = -1;
    int batch = 256;
    NeedleOptions needle;
    std::vector<int> decode_contexts = {512, 2048, 8192};
    int decode_steps = 32;
    uint64_t seed = 0;
    bool quick = false;
    std::string json_path;
    std::string plot_path;
    std::string calibration;
    CalibrationSource calibration_source;
    bool center_keys = false;
};

void apply_quick(CLI::App* sub, Options& o) {
    if (!o.quick) return;
    if (sub->count("--ctx") == 0) o.model.ctx = 256;
    if (sub->count("--chunks") == 0) o.chunks = 1;
    if (sub->count("--needle-lengths") == 0) o.needle.lengths = {512};
    if (sub->count("--needle-depths") == 0) o.needle.depths = {0.5};
    if (sub->count("--decode-contexts") == 0) o.decode_contexts = {256};
    if (sub->count("--decode-steps") == 0) o.decode_steps = 4;
    if (sub->count("--calibration-tokens") == 0) o.calibration_source.tokens = 2048;
}

/// The repository's root: this file is tools/veloxquant/cmd_compare.cpp in it.
fs::path source_root() {
    return fs::path(__FILE__).parent_path().parent_path().parent_path();
}

void plot(const std::string& json_path, const std::string& png_path) {
    const fs::path root = source_root();
    const fs::path script = root / "scripts" / "plot_quality.py";
    if (!fs::exists(script))
        throw std::runtime_error("--plot needs " + script.string() + ", which is missing");
    const fs::path venv = root / ".venv" / "bin" / "python";
    const std::string python = fs::exists(venv) ? venv.string() : "python3";
    const std::string cmd =
        "'" + python + "' '" + script.string() + "' '" + json_path + "' '" + png_path + "'";
    if (std::system(cmd.c_str()) != 0)
        throw std::runtime_error("plotting failed: " + cmd +
                                 " (needs matplotlib: pip install -r scripts/requirements.txt)");
}

bool ends_with(const std::string& s, const std::string& suffix) {
    return s.size() >= suffix.size() &&
           s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// Configurations of calibrated methods that no --calibration file covered are calibrated here,
// each at its own bits, from one collection over the calibration text (WikiText-2 valid by
// default; the evaluation text is the test split). The calibration sequences are as long as the
// evaluation's (at least 512 tokens), so that the activations cover every position evaluated:
// spectral at 4.4 bits evaluated at ctx 2048 scored KLD 0.074 calibrated at ctx 512, 0.036 at 2048.
void calibrate_in_process(const Options& o, const LoadedModel& m,
                          std::vector<NamedConfig>& configs) {
    const std::string suffix = " (calibrated)";
    std::optional<Activations> acts;
    CalibrationSource source = o.calibration_source;
    source.ctx = std::max(source.ctx, o.model.ctx);
    for (NamedConfig& nc : configs) {
        if (!needs_calibration(nc.config.method) || ends_with(nc.label, suffix)) continue;
        if (!acts) acts = collect_calibration(m, source, o.model.quiet);
        Calibration cal;
        cal.model = model_fingerprint(*m.model);
        calibrate_method(*acts, nc.config, cal);
        apply_calibration(cal, nc.config);
        nc.label += suffix;
    }
}

void run(const Options& o) {
    for (const std::string& m : o.methods) {
        KVCacheConfig c;
        c.method = m;
        c.validate();
    }
    LoadedModel m = load_model(o.model.model);
    const std::string text_path = resolve_text_path(o.model.text);
    const std::vector<int32_t> tokens = tokenize_file(*m.tokenizer, text_path);
    std::vector<NamedConfig> configs =
        sweep_configs(o.methods, o.bits, m.model->hparams().head_dim);
    for (NamedConfig& c : configs) c.config.seed = o.seed;
    apply_calibration_file(o.calibration, *m.model, configs);
    calibrate_in_process(o, m, configs);
    if (o.center_keys)
        for (NamedConfig& nc : configs) {
            KVCacheConfig c = nc.config;
            c.center_keys = true;
            try {
                c.validate();  // the methods that refuse it keep their keys as they are
            } catch (const std::invalid_argument&) {
                continue;
            }
            set_model_rope(c, *m.model);
            nc.config = c;
            nc.label += " centred";
        }
    if (o.center_keys) {
        KVCacheConfig centred;
        centred.center_keys = true;
        warn_if_left_uncentred(centred, o.batch);
    }
    std::vector<NamedConfig> all = {baseline_config()};
    all.insert(all.end(), configs.begin(), configs.end());

    EvalOptions eo;
    eo.ctx = o.model.ctx;
    eo.max_chunks = o.chunks;
    eo.score_from = o.score_from;
    eo.batch = o.batch;
    eo.validate();
    // Needle prompts are built and decode contexts checked before the long runs, so that a bad
    // setting fails early.
    NeedleOptions no = o.needle;
    no.batch = o.batch;
    no.seed = o.seed;
    const auto prompts = build_needle_prompts(*m.tokenizer, tokens, no);
    std::vector<std::vector<double>> tps;
    {
        const int64_t prefill =
            std::accumulate(o.decode_contexts.begin(), o.decode_contexts.end(), int64_t{0});
        const int64_t steps = int64_t{o.decode_steps} * static_cast<int64_t>(all.size()) *
                              static_cast<int64_t>(o.decode_contexts.size());
        Progress bar("decode", prefill + steps, "tok", o.model.quiet);
        tps = measure_decode_speed(*m.model, tokens, all, o.decode_contexts, o.decode_steps,
                                   o.batch, [&](int64_t n) { bar.advance(n); });
    }

    const int64_t chunks = count_chunks(static_cast<int64_t>(tokens.size()), eo);
    QualityReport report;
    {
        Progress bar("quality", chunks * (eo.ctx - 1) * static_cast<int64_t>(all.size()), "tok",
                     o.model.quiet);
        report =
            evaluate_quality(*m.model, tokens, configs, eo, [&](int64_t n) { bar.advance(n); });
    }

    std::vector<NeedleResult> needles;
    {
        Progress bar("needle", needle_work(prompts, no) * static_cast<int64_t>(all.size()), "tok",
                     o.model.quiet);
        for (const NamedConfig& c : all)
            needles.push_back(run_needle(*m.model, *m.tokenizer, prompts, c.config, no,
                                         [&](int64_t n) { bar.advance(n); }));
    }

    std::cout << "model " << o.model.model << ", text " << text_path << " (" << tokens.size()
              << " tokens)\n"
              << report.chunks << " chunk(s) of " << eo.ctx << " tokens, "
              << report.baseline.tokens_scored << " tokens scored; baseline perplexity "
              << report.baseline.ppl << "; needle: " << prompts.size()
              << " case(s) per config; decode: " << o.decode_steps << " greedy steps\n\n";
    std::vector<TableRow> rows;
    for (std::size_t i = 0; i < all.size(); ++i)
        rows.push_back({i == 0 ? &report.baseline : &report.results[i - 1], &needles[i], tps[i]});
    print_table(std::cout, rows, eo.ctx, o.decode_contexts);
    std::cout << "\nK/V bits: per coordinate, codes plus every norm, scale and id. MiB: packed KV "
                 "storage (all layers) at the evaluated context. KLD: mean KL(fp16 || config) "
                 "of next-token distributions. needle: cases whose answer holds the number. tok/s: "
                 "greedy decode at that "
                 "context, caches filled with the fp16 run's keys and values.\n";

    if (o.json_path.empty() && o.plot_path.empty()) return;
    nlohmann::json rows_json = nlohmann::json::array();
    for (std::size_t i = 0; i < all.size(); ++i) {
        nlohmann::json row = quality_json(*rows[i].quality, eo.ctx);
        row["needle"] = needle_json(needles[i]);
        nlohmann::json speed = nlohmann::json::object();
        for (std::size_t j = 0; j < o.decode_contexts.size(); ++j)
            speed[std::to_string(o.decode_contexts[j])] = tps[i][j];
        row["decode_tokens_per_second"] = speed;
        rows_json.push_back(row);
    }
    const nlohmann::json doc = {{"model", o.model.model},
                                {"text", text_path},
                                {"text_tokens", tokens.size()},
                                {"ctx", eo.ctx},
                                {"score_from", eo.resolved_score_from()},
                                {"chunks", report.chunks},
                                {"tokens_scored", report.baseline.tokens_scored},
                                {"needle_lengths", no.lengths},
                                {"needle_depths", no.depths},
                                {"decode_contexts", o.decode_contexts},
                                {"decode_steps", o.decode_steps},
                                {"rows", rows_json}};
    const std::string json_path =
        o.json_path.empty() ? (fs::temp_directory_path() / "veloxquant_compare.json").string()
                            : o.json_path;
    write_json(json_path, doc);
    if (!o.plot_path.empty()) {
        plot(json_path, o.plot_path);
        std::cout << "wrote " << o.plot_path << "\n";
    }
    if (!o.json_path.empty()) std::cout << "wrote " << o.json_path << "\n";
}

}  // namespace

void register_compare(CLI::App& app) {
    auto o = std::make_shared<Options>();
    CLI::App* sub = app.add_subcommand(
        "compare",
        "Main job: every method at its defaults and at 2/3/4 bits against the fp16 "
        "cache (bits, KV MiB, KLD, top-1, dPPL, needle, decode tokens/s)");
    add_model_options(sub, o->model, true, "tokens per evaluation chunk");
    add_calibration_option(sub, o->calibration);
    sub->add_option("--calibration-text", o->calibration_source.text,
                    "text the calibrated methods learn from when --calibration does not cover "
                    "them (default: the WikiText-2 valid split)");
    sub->add_option("--calibration-tokens", o->calibration_source.tokens,
                    "tokens of that text to run (0 = all)")
        ->capture_default_str()
        ->check(CLI::NonNegativeNumber);
    sub->add_option("--chunks", o->chunks, "evaluation chunks (0 = the whole text)")
        ->capture_default_str()
        ->check(CLI::NonNegativeNumber);
    sub->add_option("--score-from", o->score_from,
                    "first scored position of each chunk (default ctx/2)");
    sub->add_option("--methods", o->methods, "methods to sweep")
        ->delimiter(',')
        ->capture_default_str();
    sub->add_option("--bits", o->bits, "bit widths to sweep (key and value bits)")
        ->delimiter(',')
        ->capture_default_str()
        ->check(CLI::Range(1, 8));
    sub->add_option("--batch", o->batch, "prefill sub-chunk length")
        ->capture_default_str()
        ->check(CLI::PositiveNumber);
    sub->add_option("--needle-lengths", o->needle.lengths, "needle context lengths")
        ->delimiter(',')
        ->capture_default_str();
    sub->add_option("--needle-depths", o->needle.depths, "needle depths in [0, 1]")
        ->delimiter(',')
        ->capture_default_str();
    sub->add_option("--decode-contexts", o->decode_contexts, "contexts of the decode timing")
        ->delimiter(',')
        ->capture_default_str();
    sub->add_option("--decode-steps", o->decode_steps, "timed greedy decode steps per context")
        ->capture_default_str()
        ->check(CLI::PositiveNumber);
    sub->add_option("--seed", o->seed, "seed of every configuration and of the needle numbers")
        ->capture_default_str();
    sub->add_flag("--center-keys", o->center_keys,
                  "code every method's keys that allows it minus their RoPE-following mean "
                  "(KVCacheConfig::center_keys)");
    sub->add_flag("--quick", o->quick,
                  "small settings for smoke tests (ctx 256, 1 chunk, needle 512 at 0.5, decode "
                  "4 steps at 256, calibration on 2048 tokens)");
    sub->add_option("--json", o->json_path, "also write the table as JSON to this file");
    sub->add_option("--plot", o->plot_path,
                    "also write a PNG of KLD and top-1 against bits (scripts/plot_quality.py)");
    sub->callback([sub, o] {
        apply_quick(sub, *o);
        run(*o);
    });
}

}  // namespace veloxquant::cli
