// `veloxquant generate`: a prompt in, greedily generated text streamed out, through a cache of
// any method and settings. The prompt is wrapped in the model's chat template unless --raw.
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <iterator>
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
    std::string prompt;
    std::string system;
    bool raw = false;
    int max_tokens = 256;
    int batch = 256;
    std::string json_path;
};

/// Peak resident set of this process so far (Linux reports ru_maxrss in KiB).
std::size_t peak_rss_bytes() {
    rusage u{};
    getrusage(RUSAGE_SELF, &u);
    return static_cast<std::size_t>(u.ru_maxrss) * 1024;
}

void run(const Options& o) {
    KVCacheConfig config = o.cache.build();
    std::string prompt = o.prompt;
    if (prompt.empty() || prompt == "-") {
        if (isatty(fileno(stdin)))
            throw std::runtime_error("no prompt: pass one as an argument or on standard input");
        prompt.assign(std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>());
    }
    LoadedModel m = load_model(o.model.model);
    set_model_rope(config, *m.model);
    const BPETokenizer& tok = *m.tokenizer;
    std::vector<std::pair<std::string, std::string>> messages;
    if (!o.system.empty()) messages.emplace_back("system", o.system);
    messages.emplace_back("user", prompt);
    const std::vector<int32_t> ids =
        o.raw ? tok.encode(prompt, false) : tok.encode(tok.apply_chat_template(messages, true));
    const int n = static_cast<int>(ids.size());
    if (n == 0) throw std::runtime_error("the prompt has no tokens");
    if (n + o.max_tokens > o.model.ctx)
        throw std::runtime_error("prompt (" + std::to_string(n) + " tokens) plus --max-tokens " +
                                 std::to_string(o.max_tokens) + " exceed --ctx " +
                                 std::to_string(o.model.ctx));

    warn_if_left_uncentred(config, std::min(n, o.batch));
    auto caches = m.model->make_caches(config, o.model.ctx);
    std::vector<float> logits(static_cast<std::size_t>(m.model->hparams().n_vocab));
    const auto t0 = std::chrono::steady_clock::now();
    {
        Progress bar("prefill", n, "tok", o.model.quiet || n < 2 * o.batch);
        prefill(*m.model, ids.data(), n, caches, o.batch, logits.data(),
                [&](int64_t k) { bar.advance(k); });
    }
    const auto t1 = std::chrono::steady_clock::now();
    const std::vector<int32_t> out =
        greedy_decode(*m.model, tok, caches, logits, o.max_tokens, [&](int32_t id) {
            const std::string piece = tok.token_to_piece(id);
            std::fwrite(piece.data(), 1, piece.size(), stdout);
            std::fflush(stdout);
        });
    const auto t2 = std::chrono::steady_clock::now();
    const double prefill_s = std::chrono::duration<double>(t1 - t0).count();
    const double decode_s = std::chrono::duration<double>(t2 - t1).count();
    std::fputc('\n', stdout);

    const CacheFootprint f = measure_footprint(caches);
    const std::size_t peak_rss = peak_rss_bytes();
    const double decode_tps = out.size() > 1 ? (out.size() - 1) / decode_s : 0.0;
    if (!o.model.quiet)
        std::fprintf(stderr,
                     "[%s: prompt %d tokens at %.1f tok/s; %zu generated at %.1f tok/s; KV %.1f "
                     "KiB, %.2f/%.2f bits per coordinate; peak RSS %.1f MiB]\n",
                     config_label(config).c_str(), n, n / prefill_s, out.size(), decode_tps,
                     f.storage_bytes / 1024.0, f.key_bits, f.value_bits, peak_rss / 1048576.0);
    if (o.json_path.empty()) return;
    write_json(o.json_path, {{"model", o.model.model},
                             {"config", config_json(config)},
                             {"label", config_label(config)},
                             {"prompt", prompt},
                             {"chat_template", !o.raw},
                             {"prompt_tokens", n},
                             {"generated_tokens", out.size()},
                             {"text", tok.decode(out)},
                             {"prefill_tokens_per_second", n / prefill_s},
                             {"decode_tokens_per_second", decode_tps},
                             {"footprint", footprint_json(f)},
                             {"peak_rss_bytes", peak_rss}});
}

}  // namespace

void register_generate(CLI::App& app) {
    auto o = std::make_shared<Options>();
    CLI::App* sub = app.add_subcommand(
        "generate", "Generate text from a prompt (greedy, streamed) through a compressed cache");
    sub->add_option("prompt", o->prompt, "prompt text; '-' or none reads standard input");
    add_config_options(sub, o->cache);
    add_model_options(sub, o->model, false, "cache capacity in tokens (prompt + generated)");
    sub->add_option("--max-tokens", o->max_tokens, "most tokens to generate")
        ->capture_default_str()
        ->check(CLI::PositiveNumber);
    sub->add_flag("--raw", o->raw, "feed the prompt as is, without the chat template");
    sub->add_option("--system", o->system, "system message for the chat template");
    sub->add_option("--batch", o->batch, "prefill sub-chunk length")
        ->capture_default_str()
        ->check(CLI::PositiveNumber);
    sub->add_option("--json", o->json_path, "also write the text and timings as JSON to this file");
    sub->callback([o] { run(*o); });
}

}  // namespace veloxquant::cli
