// BPETokenizer: the algorithm on tiny hand-made vocabularies (no model needed), then the real
// SmolLM2 vocabulary against golden tokenizations from the Hugging Face `tokenizers` package
// (scripts/make_tokenizer_golden.py), its chat template, and encoding speed on wikitext-2.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <sstream>
#include <stdexcept>

#include "byte_symbols.h"
#include "model/gguf.h"
#include "model/tokenizer.h"

using namespace veloxquant;

namespace {

using Ids = std::vector<int32_t>;

// ---------------------------------------------------------------------------------------------
// Tiny vocabularies

// GPT-2 byte character for a printable ASCII byte is the byte itself; space is U+0120 "Ġ".
const std::string kSpace = "\xC4\xA0";

// A vocabulary of `tokens` (normal unless listed in `specials`, which are control tokens).
BPETokenizer::Vocab make_vocab(const std::vector<std::string>& tokens,
                               const std::vector<std::string>& merges,
                               const std::vector<std::string>& specials = {}) {
    BPETokenizer::Vocab v;
    v.pre = "smollm";
    for (const auto& s : specials) {
        v.tokens.push_back(s);
        v.token_types.push_back(kTokenControl);
    }
    for (const auto& t : tokens) {
        v.tokens.push_back(t);
        v.token_types.push_back(kTokenNormal);
    }
    v.merges = merges;
    return v;
}

// All 256 GPT-2 byte characters (in byte order, so id = byte + specials.size()), plus extras.
BPETokenizer::Vocab byte_vocab(const std::vector<std::string>& extra,
                               const std::vector<std::string>& merges,
                               const std::vector<std::string>& specials = {}) {
    std::vector<std::string> tokens = vqtest::gpt2_byte_symbols();
    tokens.insert(tokens.end(), extra.begin(), extra.end());
    return make_vocab(tokens, merges, specials);
}

// Id of a token text in a vocabulary (test helper; -1 if absent).
int32_t id_of(const BPETokenizer::Vocab& v, const std::string& text) {
    for (std::size_t i = 0; i < v.tokens.size(); ++i) {
        if (v.tokens[i] == text) return static_cast<int32_t>(i);
    }
    return -1;
}

TEST(TokenizerAlgorithm, MergesByLowestRank) {
    // "abc": (b,c) has rank 0, so it wins over (a,b) although (a,b) is further left.
    auto v = make_vocab({"a", "b", "c", "ab", "bc"}, {"b c", "a b"});
    BPETokenizer tok(v);
    EXPECT_EQ(tok.encode("abc"), (Ids{id_of(v, "a"), id_of(v, "bc")}));
    v.merges = {"a b", "b c"};
    BPETokenizer tok2(v);
    EXPECT_EQ(tok2.encode("abc"), (Ids{id_of(v, "ab"), id_of(v, "c")}));
}

TEST(TokenizerAlgorithm, MergesChainIntoLongerTokens) {
    auto v = make_vocab({"l", "o", "w", "e", "r", "lo", "low", "er", "lower"},
                        {"l o", "lo w", "e r", "low er"});
    BPETokenizer tok(v);
    EXPECT_EQ(tok.encode("lower"), (Ids{id_of(v, "lower")}));
    EXPECT_EQ(tok.encode("lowe"), (Ids{id_of(v, "low"), id_of(v, "e")}));
}

TEST(TokenizerAlgorithm, EqualRanksGoLeftmost) {
    auto v = make_vocab({"a", "aa", "aaaa"}, {"a a", "aa aa"});
    BPETokenizer tok(v);
    const int32_t a = id_of(v, "a"), aa = id_of(v, "aa"), aaaa = id_of(v, "aaaa");
    EXPECT_EQ(tok.encode("aaa"), (Ids{aa, a}));
    EXPECT_EQ(tok.encode("aaaaa"), (Ids{aaaa, a}));
    EXPECT_EQ(tok.encode("aaaaaaa"), (Ids{aaaa, aa, a}));
}

TEST(TokenizerAlgorithm, UnmergedPiecesFallBackToByteTokens) {
    // No "b a" merge: the piece stays as its byte tokens.
    auto v = make_vocab({"a", "b", "ab"}, {"a b"});
    BPETokenizer tok(v);
    EXPECT_EQ(tok.encode("ba"), (Ids{id_of(v, "b"), id_of(v, "a")}));
    EXPECT_EQ(tok.encode("bab"), (Ids{id_of(v, "b"), id_of(v, "ab")}));
}

TEST(TokenizerAlgorithm, MissingByteCharacterUsesHexByteTokenOrIsDropped) {
    auto v = make_vocab({"a", "b"}, {});
    v.tokens.push_back("<0x7A>");  // 'z' has no GPT-2 character token but a byte token
    v.token_types.push_back(kTokenByte);
    BPETokenizer tok(v);
    const Ids ids = tok.encode("azb");
    EXPECT_EQ(ids, (Ids{id_of(v, "a"), id_of(v, "<0x7A>"), id_of(v, "b")}));
    EXPECT_EQ(tok.decode(ids), "azb");
    // 'q' has neither: dropped, as Hugging Face (no unk token) and llama.cpp do.
    EXPECT_EQ(tok.encode("aqb"), (Ids{id_of(v, "a"), id_of(v, "b")}));
    EXPECT_TRUE(tok.encode("qqq").empty());
}

TEST(TokenizerAlgorithm, DigitsAreSplitIndividually) {
    // Merges across digits (and across the space before them) exist but must not apply.
    auto v = byte_vocab({"12", kSpace + "1", "x1"}, {"1 2", kSpace + " 1", "x 1"});
    BPETokenizer tok(v);
    EXPECT_EQ(tok.encode("x 12"),
              (Ids{id_of(v, "x"), id_of(v, kSpace), id_of(v, "1"), id_of(v, "2")}));
    EXPECT_EQ(tok.encode("x1"), (Ids{id_of(v, "x"), id_of(v, "1")}));
    // Superscript two is \p{N} too: its two UTF-8 bytes stay one piece of their own.
    EXPECT_EQ(tok.decode(tok.encode("a\xC2\xB2z")), "a\xC2\xB2z");
}

TEST(TokenizerAlgorithm, Gpt2PatternPieces) {
    // With every merge available, the tokens are exactly the pre-tokenizer's pieces.
    const std::vector<std::string> words = {
        "it", "'s", kSpace + "o", kSpace + "ok", "!?", kSpace + kSpace, kSpace + "x"};
    auto v = byte_vocab(words, {"i t", "' s", kSpace + " o", kSpace + "o k", "! ?",
                                kSpace + " " + kSpace, kSpace + " x"});
    BPETokenizer tok(v);
    auto ids = [&](std::initializer_list<std::string> texts) {
        Ids out;
        for (const auto& t : texts) out.push_back(id_of(v, t));
        return out;
    };
    EXPECT_EQ(tok.encode("it's ok!?"), ids({"it", "'s", kSpace + "ok", "!?"}));
    // "   x": the last space of the run goes with the word (\s+(?!\S)).
    EXPECT_EQ(tok.encode("   x"), ids({kSpace + kSpace, kSpace + "x"}));
    // Trailing whitespace stays one run; "\n" is its own piece before a letter.
    EXPECT_EQ(tok.encode("x  "), ids({"x", kSpace + kSpace}));
    EXPECT_EQ(tok.encode("\nx"), ids({"\xC4\x8A", "x"}));
    // "'S" is not a contraction (the pattern is case-sensitive): "'" and "S" split.
    EXPECT_EQ(tok.encode("'S"), ids({"'", "S"}));
}

TEST(TokenizerAlgorithm, SpecialTokensSplitTheText) {
    auto v = byte_vocab({"xy"}, {"x y"}, {"<|im_end|>", "<s>", "<s><t>"});
    BPETokenizer tok(v);
    const int32_t end = id_of(v, "<|im_end|>"), x = id_of(v, "x"), y = id_of(v, "y");
    EXPECT_EQ(tok.encode("x<|im_end|>y"), (Ids{x, end, y}));
    EXPECT_EQ(tok.encode("<|im_end|><|im_end|>"), (Ids{end, end}));
    // The longest special text wins at a position.
    EXPECT_EQ(tok.encode("<s><t>"), (Ids{id_of(v, "<s><t>")}));
    EXPECT_EQ(tok.encode("<s><u>").front(), id_of(v, "<s>"));
    // Without parse_special the text is ordinary bytes; decode gives the text back either way.
    const Ids plain = tok.encode("x<|im_end|>y", false);
    EXPECT_EQ(plain.size(), 12u);
    EXPECT_EQ(tok.decode(plain), "x<|im_end|>y");
    EXPECT_EQ(tok.decode(tok.encode("x<|im_end|>y")), "x<|im_end|>y");
    EXPECT_EQ(tok.token_to_piece(end), "<|im_end|>");
}

TEST(TokenizerAlgorithm, InvalidUtf8RoundTrips) {
    BPETokenizer tok(byte_vocab({}, {}));
    const std::vector<std::string> inputs = {
        "\xFF\xFE abc",          // bytes that never start a sequence
        "ab \xC3",               // truncated two-byte sequence at the end
        "\xE2\x82 x",            // truncated three-byte sequence
        "\xC0\xAF\xE0\x80\xAF",  // overlong encodings
        "\xED\xA0\x80 z",        // a UTF-16 surrogate
        "\xF4\x90\x80\x80",      // above U+10FFFF
        "\x80\x80 1\xBF",        // stray continuation bytes
        std::string("a\0b", 3),
    };
    for (const auto& s : inputs) {
        const Ids ids = tok.encode(s);
        EXPECT_EQ(ids.size(), s.size()) << "one byte token per byte without merges";
        EXPECT_EQ(tok.decode(ids), s);
    }
}

TEST(TokenizerAlgorithm, BosEosAndEndOfGeneration) {
    auto v = byte_vocab({}, {}, {"<|endoftext|>", "<|im_start|>", "<|im_end|>"});
    v.bos_id = 1;
    v.eos_id = 2;
    BPETokenizer plain(v);
    EXPECT_EQ(plain.encode("a"), (Ids{id_of(v, "a")}));
    v.add_bos = true;
    BPETokenizer tok(v);
    EXPECT_EQ(tok.encode("a"), (Ids{1, id_of(v, "a")}));
    EXPECT_EQ(tok.encode(""), (Ids{1}));
    EXPECT_EQ(tok.bos_id(), 1);
    EXPECT_EQ(tok.eos_id(), 2);
    EXPECT_EQ(tok.vocab_size(), 259);
    EXPECT_TRUE(tok.is_eog(0));
    EXPECT_FALSE(tok.is_eog(1));
    EXPECT_TRUE(tok.is_eog(2));
    EXPECT_FALSE(tok.is_eog(id_of(v, "a")));
    EXPECT_THROW(tok.decode({259}), std::out_of_range);
    EXPECT_THROW(tok.decode({-1}), std::out_of_range);
}

TEST(TokenizerAlgorithm, RejectsInconsistentVocabularies) {
    auto v = make_vocab({"a", "b"}, {"a b"});
    v.token_types.pop_back();
    EXPECT_THROW(BPETokenizer{v}, std::invalid_argument);
    v = make_vocab({"a", "b"}, {"ab"});
    EXPECT_THROW(BPETokenizer{v}, std::invalid_argument);
    v = make_vocab({"a"}, {});
    v.eos_id = 5;
    EXPECT_THROW(BPETokenizer{v}, std::invalid_argument);
    v = make_vocab({"a"}, {});
    v.pre = "llama3";
    EXPECT_THROW(BPETokenizer{v}, std::invalid_argument);
}

// SmolLM2-135M-Instruct's template, as shipped in its GGUF.
const char* kSmolTemplate =
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}";
const std::string kSmolSystem =
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n";

