// GPT-2 style byte-level BPE tokenizer for Llama-family GGUF models (tokenizer.ggml.model =
// "gpt2"), with the pre-tokenizer of the "smollm" pre-type (llama.cpp LLAMA_VOCAB_PRE_TYPE_SMOLLM,
// Hugging Face Sequence[Digits(individual_digits), ByteLevel]).
//
// encode():
//   1. optionally split the text on the texts of control and user-defined tokens
//      (leftmost match, longest first at a position);
//   2. pre-tokenize each remaining fragment: every \p{N} code point becomes its own piece, then
//      the GPT-2 pattern 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//      runs over each piece (hand-written over the table in unicode_data.h, no regex engine);
//   3. every byte of a piece starts as the token of its bytes_to_unicode character, falling back
//      to the "<0xNN>" byte token; a byte with neither is dropped (as Hugging Face does without
//      an unk token, and llama.cpp does);
//   4. adjacent symbols merge by lowest merge rank, ties to the leftmost pair.
// Invalid UTF-8 never throws: each undecodable byte is a code point of its own that is neither a
// letter, a number nor whitespace, and it keeps its byte through the BPE.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace veloxquant {

class GGUFFile;

/// tokenizer.ggml.token_type values.
enum TokenType : int32_t {
    kTokenNormal = 1,
    kTokenUnknown = 2,
    kTokenControl = 3,
    kTokenUserDefined = 4,
    kTokenUnused = 5,
    kTokenByte = 6,
};

class BPETokenizer {
public:
    struct Vocab {
        std::vector<std::string> tokens;   ///< token texts by id, in bytes_to_unicode form
        std::vector<int32_t> token_types;  ///< TokenType per id; empty means all normal
        std::vector<std::string> merges;   ///< "left right", by rank
        std::string pre;                   ///< pre-tokenizer name; only "smollm" is supported
        int bos_id = -1;
        int eos_id = -1;
        int unk_id = -1;
        bool add_bos = false;
        std::string chat_template;  ///< Jinja source, as shipped in the GGUF
    };

    /// Throws std::invalid_argument on an inconsistent vocabulary (type count, special ids out of
    /// range, a merge without a separating space) or an unsupported pre-tokenizer name.
    explicit BPETokenizer(Vocab vocab);

    /// Token ids of `text`; special-token texts become their ids when parse_special.
    /// Prepends BOS only when the vocabulary's add_bos is set.
    std::vector<int32_t> encode(const std::string& text, bool parse_special = true) const;
    /// Concatenated pieces; throws std::out_of_range on an invalid id.
    std::string decode(const std::vector<int32_t>& ids) const;
    /// Raw bytes of one token (control and user-defined tokens give their text).
    std::string token_to_piece(int32_t id) const;

    int vocab_size() const { return static_cast<int>(vocab_.tokens.size()); }
    int bos_id() const { return vocab_.bos_id; }
    int eos_id() const { return vocab_.eos_id; }
    /// End of generation: eos, <|im_end|> or <|endoftext|>.
    bool is_eog(int32_t id) const;

    /// Renders (role, content) messages with the vocabulary's ChatML template:
    /// "<|im_start|>role\ncontent<|im_end|>\n" per message, the template's default system
    /// message first when the first message is not a system one, and "<|im_start|>assistant\n"
    /// when add_generation_prompt. Throws std::runtime_error for an unrecognised template.
    std::string apply_chat_template(
        const std::vector<std::pair<std::string, std::string>>& messages,
        bool add_generation_prompt) const;

private:
    struct Merge {
        int32_t rank;
        int32_t result;
    };
    struct Workspace;  // per-encode scratch buffers

    void encode_fragment(const std::string& text, std::size_t begin, std::size_t end, Workspace& ws,
                         std::vector<int32_t>& out) const;
    void encode_piece(const std::string& text, std::size_t begin, std::size_t end, Workspace& ws,
                      std::vector<int32_t>& out) const;
    void parse_chat_template();

    Vocab vocab_;
    std::unordered_map<uint64_t, Merge> merges_;  // (left id << 32 | right id) -> merge
    std::array<int32_t, 256> byte_tokens_{};      // initial symbol per byte, -1 = dropped
    // Control and user-defined token ids by the first byte of their text, longest text first.
    std::array<std::vector<int32_t>, 256> specials_by_first_byte_;
    std::vector<std::string> pieces_;  // decoded bytes per id
    std::vector<int32_t> eog_ids_;
    bool chatml_ = false;  // the template is a recognised ChatML one
    bool has_default_system_ = false;
    std::string default_system_;
};

/// Reads the tokenizer.* keys of a GGUF file; throws std::runtime_error when the tokenizer model
/// is not "gpt2" or a required key is missing.
BPETokenizer::Vocab vocab_from_gguf(const GGUFFile& file);

}  // namespace veloxquant
