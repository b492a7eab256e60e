// Fuzz target: the byte-level BPE tokenizer on arbitrary bytes. Byte-level BPE loses only the
// bytes its vocabulary has no token for (SmolLM2 has none for 0xF5..0xFF and a few others, which
// UTF-8 text never holds; they are dropped, as Hugging Face and llama.cpp drop them), so
// decode(encode(text)) is the text less those bytes, with or without special tokens parsed,
// whatever the bytes (invalid UTF-8 included), and every id is in range. The
// vocabulary is the default model's (VQ_MODEL, else models/SmolLM2-135M-Instruct.Q4_1.gguf)
// where that file exists, else the fuzz targets' small byte vocabulary.
#include <array>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "byte_vocab.h"
#include "fuzz_input.h"
#include "model/gguf.h"
#include "model/tokenizer.h"

namespace {

using veloxquant::BPETokenizer;

const BPETokenizer& tokenizer() {
    static const BPETokenizer tok = [] {
        std::string path = VQ_SOURCE_DIR "/models/SmolLM2-135M-Instruct.Q4_1.gguf";
        if (const char* env = std::getenv("VQ_MODEL"); env != nullptr && *env != '\0') path = env;
        if (std::filesystem::exists(path))
            return BPETokenizer(veloxquant::vocab_from_gguf(*veloxquant::GGUFFile::open(path)));
        return BPETokenizer(vqfuzz::byte_vocab());
    }();
    return tok;
}

// Whether byte b has no token: encoded alone, it gives no more ids than the empty text (a BOS).
const std::array<bool, 256>& dropped_bytes() {
    static const std::array<bool, 256> dropped = [] {
        const std::size_t empty = tokenizer().encode("", false).size();
        std::array<bool, 256> d{};
        for (int b = 0; b < 256; ++b)
            d[b] = tokenizer().encode(std::string(1, static_cast<char>(b)), false).size() == empty;
        return d;
    }();
    return dropped;
}

[[noreturn]] void finding(const char* what, bool parse_special) {
    std::fprintf(stderr, "fuzz_tokenizer: %s (parse_special %d)\n", what, parse_special);
    std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size) {
    const BPETokenizer& tok = tokenizer();
    const std::string text(reinterpret_cast<const char*>(data), size);
    std::string kept;
    for (const char c : text)
        if (!dropped_bytes()[static_cast<uint8_t>(c)]) kept += c;
    // A BOS that encode() prepends (where the vocabulary asks for one) decodes to its own text.
    const std::string bos = tok.bos_id() >= 0 ? tok.token_to_piece(tok.bos_id()) : "";
    for (const bool parse_special : {false, true}) {
        const std::vector<int32_t> ids = tok.encode(text, parse_special);
        for (const int32_t id : ids)
            if (id < 0 || id >= tok.vocab_size()) finding("an id out of range", parse_special);
        const std::string decoded = tok.decode(ids);
        if (decoded != kept && !(!ids.empty() && ids[0] == tok.bos_id() && decoded == bos + kept))
            finding("decode(encode(text)) differs from the text", parse_special);
    }
    return 0;
}
