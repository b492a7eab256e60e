// `veloxquant eval`: one cache configuration against the uncompressed (fp16) cache on a text:
// next-token KL divergence, top-1 agreement, perplexity of both, KV bytes per token and bits per
// coordinate; with --needle, needle-in-a-haystack retrieval of both caches.
#include <algorithm>
#include <iomanip>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "commands.h"
#include "config_options.h"
#include "progress.h"

namespace veloxquant::cli {
namespace {

struct Options {
    ConfigOptions cache;
    ModelOptions model;
    int chunks = 4;
    int score_from = -1;
    int batch = 256;
    bool needle = false;
    NeedleOptions needle_opts;
    bool quick = false;
    std::string json_path;
};

void apply_quick(CLI::App* sub, Options& o) {
    if (!o.quick) return;
    if (sub->count("--ctx") == 0) o.model.ctx = 256;
    if (sub->count("--chunks") == 0) o.chunks = 1;
    if (sub->count("--needle-lengths") == 0) o.needle_opts.lengths = {512};
    if (sub->count("--needle-depths") == 0) o.needle_opts.depths = {0.5};
}

void run(const Options& o) {
    KVCacheConfig config = o.cache.build();
    LoadedModel m = load_model(o.model.model);
    set_model_rope(config, *m.model);
    warn_if_left_uncentred(config, std::min(o.model.ctx, o.batch));
    const NamedConfig named{config_label(config), config};
    const std::string text_path = resolve_text_path(o.model.text);
    const std::vector<int32_t> tokens = tokenize_file(*m.tokenizer, text_path);

    EvalOptions eo;
    eo.ctx = o.model.ctx;
    eo.score_from = o.score_from;
    eo.max_chunks = o.chunks;
    eo.batch = o.batch;
    eo.validate();
    const int chunks = count_chunks(static_cast<int64_t>(tokens.size()), eo);
    // Needle prompts are built first, so that a bad needle setting fails before the long run.
    NeedleOptions no = o.needle_opts;
    no.batch = o.batch;
    no.seed = config.seed;
    const std::vector<NeedlePrompt> prompts =
        o.needle ? build_needle_prompts(*m.tokenizer, tokens, no) : std::vector<NeedlePrompt>{};
    QualityReport report;
    {
        Progress bar("quality", int64_t{chunks} * (eo.ctx - 1) * 2, "tok", o.model.quiet);
        report =
            evaluate_quality(*m.model, tokens, {named}, eo, [&](int64_t n) { bar.advance(n); });
    }
    std::vector<NeedleResult> needles;
    if (o.needle) {
        Progress bar("needle", 2 * needle_work(prompts, no), "tok", o.model.quiet);
        for (const KVCacheConfig& c : {baseline_config().config, named.config})
            needles.push_back(run_needle(*m.model, *m.tokenizer, prompts, c, no,
                                         [&](int64_t n) { bar.advance(n); }));
    }

    const QualityResult& r = report.results.front();
    std::cout << "model " << o.model.model << ", text " << text_path << " (" << tokens.size()
              << " tokens)\n"
              << report.chunks << " chunk(s) of " << eo.ctx << " tokens, " << r.tokens_scored
              << " tokens scored (positions " << eo.resolved_score_from() << ".." << eo.ctx - 1
              << " of each chunk)\n\n";
    std::vector<TableRow> rows = {{&report.baseline, needles.empty() ? nullptr : &needles[0], {}},
                                  {&r, needles.empty() ? nullptr : &needles[1], {}}};
    print_table(std::cout, rows, eo.ctx, {});
    std::cout << std::fixed << std::setprecision(3) << "\nperplexity: baseline " << r.ppl_base
              << ", " << r.named.label << " " << r.ppl << std::setprecision(1)
              << "; KV bytes/token " << r.footprint.bytes_per_token() << " vs "
              << report.baseline.footprint.bytes_per_token() << " (fp16); model time " << r.seconds
              << " s vs " << report.baseline.seconds << " s (fp16)\n";
    if (o.needle) {
        std::cout << "\nneedle cases (length, depth: baseline / " << r.named.label << "):\n";
        for (std::size_t i = 0; i < needles[0].cases.size(); ++i) {
            const NeedleCase& b = needles[0].cases[i];
            std::cout << "  " << b.length << " @ " << b.depth << " (number " << b.number
                      << "): " << (b.found ? "found" : "missed") << " / "
                      << (needles[1].cases[i].found ? "found" : "missed") << "\n";
        }
    }

    if (o.json_path.empty()) return;
    nlohmann::json doc = {{"model", o.model.model},
                          {"text", text_path},
                          {"text_tokens", tokens.size()},
                          {"ctx", eo.ctx},
                          {"score_from", eo.resolved_score_from()},
                          {"chunks", report.chunks},
                          {"tokens_scored", r.tokens_scored},
                          {"baseline", quality_json(report.baseline, eo.ctx)},
                          {"result", quality_json(r, eo.ctx)}};
    if (o.needle)
        doc["needle"] = {{"lengths", o.needle_opts.lengths},
                         {"depths", o.needle_opts.depths},
                         {"baseline", needle_json(needles[0])},
                         {"result", needle_json(needles[1])}};
    write_json(o.json_path, doc);
}

}  // namespace

void register_eval(CLI::App& app) {
    auto o = std::make_shared<Options>();
    CLI::App* sub = app.add_subcommand(
        "eval",
        "One cache configuration against the fp16 cache on a text: KLD, top-1, PPL, "
        "bytes, bits; --needle adds needle-in-a-haystack retrieval");
    add_config_options(sub, o->cache);
    add_model_options(sub, o->model, true, "tokens per evaluation chunk");
    sub->add_option("--chunks", o->chunks, "chunks to evaluate (0 = the whole text)")
        ->capture_default_str()
        ->check(CLI::NonNegativeNumber);
    sub->add_option("--score-from", o->score_from,
                    "first scored position of each chunk (default ctx/2)");
    sub->add_option("--batch", o->batch, "prefill sub-chunk length")
        ->capture_default_str()
        ->check(CLI::PositiveNumber);
    sub->add_flag("--needle", o->needle, "add needle-in-a-haystack retrieval");
    sub->add_option("--needle-lengths", o->needle_opts.lengths, "needle context lengths")
        ->delimiter(',')
        ->capture_default_str();
    sub->add_option("--needle-depths", o->needle_opts.depths, "needle depths in [0, 1]")
        ->delimiter(',')
        ->capture_default_str();
    sub->add_flag("--quick", o->quick,
                  "small settings for smoke tests (ctx 256, 1 chunk, needle 512 at 0.5)");
    sub->add_option("--json", o->json_path, "also write the results as JSON to this file");
    sub->callback([sub, o] {
        apply_quick(sub, *o);
        run(*o);
    });
}

}  // namespace veloxquant::cli