TEST(TokenizerChatTemplate, SmolLMTemplate) {
    auto v = make_vocab({"a"}, {});
    v.chat_template = kSmolTemplate;
    BPETokenizer tok(v);
    EXPECT_EQ(tok.apply_chat_template({{"user", "Hi"}}, true),
              kSmolSystem + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    EXPECT_EQ(tok.apply_chat_template(
                  {{"system", "Be brief."}, {"user", "Hi"}, {"assistant", "Yo"}}, false),
              "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
              "<|im_start|>assistant\nYo<|im_end|>\n");
    // No messages: the loop never runs, so no default system message either.
    EXPECT_EQ(tok.apply_chat_template({}, true), "<|im_start|>assistant\n");
}

TEST(TokenizerChatTemplate, PlainChatMLInAnotherLayout) {
    // The HF default ChatML template, with escapes, double quotes and whitespace control.
    auto v = make_vocab({"a"}, {});
    v.chat_template =
        "{%- for message in messages -%}\n  {{ \"<|im_start|>\" + message['role'] + \"\\n\" + "
        "message['content'] + '<|im_end|>' + '\\n' }}\n{%- endfor %}\n"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}\n";
    BPETokenizer tok(v);
    EXPECT_EQ(tok.apply_chat_template({{"user", "Hi"}}, true),
              "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
}

TEST(TokenizerChatTemplate, UnrecognisedTemplateThrows) {
    auto v = make_vocab({"a"}, {});
    BPETokenizer none(v);
    EXPECT_THROW(none.apply_chat_template({{"user", "Hi"}}, true), std::runtime_error);
    v.chat_template =
        "{{ bos_token }}{% for message in messages %}{{ '[INST] ' + message['content'] + "
        "' [/INST]' }}{% endfor %}";
    BPETokenizer other(v);
    EXPECT_THROW(other.apply_chat_template({{"user", "Hi"}}, true), std::runtime_error);
}

// ---------------------------------------------------------------------------------------------
// The real SmolLM2 vocabulary

std::string source_root() {
    const std::string file = __FILE__;
    const std::size_t cut = file.rfind("tests/");
    return cut == std::string::npos || cut == 0 ? "." : file.substr(0, cut - 1);
}

std::string env_or(const char* name, const std::string& fallback) {
    const char* v = std::getenv(name);
    return v != nullptr && *v != '\0' ? v : fallback;
}

bool read_file(const std::string& path, std::string& out) {
    std::ifstream in(path, std::ios::binary);
    if (!in) return false;
    std::ostringstream ss;
    ss << in.rdbuf();
    out = ss.str();
    return true;
}

class SmolLMTokenizer : public ::testing::Test {
protected:
    static void SetUpTestSuite() {
        const std::string path =
            env_or("VQ_MODEL", source_root() + "/models/SmolLM2-135M-Instruct.Q4_1.gguf");
        if (!std::ifstream(path)) return;
        tok_ = std::make_unique<BPETokenizer>(vocab_from_gguf(*GGUFFile::open(path)));
    }
    static void TearDownTestSuite() { tok_.reset(); }
    void SetUp() override {
        if (!tok_) GTEST_SKIP() << "model file not found (set VQ_MODEL)";
    }
    static std::unique_ptr<BPETokenizer> tok_;
};
std::unique_ptr<BPETokenizer> SmolLMTokenizer::tok_;

// Cases of a .inp file: each text is followed by the separator (llama.cpp's format).
std::vector<std::string> read_cases(const std::string& text) {
    const std::string sep = "\n__ggml_vocab_test__\n";
    std::vector<std::string> cases;
    for (std::size_t pos = 0, next; (next = text.find(sep, pos)) != std::string::npos;
         pos = next + sep.size()) {
        cases.push_back(text.substr(pos, next - pos));
    }
    return cases;
}

std::vector<Ids> read_ids(const std::string& text) {
    std::vector<Ids> rows;
    std::istringstream lines(text);
    for (std::string line; std::getline(lines, line);) {
        std::istringstream fields(line);
        Ids ids;
        for (int32_t id; fields >> id;) ids.push_back(id);
        rows.push_back(ids);
    }
    return rows;
}

TEST_F(SmolLMTokenizer, KnownIds) {
    EXPECT_EQ(tok_->encode("Hello world! 123"), (Ids{19556, 905, 17, 216, 33, 34, 35}));
    EXPECT_EQ(tok_->encode("<|im_start|>user"), (Ids{1, 4093}));
    EXPECT_EQ(tok_->vocab_size(), 49152);
    EXPECT_EQ(tok_->bos_id(), 1);
    EXPECT_EQ(tok_->eos_id(), 2);
    EXPECT_TRUE(tok_->is_eog(2));
    EXPECT_TRUE(tok_->is_eog(0));
    EXPECT_FALSE(tok_->is_eog(1));
}

TEST_F(SmolLMTokenizer, MatchesGoldenTokenizations) {
    const std::string dir = source_root() + "/tests/data/";
    std::string inp, out, plain_out;
    ASSERT_TRUE(read_file(dir + "tokenizer_golden.inp", inp));
    ASSERT_TRUE(read_file(dir + "tokenizer_golden.out", out));
    ASSERT_TRUE(read_file(dir + "tokenizer_golden.plain.out", plain_out));
    const auto cases = read_cases(inp);
    const auto expected = read_ids(out);
    const auto expected_plain = read_ids(plain_out);
    ASSERT_GT(cases.size(), 200u);
    ASSERT_EQ(expected.size(), cases.size());
    ASSERT_EQ(expected_plain.size(), cases.size());

    // Bytes without a token in this vocabulary (SmolLM2 lacks 21, e.g. 0x1D) are dropped.
    bool dropped[256] = {};
    for (int b = 0; b < 256; ++b) dropped[b] = tok_->encode(std::string(1, char(b))).empty();
    for (std::size_t i = 0; i < cases.size(); ++i) {
        const std::string& text = cases[i];
        const Ids ids = tok_->encode(text);
        EXPECT_EQ(ids, expected[i]) << "case " << i << ": \"" << text << "\"";
        EXPECT_EQ(tok_->encode(text, false), expected_plain[i]) << "case " << i << " (plain)";
        std::string kept;
        for (const char c : text) {
            if (!dropped[static_cast<uint8_t>(c)]) kept += c;
        }
        EXPECT_EQ(tok_->decode(ids), kept) << "case " << i;
    }
    std::printf("[          ] %zu golden cases\n", cases.size());
}

TEST_F(SmolLMTokenizer, ChatTemplateFromTheModel) {
    const std::string prompt = tok_->apply_chat_template({{"user", "What is 2+2?"}}, true);
    EXPECT_EQ(prompt, kSmolSystem +
                          "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                          "<|im_start|>assistant\n");
    const Ids ids = tok_->encode(prompt);
    // From the Hugging Face reference (scripts/make_tokenizer_golden.py's tokenizer).
    EXPECT_EQ(ids,
              (Ids{1,   9690, 198, 2683, 359,   253,  5356, 5646, 11173, 3365, 3511, 308,  34519,
                   28,  7018, 411, 407,  19712, 8182, 2,    198,  1,     4093, 198,  1780, 314,
                   216, 34,   27,  34,   47,    2,    198,  1,    520,   9531, 198}));
    EXPECT_EQ(tok_->decode(ids), prompt);
}

TEST_F(SmolLMTokenizer, EncodesWikitextQuickly) {
    const std::string path = env_or("VQ_WIKITEXT", "/work/shared/data/wikitext-2/test.txt");
    std::string text;
    if (!read_file(path, text)) GTEST_SKIP() << path << " not found (set VQ_WIKITEXT)";
    const auto t0 = std::chrono::steady_clock::now();
    const Ids ids = tok_->encode(text);
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("[          ] %zu bytes -> %zu tokens in %.3f s\n", text.size(), ids.size(),
                seconds);
    EXPECT_LT(seconds, 20.0);
    EXPECT_GT(ids.size(), text.size() / 8);
    EXPECT_EQ(tok_->decode(ids), text);
}

}  // namespace
