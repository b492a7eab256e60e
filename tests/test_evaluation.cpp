// Evaluation maths (log-softmax, KL divergence, top-1, perplexity), chunking and scored
// positions, the comparison sweep, and, where the real model is present, needle prompts and a
// short evaluation against the fp16 cache.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "model/evaluation.h"
#include "model/gguf.h"
#include "model/llama_model.h"
#include "model/tokenizer.h"

using namespace veloxquant;

namespace {

std::vector<float> log_probs(std::vector<float> logits) {
    log_softmax(logits.data(), static_cast<int>(logits.size()), logits.data());
    return logits;
}

TEST(EvaluationMath, LogSoftmaxNormalisesAndKeepsDifferences) {
    const std::vector<float> lp = log_probs({1.0f, 2.0f, 3.0f, 1000.0f});
    double total = 0.0;
    for (float x : lp) total += std::exp(static_cast<double>(x));
    EXPECT_NEAR(total, 1.0, 1e-6);
    EXPECT_NEAR(lp[1] - lp[0], 1.0, 1e-4);
    EXPECT_NEAR(lp[3], 0.0, 1e-6);  // no overflow for large logits
    const std::vector<float> uniform = log_probs({5.0f, 5.0f, 5.0f, 5.0f});
    for (float x : uniform) EXPECT_NEAR(x, std::log(0.25), 1e-6);
}

TEST(EvaluationMath, IdenticalDistributionsGiveZeroKldAndAgreement) {
    const std::vector<float> lp = log_probs({0.3f, -1.0f, 2.5f, 0.0f, 1.0f});
    const TokenComparison c = compare_position(lp.data(), lp.data(), 5, 2);
    EXPECT_EQ(c.kld, 0.0);
    EXPECT_TRUE(c.top1);
    EXPECT_EQ(c.nll_base, c.nll);
    EXPECT_NEAR(c.nll, -lp[2], 1e-7);
}

TEST(EvaluationMath, KnownKullbackLeibler) {
    // p = (1/2, 1/2), q = (1/4, 3/4): KL(p || q) = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3).
    const std::vector<float> p = log_probs({0.0f, 0.0f});
    const std::vector<float> q = log_probs({std::log(0.25f), std::log(0.75f)});
    const TokenComparison c = compare_position(p.data(), q.data(), 2, 0);
    EXPECT_NEAR(c.kld, 0.5 * std::log(4.0 / 3.0), 1e-6);
    EXPECT_NEAR(c.nll_base, std::log(2.0), 1e-6);
    EXPECT_NEAR(c.nll, std::log(4.0), 1e-6);
    EXPECT_FALSE(c.top1);  // p's first maximum (0) is not q's (1)
}

TEST(EvaluationMath, TopOneDisagreementAndKlAsymmetry) {
    const std::vector<float> p = log_probs({std::log(0.7f), std::log(0.2f), std::log(0.1f)});
    const std::vector<float> q = log_probs({std::log(0.3f), std::log(0.6f), std::log(0.1f)});
    const TokenComparison pq = compare_position(p.data(), q.data(), 3, 1);
    const TokenComparison qp = compare_position(q.data(), p.data(), 3, 1);
    EXPECT_FALSE(pq.top1);
    const double expect_pq = 0.7 * std::log(0.7 / 0.3) + 0.2 * std::log(0.2 / 0.6);
    const double expect_qp = 0.3 * std::log(0.3 / 0.7) + 0.6 * std::log(0.6 / 0.2);
    EXPECT_NEAR(pq.kld, expect_pq, 1e-6);
    EXPECT_NEAR(qp.kld, expect_qp, 1e-6);
    EXPECT_THROW(compare_position(p.data(), q.data(), 3, 3), std::out_of_range);
}

TEST(EvaluationMath, AccumulatorMeansAndPerplexity) {
    QualityAccumulator acc;
    EXPECT_EQ(acc.count(), 0);
    EXPECT_EQ(acc.mean_kld(), 0.0);
    acc.add({0.1, true, std::log(2.0), std::log(4.0)});
    acc.add({0.3, false, std::log(8.0), std::log(4.0)});
    EXPECT_EQ(acc.count(), 2);
    EXPECT_NEAR(acc.mean_kld(), 0.2, 1e-12);
    EXPECT_NEAR(acc.top1(), 0.5, 1e-12);
    EXPECT_NEAR(acc.ppl_base(), 4.0, 1e-9);  // exp(mean(ln 2, ln 8)) = sqrt(16)
    EXPECT_NEAR(acc.ppl(), 4.0, 1e-9);
}

TEST(EvaluationChunks, CountsWholeChunksUpToTheCap) {
    EvalOptions o;
    o.ctx = 2048;
    EXPECT_EQ(count_chunks(10000, o), 4);
    EXPECT_EQ(count_chunks(2047, o), 0);
    o.max_chunks = 2;
    EXPECT_EQ(count_chunks(10000, o), 2);
    o.max_chunks = 9;
    EXPECT_EQ(count_chunks(10000, o), 4);
}

TEST(EvaluationChunks, SpansSplitAtTheFirstScoredLogit) {
    EvalOptions o;
    o.ctx = 8;
    o.batch = 2;
    EXPECT_EQ(o.resolved_score_from(), 4);
    EXPECT_EQ(o.scored_per_chunk(), 4);
    // Positions 0..6 are fed; logits at 3..6 predict the tokens at 4..7.
    const std::vector<PrefillSpan> s = prefill_spans(o);
    ASSERT_EQ(s.size(), 4u);
    const int expect[4][3] = {{0, 2, 0}, {2, 3, 0}, {3, 5, 1}, {5, 7, 1}};
    int scored = 0;
    for (int i = 0; i < 4; ++i) {
        EXPECT_EQ(s[i].begin, expect[i][0]);
        EXPECT_EQ(s[i].end, expect[i][1]);
        EXPECT_EQ(s[i].logits, expect[i][2] == 1);
        if (s[i].logits) scored += s[i].end - s[i].begin;
    }
    EXPECT_EQ(scored, o.scored_per_chunk());

    o.score_from = 1;  // every token but the first is scored: one span of logits from 0
    o.batch = 256;
    const std::vector<PrefillSpan> all = prefill_spans(o);
    ASSERT_EQ(all.size(), 1u);
    EXPECT_EQ(all[0].begin, 0);
    EXPECT_EQ(all[0].end, 7);
    EXPECT_TRUE(all[0].logits);
}

TEST(EvaluationChunks, RejectsImpossibleOptions) {
    EvalOptions o;
    o.ctx = 1;
    EXPECT_THROW(o.validate(), std::invalid_argument);
    o.ctx = 16;
    o.score_from = 16;
    EXPECT_THROW(o.validate(), std::invalid_argument);
    o.score_from = 0;
    EXPECT_THROW(o.validate(), std::invalid_argument);
    o.score_from = -1;
    o.batch = 0;
    EXPECT_THROW(o.validate(), std::invalid_argument);
}

TEST(EvaluationSweep, DefaultsThenEachBitWidth) {
    const auto sweep = sweep_configs({"turboquant_rvq", "qjl", "rabitq"}, {2, 4}, 64);
    ASSERT_EQ(sweep.size(), 9u);
    EXPECT_EQ(sweep[0].label, "turboquant_rvq b=1 r=2 v=2 (defaults)");
    EXPECT_EQ(sweep[1].config.sketch_dim, KVCacheConfig{}.sketch_dim);
    const KVCacheConfig& tq2 = sweep[3].config;
    EXPECT_EQ(tq2.method, "turboquant_rvq");
    EXPECT_EQ(tq2.bits, 2);
    EXPECT_EQ(tq2.num_residuals, 1);
    EXPECT_EQ(tq2.value_bits, 2);
    EXPECT_EQ(sweep[7].config.sketch_dim, 4 * 64);
    EXPECT_EQ(sweep[7].label, "qjl m=256 v=4");
    EXPECT_EQ(sweep[8].label, "rabitq b=4 c=64 v=4");
    EXPECT_EQ(baseline_config().config.method, "fp16");
}

// ---- the real model ----

std::string model_path() {
    if (const char* env = std::getenv("VQ_GGUF_MODEL")) return env;
    const std::string here = __FILE__;  // <repo>/tests/test_evaluation.cpp
    return here.substr(0, here.size() - std::string("tests/test_evaluation.cpp").size()) +
           "models/SmolLM2-135M-Instruct.Q4_1.gguf";
}

const char* kText =
    "The history of the city begins with a small settlement on the river, where traders met to "
    "exchange grain, salt and cloth. Over the following centuries the town grew into a regional "
    "centre, and its market drew merchants from distant provinces. In 1820 a fire destroyed "
    "much of the old quarter; the council rebuilt the streets in stone and widened the main "
    "square. The railway arrived in 1862, and with it new factories, schools and a hospital. ";

TEST(EvaluationModel, NeedlePromptsHaveTheirLengthAndNumber) {
    const std::string path = model_path();
    if (!std::ifstream(path).good()) GTEST_SKIP() << path << " not present";
    const BPETokenizer tok(vocab_from_gguf(*GGUFFile::open(path)));
    std::string text;
    for (int i = 0; i < 12; ++i) text += kText;
    NeedleOptions o;
    o.lengths = {512};
    o.depths = {0.1, 0.9};
    const auto prompts = build_needle_prompts(tok, tok.encode(text, false), o);
    ASSERT_EQ(prompts.size(), 2u);
    for (const NeedlePrompt& p : prompts) {
        EXPECT_EQ(p.number.size(), 5u);
        const int total = static_cast<int>(p.tokens.size()) + o.max_new_tokens;
        EXPECT_LE(std::abs(total - 512), 8) << total;
        const std::string decoded = tok.decode(p.tokens);
        const std::size_t at = decoded.find("magic number is " + p.number);
        ASSERT_NE(at, std::string::npos);
        EXPECT_EQ(decoded.rfind("<|im_start|>assistant\n"), decoded.size() - 22);
        const double depth = static_cast<double>(at) / decoded.size();
        EXPECT_NEAR(depth, p.depth, 0.15);
    }
    o.lengths = {20};
    EXPECT_THROW(build_needle_prompts(tok, tok.encode(text, false), o), std::invalid_argument);
}

TEST(EvaluationModel, ShortEvalAgainstTheBaseline) {
    const std::string path = model_path();
    if (!std::ifstream(path).good()) GTEST_SKIP() << path << " not present";
    const auto model = LlamaModel::load(path);
    const BPETokenizer tok(vocab_from_gguf(model->gguf()));
    std::string text;
    for (int i = 0; i < 3; ++i) text += kText;
    const std::vector<int32_t> tokens = tok.encode(text, false);

    std::vector<NamedConfig> configs = {baseline_config()};
    for (int b : {4, 1}) {
        NamedConfig c;
        c.config.method = "turboquant_rvq";
        c.config.bits = b;
        c.config.num_residuals = 1;
        c.config.value_bits = b;
        c.label = config_label(c.config);
        configs.push_back(c);
    }
    EvalOptions o;
    o.ctx = 128;
    o.max_chunks = 1;
    o.batch = 48;  // several sub-chunks, one of them straddling score_from
    int64_t progressed = 0;
    const QualityReport r =
        evaluate_quality(*model, tokens, configs, o, [&](int64_t n) { progressed += n; });
    EXPECT_EQ(r.chunks, 1);
    EXPECT_EQ(progressed, 4 * 127);
    ASSERT_EQ(r.results.size(), 3u);
    for (const QualityResult& q : r.results) EXPECT_EQ(q.tokens_scored, 64);
    EXPECT_EQ(r.results[0].kld, 0.0);
    EXPECT_EQ(r.results[0].top1, 1.0);
    EXPECT_EQ(r.results[0].ppl, r.baseline.ppl);
    EXPECT_GT(r.baseline.ppl, 1.0);
    EXPECT_LT(r.baseline.ppl, 100.0);  // repeated text is easy to predict
    EXPECT_GT(r.results[1].kld, 0.0);
    EXPECT_LT(r.results[1].kld, r.results[2].kld);
    EXPECT_EQ(r.baseline.footprint.tokens, 127);
    EXPECT_NEAR(r.baseline.footprint.key_bits, 16.0, 1e-9);
    EXPECT_LT(r.results[1].footprint.bytes_per_token(), r.baseline.footprint.bytes_per_token());
    EXPECT_NEAR(r.results[1].footprint.key_bits, 4.5, 0.1);  // 4-bit codes and a float32 norm
}

}  // namespace
