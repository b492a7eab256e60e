#include "model/evaluation.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <random>
#include <stdexcept>
#include <string>

#include "model/llama_model.h"
#include "model/tokenizer.h"
#include "veloxquant/caches.h"

namespace veloxquant {
namespace {

using Caches = std::vector<std::unique_ptr<KVCache>>;

double seconds_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

/// Runs forward and returns its wall time in seconds.
double timed_forward(const LlamaModel& model, const int32_t* tokens, int n, Caches& caches,
                     float* logits, bool all_logits) {
    const auto t0 = std::chrono::steady_clock::now();
    model.forward(tokens, n, caches, logits, all_logits);
    return seconds_since(t0);
}

int vocab_size(const LlamaModel& model) {
    return model.hparams().n_vocab;
}

// Needle prompt wording.
constexpr const char* kIntro =
    "Read the text below. Somewhere in it is a special magic number; remember it.\n\n";
constexpr const char* kQuestion =
    "\n\nWhat is the special magic number mentioned in the text above? Answer with the number "
    "only.";
// How far past depth * H a sentence or line end is looked for before cutting mid-sentence.
constexpr int kSnapWindow = 128;

std::string render(const BPETokenizer& tokenizer, const std::string& haystack) {
    return tokenizer.apply_chat_template({{"user", kIntro + haystack + kQuestion}}, true);
}

/// First position in [at, min(at + kSnapWindow, end)) just after a sentence end (a piece that
/// is "." up to spaces) or a line end; `at` when there is none.
int snap_to_boundary(const BPETokenizer& tokenizer, const std::vector<int32_t>& tokens, int at,
                     int end) {
    for (int i = at; i < std::min(at + kSnapWindow, end); ++i) {
        std::string piece = tokenizer.token_to_piece(tokens[i]);
        if (piece.find('\n') != std::string::npos) return i + 1;
        piece.erase(std::remove(piece.begin(), piece.end(), ' '), piece.end());
        if (piece == ".") return i + 1;
    }
    return at;
}

}  // namespace

NamedConfig baseline_config() {
    NamedConfig b;
    b.config.method = "fp16";
    b.config.value_bits = 16;
    b.label = "fp16 (baseline)";
    return b;
}

std::string config_label(const KVCacheConfig& c) {
    const std::string& m = c.method;
    if (m == "fp16") return m;
    std::string s = m;
    if (m == "qjl")
        s += " m=" + std::to_string(c.sketch_dim);
    else if (m == "spectral")
        s += " s=" + std::to_string(c.signal_bits) + " n=" + std::to_string(c.noise_bits);
    else
        s += " b=" + std::to_string(c.bits);
    if (m == "turboquant_rvq") s += " r=" + std::to_string(c.num_residuals);
    if (m == "rabitq") s += " c=" + std::to_string(c.num_clusters);
    s += " v=" + std::to_string(c.value_bits);
    if (c.outlier_observer) s += " outliers" + std::to_string(c.outlier_bits);
    if (c.center_keys) s += " centred";
    if (!c.use_hadamard) s += " dense-rotation";
    if (!c.use_fused_sdpa) s += " unfused";
    return s;
}

std::vector<NamedConfig> sweep_configs(const std::vector<std::string>& methods,
                                       const std::vector<int>& bits, int head_dim) {
    std::vector<NamedConfig> out;
    for (const std::string& m : methods) {
        NamedConfig d;
        d.config.method = m;
        d.label = config_label(d.config) + " (defaults)";
        out.push_back(d);
    }
    for (int b : bits) {
        for (const std::string& m : methods) {
            NamedConfig n;
            n.config.method = m;
            n.config.value_bits = b;
            if (m == "qjl") {
                n.config.sketch_dim = b * head_dim;
            } else if (m == "spectral") {
                // b + 1 bits on the signal coordinates, b - 1 on the rest: about b bits per
                // coordinate once the per-token scale is counted (d_eff is a few coordinates).
                n.config.signal_bits = b + 1;
                n.config.noise_bits = b - 1;
            } else {
                n.config.bits = b;
                if (m == "turboquant_rvq") n.config.num_residuals = 1;
            }
            n.label = config_label(n.config);
            out.push_back(n);
        }
    }
    return out;
}

void log_softmax(const float* logits, int n, float* out) {
    const float mx = *std::max_element(logits, logits + n);
    double sum = 0.0;
    for (int i = 0; i < n; ++i) sum += std::exp(static_cast<double>(logits[i] - mx));
    const float lse = mx + static_cast<float>(std::log(sum));
    for (int i = 0; i < n; ++i) out[i] = logits[i] - lse;
}

int32_t argmax(const float* x, int n) {
    return static_cast<int32_t>(std::max_element(x, x + n) - x);
}

TokenComparison compare_position(const float* base_logprobs, const float* logprobs, int n_vocab,
                                 int32_t target) {
    if (target < 0 || target >= n_vocab)
        throw std::out_of_range("compare_position: target " + std::to_string(target) +
                                " outside the vocabulary of " + std::to_string(n_vocab));
    TokenComparison c;
    for (int v = 0; v < n_vocab; ++v) {
        const double lp = base_logprobs[v];
        c.kld += std::exp(lp) * (lp - logprobs[v]);
    }
    // Rounding can leave a hair below zero when the two distributions are nearly equal.
    c.kld = std::max(c.kld, 0.0);
    c.top1 = argmax(base_logprobs, n_vocab) == argmax(logprobs, n_vocab);
    c.nll_base = -static_cast<double>(base_logprobs[target]);
    c.nll = -static_cast<double>(logprobs[target]);
    return c;
}

void QualityAccumulator::add(const TokenComparison& c) {
    ++n_;
    top1_ += c.top1 ? 1 : 0;
    kld_ += c.kld;
    nll_base_ += c.nll_base;
    nll_ += c.nll;
}

double QualityAccumulator::mean_kld() const {
    return n_ ? kld_ / n_ : 0.0;
}
double QualityAccumulator::top1() const {
    return n_ ? static_cast<double>(top1_) / n_ : 0.0;
}
double QualityAccumulator::ppl_base() const {
    return n_ ? std::exp(nll_base_ / n_) : 0.0;
}
double QualityAccumulator::ppl() const {
    return n_ ? std::exp(nll_ / n_) : 0.0;
}

void EvalOptions::validate() const {
    if (ctx < 2) throw std::invalid_argument("EvalOptions.ctx must be at least 2");
    const int s = resolved_score_from();
    if (s < 1 || s >= ctx)
        throw std::invalid_argument("EvalOptions.score_from must be in [1, ctx), got " +
                                    std::to_string(s) + " with ctx " + std::to_string(ctx));
    if (max_chunks < 0) throw std::invalid_argument("EvalOptions.max_chunks must be >= 0");
    if (batch < 1) throw std::invalid_argument("EvalOptions.batch must be at least 1");
}

int count_chunks(int64_t n_tokens, const EvalOptions& opts) {
    const int64_t whole = n_tokens / opts.ctx;
    return static_cast<int>(opts.max_chunks > 0 ? std::min<int64_t>(whole, opts.max_chunks)
                                                : whole);
}

std::vector<PrefillSpan> prefill_spans(const EvalOptions& opts) {
    opts.validate();
    std::vector<PrefillSpan> spans;
    auto cover = [&](int begin, int end, bool logits) {
        for (int b = begin; b < end; b += opts.batch)
            spans.push_back({b, std::min(b + opts.batch, end), logits});
    };
    const int first_scored = opts.resolved_score_from() - 1;
    cover(0, first_scored, false);
    cover(first_scored, opts.ctx - 1, true);
    return spans;
}

double CacheFootprint::bytes_per_token() const {
    return tokens > 0 ? static_cast<double>(storage_bytes) / tokens : 0.0;
}

CacheFootprint measure_footprint(const std::vector<std::unique_ptr<KVCache>>& caches) {
    CacheFootprint f;
    if (caches.empty()) return f;
    f.tokens = caches.front()->size();
    double coords = 0.0;
    for (const auto& c : caches) {
        const auto* q = dynamic_cast<const QuantizedKVCache*>(c.get());
        if (!q)
            throw std::invalid_argument("measure_footprint: " + c->class_name() +
                                        " is not a QuantizedKVCache");
        const double n = static_cast<double>(q->num_heads()) * q->head_dim();
        f.storage_bytes += q->storage_bytes();
        f.parameter_bytes += q->parameter_bytes();
        f.key_bits += n * q->key_bits_per_coordinate();
        f.value_bits += n * q->value_bits_per_coordinate();
        coords += n;
    }
    f.code_bytes_per_token = (f.key_bits + f.value_bits) / 8.0;
    f.key_bits /= coords;
    f.value_bits /= coords;
    return f;
}

void prefill(const LlamaModel& model, const int32_t* tokens, int n, Caches& caches, int batch,
             float* last_logits, const TokenProgress& progress) {
    for (int b = 0; b < n; b += batch) {
        const int m = std::min(batch, n - b);
        model.forward(tokens + b, m, caches, last_logits, false);
        if (progress) progress(m);
    }
}

std::vector<int32_t> greedy_decode(const LlamaModel& model, const BPETokenizer& tokenizer,
                                   Caches& caches, std::vector<float>& logits, int max_tokens,
                                   const std::function<void(int32_t)>& on_token) {
    std::vector<int32_t> out;
    while (static_cast<int>(out.size()) < max_tokens) {
        const int32_t tok = argmax(logits.data(), static_cast<int>(logits.size()));
        if (tokenizer.is_eog(tok)) break;
        out.push_back(tok);
        if (on_token) on_token(tok);
        if (static_cast<int>(out.size()) < max_tokens)
            model.forward(&tok, 1, caches, logits.data(), false);
    }
    return out;
}

QualityReport evaluate_quality(const LlamaModel& model, const std::vector<int32_t>& tokens,
                               const std::vector<NamedConfig>& configs, const EvalOptions& opts,
                               const TokenProgress& progress) {
    opts.validate();
    QualityReport report;
    report.options = opts;
    report.chunks = count_chunks(static_cast<int64_t>(tokens.size()), opts);
    if (report.chunks == 0)
        throw std::invalid_argument("the text has " + std::to_string(tokens.size()) +
                                    " tokens, fewer than one chunk of " + std::to_string(opts.ctx) +
                                    " (--ctx)");
    const int n_vocab = vocab_size(model);
    const std::vector<PrefillSpan> spans = prefill_spans(opts);
    const std::size_t rows = static_cast<std::size_t>(opts.batch) * n_vocab;
    std::vector<float> base(rows), other(rows);
    std::vector<TokenComparison> scored(opts.batch);

    const std::size_t n_cfg = configs.size();
    QualityAccumulator base_acc;
    std::vector<QualityAccumulator> acc(n_cfg);
    std::vector<double> seconds(n_cfg, 0.0);
    double base_seconds = 0.0;
    CacheFootprint base_footprint;
    std::vector<CacheFootprint> footprints(n_cfg);

    for (int chunk = 0; chunk < report.chunks; ++chunk) {
        const int32_t* tok = tokens.data() + static_cast<std::size_t>(chunk) * opts.ctx;
        Caches base_caches = model.make_caches(baseline_config().config, opts.ctx);
        std::vector<Caches> caches;
        for (const NamedConfig& c : configs)
            caches.push_back(model.make_caches(c.config, opts.ctx));

        for (const PrefillSpan& s : spans) {
            const int n = s.end - s.begin;
            base_seconds +=
                timed_forward(model, tok + s.begin, n, base_caches, base.data(), s.logits);
            if (progress) progress(n);
            if (s.logits) {
#pragma omp parallel for schedule(static)
                for (int r = 0; r < n; ++r) {
                    float* row = base.data() + static_cast<std::size_t>(r) * n_vocab;
                    log_softmax(row, n_vocab, row);
                }
                for (int r = 0; r < n; ++r) {
                    const float* row = base.data() + static_cast<std::size_t>(r) * n_vocab;
                    base_acc.add(compare_position(row, row, n_vocab, tok[s.begin + r + 1]));
                }
            }
            for (std::size_t i = 0; i < n_cfg; ++i) {
                seconds[i] +=
                    timed_forward(model, tok + s.begin, n, caches[i], other.data(), s.logits);
                if (progress) progress(n);
                if (!s.logits) continue;
#pragma omp parallel for schedule(static)
                for (int r = 0; r < n; ++r) {
                    const std::size_t off = static_cast<std::size_t>(r) * n_vocab;
                    log_softmax(other.data() + off, n_vocab, other.data() + off);
                    scored[r] = compare_position(base.data() + off, other.data() + off, n_vocab,
                                                 tok[s.begin + r + 1]);
                }
                for (int r = 0; r < n; ++r) acc[i].add(scored[r]);
            }
        }
        base_footprint = measure_footprint(base_caches);
        for (std::size_t i = 0; i < n_cfg; ++i) footprints[i] = measure_footprint(caches[i]);
    }

    auto result = [&](const NamedConfig& named, const QualityAccumulator& a,
                      const CacheFootprint& f, double secs) {
        QualityResult r;
        r.named = named;
        r.tokens_scored = a.count();
        r.kld = a.mean_kld();
        r.top1 = a.top1();
        r.ppl_base = base_acc.ppl_base();
        r.ppl = a.ppl();
        r.footprint = f;
        r.seconds = secs;
        return r;
    };
    report.baseline = result(baseline_config(), base_acc, base_footprint, base_seconds);
    for (std::size_t i = 0; i < n_cfg; ++i)
        report.results.push_back(result(configs[i], acc[i], footprints[i], seconds[i]));
    return report;
}

std::vector<std::vector<double>> measure_decode_speed(const LlamaModel& model,
                                                      const std::vector<int32_t>& tokens,
                                                      const std::vector<NamedConfig>& configs,
                                                      const std::vector<int>& contexts, int steps,
                                                      int batch, const TokenProgress& progress) {
    if (steps < 1) throw std::invalid_argument("measure_decode_speed: steps must be at least 1");
    std::vector<std::vector<double>> tps(configs.size(), std::vector<double>(contexts.size()));
    std::vector<float> logits(static_cast<std::size_t>(vocab_size(model)));
    for (int ctx : contexts)
        if (ctx < 1 || static_cast<std::size_t>(ctx) > tokens.size())
            throw std::invalid_argument("decode context " + std::to_string(ctx) +
                                        " needs that many tokens of text; the text has " +
                                        std::to_string(tokens.size()));
    for (std::size_t j = 0; j < contexts.size(); ++j) {
        const int ctx = contexts[j];
        Caches base = model.make_caches(baseline_config().config, ctx);
        prefill(model, tokens.data(), ctx, base, batch, logits.data(), progress);
        const int32_t first = argmax(logits.data(), static_cast<int>(logits.size()));
        for (std::size_t i = 0; i < configs.size(); ++i) {
            Caches caches = model.make_caches(configs[i].config, ctx + steps);
            for (std::size_t l = 0; l < caches.size(); ++l) {
                const std::size_t n =
                    static_cast<std::size_t>(base[l]->num_heads()) * ctx * base[l]->head_dim();
                std::vector<float> k(n), v(n);
                base[l]->dequantize(0, ctx, k.data(), v.data());
                caches[l]->append(k.data(), v.data(), ctx);
            }
            int32_t tok = first;
            const auto t0 = std::chrono::steady_clock::now();
            for (int s = 0; s < steps; ++s) {
                model.forward(&tok, 1, caches, logits.data(), false);
                tok = argmax(logits.data(), static_cast<int>(logits.size()));
                if (progress) progress(1);
            }
            tps[i][j] = steps / seconds_since(t0);
        }
    }
    return tps;
}

std::vector<NeedlePrompt> build_needle_prompts(const BPETokenizer& tokenizer,
                                               const std::vector<int32_t>& haystack_tokens,
                                               const NeedleOptions& opts) {
    std::mt19937_64 rng(opts.seed);
    std::uniform_int_distribution<int> digits(10000, 99999);
    std::vector<NeedlePrompt> prompts;
    for (int length : opts.lengths) {
        for (double depth : opts.depths) {
            if (depth < 0.0 || depth > 1.0)
                throw std::invalid_argument("needle depth must be in [0, 1], got " +
                                            std::to_string(depth));
            NeedlePrompt p;
            p.length = length;
            p.depth = depth;
            p.number = std::to_string(digits(rng));
            const std::string needle = " The special magic number is " + p.number + ". ";
            const int overhead =
                static_cast<int>(tokenizer.encode(render(tokenizer, needle)).size()) +
                opts.max_new_tokens;
            const int h = length - overhead;
            if (h < 1)
                throw std::invalid_argument("needle length " + std::to_string(length) +
                                            " leaves no room for a haystack (needs more than " +
                                            std::to_string(overhead) + " tokens)");
            if (static_cast<std::size_t>(h) > haystack_tokens.size())
                throw std::invalid_argument("needle length " + std::to_string(length) + " needs " +
                                            std::to_string(h) +
                                            " tokens of haystack text; the text has " +
                                            std::to_string(haystack_tokens.size()));
            const int cut =
                snap_to_boundary(tokenizer, haystack_tokens, static_cast<int>(depth * h), h);
            const auto begin = haystack_tokens.begin();
            const std::string before = tokenizer.decode(std::vector<int32_t>(begin, begin + cut));
            const std::string after =
                tokenizer.decode(std::vector<int32_t>(begin + cut, begin + h));
            p.tokens = tokenizer.encode(render(tokenizer, before + needle + after));
            prompts.push_back(std::move(p));
        }
    }
    return prompts;
}

int64_t needle_work(const std::vector<NeedlePrompt>& prompts, const NeedleOptions& opts) {
    int64_t n = 0;
    for (const NeedlePrompt& p : prompts)
        n += static_cast<int64_t>(p.tokens.size()) + opts.max_new_tokens;
    return n;
}

NeedleResult run_needle(const LlamaModel& model, const BPETokenizer& tokenizer,
                        const std::vector<NeedlePrompt>& prompts, const KVCacheConfig& config,
                        const NeedleOptions& opts, const TokenProgress& progress) {
    const auto t0 = std::chrono::steady_clock::now();
    NeedleResult result;
    std::vector<float> logits(static_cast<std::size_t>(vocab_size(model)));
    int found = 0;
    for (const NeedlePrompt& p : prompts) {
        const int n = static_cast<int>(p.tokens.size());
        auto caches = model.make_caches(config, n + opts.max_new_tokens);
        prefill(model, p.tokens.data(), n, caches, opts.batch, logits.data(), progress);
        const std::vector<int32_t> answer =
            greedy_decode(model, tokenizer, caches, logits, opts.max_new_tokens, [&](int32_t) {
                if (progress) progress(1);
            });
        // An early end of generation completes the case's share of the work.
        if (progress) progress(opts.max_new_tokens - static_cast<int>(answer.size()));
        NeedleCase c;
        c.length = p.length;
        c.depth = p.depth;
        c.prompt_tokens = n;
        c.number = p.number;
        c.answer = tokenizer.decode(answer);
        c.found = c.answer.find(p.number) != std::string::npos;
        found += c.found ? 1 : 0;
        result.cases.push_back(std::move(c));
    }
    result.score = prompts.empty() ? 0.0 : static_cast<double>(found) / prompts.size();
    result.seconds = seconds_since(t0);
    return result;
}

}  // namespace veloxquant
