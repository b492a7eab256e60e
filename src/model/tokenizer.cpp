#include "model/tokenizer.h"

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <functional>
#include <stdexcept>

#include "model/gguf.h"
#include "model/unicode_data.h"

namespace veloxquant {
namespace {

constexpr uint32_t kInvalidCodepoint = 0xFFFFFFFFu;  // an undecodable byte; flags 0

// Decodes the code point starting at s[i] (i < s.size()) and returns its length in bytes.
// Truncated, overlong, surrogate or out-of-range sequences and stray continuation bytes give length
// 1 and kInvalidCodepoint, so every byte of any input belongs to exactly one code point.
std::size_t decode_utf8(const std::string& s, std::size_t i, uint32_t* cp) {
    const auto lead = static_cast<uint8_t>(s[i]);
    *cp = kInvalidCodepoint;
    if (lead < 0x80) {
        *cp = lead;
        return 1;
    }
    std::size_t len;
    uint32_t v;
    uint32_t min;
    if ((lead & 0xE0) == 0xC0) {
        len = 2, v = lead & 0x1Fu, min = 0x80;
    } else if ((lead & 0xF0) == 0xE0) {
        len = 3, v = lead & 0x0Fu, min = 0x800;
    } else if ((lead & 0xF8) == 0xF0) {
        len = 4, v = lead & 0x07u, min = 0x10000;
    } else {
        return 1;
    }
    if (s.size() - i < len) return 1;
    for (std::size_t k = 1; k < len; ++k) {
        const auto b = static_cast<uint8_t>(s[i + k]);
        if ((b & 0xC0) != 0x80) return 1;
        v = (v << 6) | (b & 0x3Fu);
    }
    if (v < min || v > kMaxCodepoint || (v >= 0xD800 && v <= 0xDFFF)) return 1;
    *cp = v;
    return len;
}

void append_utf8(uint32_t cp, std::string& out) {
    if (cp < 0x80) {
        out += static_cast<char>(cp);
    } else if (cp < 0x800) {
        out += static_cast<char>(0xC0 | (cp >> 6));
        out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
        out += static_cast<char>(0xE0 | (cp >> 12));
        out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
        out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
        out += static_cast<char>(0xF0 | (cp >> 18));
        out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
        out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
        out += static_cast<char>(0x80 | (cp & 0x3F));
    }
}

// GPT-2's bytes_to_unicode: the printable bytes '!'..'~', U+00A1..U+00AC and U+00AE..U+00FF map
// to themselves, every other byte to U+0100 + k in increasing byte order (so at most U+0143).
struct ByteTable {
    std::array<std::string, 256> utf8;   // byte -> its character, UTF-8 encoded
    std::array<int16_t, 0x144> byte_of;  // character -> byte, -1 if none
};

const ByteTable& byte_table() {
    static const ByteTable table = [] {
        ByteTable t;
        t.byte_of.fill(-1);
        uint32_t next = 0x100;
        for (uint32_t b = 0; b < 256; ++b) {
            const bool printable =
                (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
            const uint32_t cp = printable ? b : next++;
            append_utf8(cp, t.utf8[b]);
            t.byte_of[cp] = static_cast<int16_t>(b);
        }
        return t;
    }();
    return table;
}

// The bytes a token stands for: normal tokens map back through bytes_to_unicode (a character
// outside the table is kept as is), "<0xNN>" byte tokens give their byte, and control,
// user-defined and other tokens give their text.
std::string token_bytes(const std::string& text, int32_t type) {
    unsigned byte = 0;
    if (type == kTokenByte && std::sscanf(text.c_str(), "<0x%02X>", &byte) == 1) {
        return std::string(1, static_cast<char>(byte));
    }
    if (type != kTokenNormal) return text;
    const ByteTable& bytes = byte_table();
    std::string out;
    for (std::size_t i = 0; i < text.size();) {
        uint32_t cp;
        const std::size_t len = decode_utf8(text, i, &cp);
        if (cp < bytes.byte_of.size() && bytes.byte_of[cp] >= 0) {
            out += static_cast<char>(bytes.byte_of[cp]);
        } else {
            out.append(text, i, len);
        }
        i += len;
    }
    return out;
}

// Appends the pieces of the GPT-2 pattern
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// over code points [lo, hi) as their end indices. Alternatives are tried in pattern order at each
// match start; the lookahead sees only this range, as the regex sees only its input piece.
void split_gpt2(const std::vector<uint32_t>& cps, const std::vector<uint8_t>& flags, std::size_t lo,
                std::size_t hi, std::vector<std::size_t>& ends) {
    constexpr uint8_t kClassMask = kUnicodeLetter | kUnicodeNumber | kUnicodeWhitespace;
    std::size_t pos = lo;
    while (pos < hi) {
        const uint32_t c = cps[pos];
        std::size_t end = pos;
        if (c == '\'' && pos + 1 < hi) {
            const uint32_t c1 = cps[pos + 1];
            const uint32_t c2 = pos + 2 < hi ? cps[pos + 2] : 0;
            if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') {
                end = pos + 2;
            } else if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') ||
                       (c1 == 'l' && c2 == 'l')) {
                end = pos + 3;
            }
        }
        if (end == pos) {
            // " ?" prefix for the letter, number and other-symbol alternatives.
            std::size_t i = (c == ' ' && pos + 1 < hi) ? pos + 1 : pos;
            const uint8_t cls = flags[i] & kClassMask;
            if (cls == kUnicodeLetter || cls == kUnicodeNumber) {
                while (i < hi && (flags[i] & kClassMask) == cls) ++i;
                end = i;
            } else if (cls == 0) {
                while (i < hi && (flags[i] & kClassMask) == 0) ++i;
                end = i;
            }
        }
        if (end == pos) {
            // Only whitespace is left: \s+(?!\S) leaves the last space of a run that is followed
            // by a non-space for the next match, \s+ takes a lone one.
            while (end < hi && (flags[end] & kUnicodeWhitespace)) ++end;
            if (end < hi && end - pos > 1) --end;
        }
        ends.push_back(end);
        pos = end;
    }
}

// A BPE symbol: a token id in a doubly linked list over the piece's bytes.
struct Symbol {
    int32_t id;  // -1 once merged into its left neighbour
    int32_t prev;
    int32_t next;
};

// A candidate merge of symbols left and right (right = symbols[left].next when pushed).
struct Candidate {
    int32_t rank;
    int32_t left;
    int32_t right;
    int32_t left_id;
    int32_t right_id;
    int32_t result;
    // Heap order: lowest rank first, then leftmost.
    bool operator>(const Candidate& o) const {
        return rank != o.rank ? rank > o.rank : left > o.left;
    }
};

uint64_t pair_key(int32_t left, int32_t right) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) |
           static_cast<uint32_t>(right);
}

// A Jinja template reduced for comparison: whitespace inside {% %} / {{ }} tags (outside string
// literals) is dropped, literals are unescaped and quoted with ', and whitespace-control dashes
// are applied. Raw text between tags is kept, except the newline that trim_blocks removes after
// a {% %} tag and the template's final newline.
std::string normalize_template(const std::string& t) {
    const std::size_t n = t.size();
    auto is_space = [](char c) { return std::isspace(static_cast<unsigned char>(c)) != 0; };
    auto opens_at = [&](std::size_t j) {
        return j + 1 < n && t[j] == '{' && (t[j + 1] == '%' || t[j + 1] == '{');
    };
    auto closes_at = [&](std::size_t j) {
        return j + 1 < n && (t[j] == '%' || t[j] == '}') && t[j + 1] == '}';
    };
    std::string out;
    bool in_tag = false;
    char quote = 0;
    for (std::size_t i = 0; i < n; ++i) {
        const char c = t[i];
        if (!in_tag && opens_at(i)) {
            const bool trim_left = i + 2 < n && t[i + 2] == '-';
            while (trim_left && !out.empty() && is_space(out.back())) out.pop_back();
            out.append(t, i, 2);
            i += trim_left ? 2 : 1;
            in_tag = true;
        } else if (!in_tag) {
            out += c;  // raw text
        } else if (quote != 0) {
            if (c == '\\' && i + 1 < n) {
                const char e = t[++i];
                out += e == 'n' ? '\n' : e == 't' ? '\t' : e;
            } else if (c == quote) {
                out += '\'';
                quote = 0;
            } else {
                out += c;
            }
        } else if (c == '\'' || c == '"') {
            out += '\'';
            quote = c;
        } else if (closes_at(i) || (c == '-' && closes_at(i + 1))) {
            const bool trim_right = c == '-';
            i += trim_right ? 1 : 0;
            out.append(t, i, 2);
            const bool block = t[i] == '%';
            ++i;
            in_tag = false;
            if (trim_right) {
                while (i + 1 < n && is_space(t[i + 1])) ++i;
            } else if (block && i + 1 < n && t[i + 1] == '\n') {
                ++i;  // trim_blocks
            }
        } else if (!is_space(c)) {
            out += c;
        }
    }
    if (!out.empty() && out.back() == '\n') out.pop_back();
    return out;
}

}  // namespace

struct BPETokenizer::Workspace {
    std::vector<uint32_t> cps;
    std::vector<uint8_t> flags;
    std::vector<std::size_t> offsets;  // byte offset of each code point, plus the end
    std::vector<std::size_t> piece_ends;
    std::vector<Symbol> symbols;
    std::vector<Candidate> heap;
};

BPETokenizer::BPETokenizer(Vocab vocab) : vocab_(std::move(vocab)) {
    const std::size_t n = vocab_.tokens.size();
    if (vocab_.token_types.empty()) vocab_.token_types.assign(n, kTokenNormal);
    if (vocab_.token_types.size() != n) {
        throw std::invalid_argument("tokenizer: " + std::to_string(vocab_.token_types.size()) +
                                    " token types for " + std::to_string(n) + " tokens");
    }
    for (const int id : {vocab_.bos_id, vocab_.eos_id, vocab_.unk_id}) {
        if (id < -1 || id >= static_cast<int>(n)) {
            throw std::invalid_argument("tokenizer: special token id " + std::to_string(id) +
                                        " outside the vocabulary");
        }
    }
    if (vocab_.pre != "smollm") {
        throw std::invalid_argument("tokenizer: unsupported pre-tokenizer '" + vocab_.pre +
                                    "' (only smollm)");
    }

    std::unordered_map<std::string, int32_t> token_ids;
    token_ids.reserve(n);
    for (std::size_t id = 0; id < n; ++id) {
        token_ids.emplace(vocab_.tokens[id], static_cast<int32_t>(id));
    }
    auto find_id = [&token_ids](const std::string& text) {
        const auto it = token_ids.find(text);
        return it == token_ids.end() ? -1 : it->second;
    };

    // Merges whose sides or result are not tokens can never apply to id symbols; skip them.
    merges_.reserve(vocab_.merges.size());
    for (std::size_t rank = 0; rank < vocab_.merges.size(); ++rank) {
        const std::string& m = vocab_.merges[rank];
        const std::size_t cut = m.find(' ', 1);
        if (cut == std::string::npos) {
            throw std::invalid_argument("tokenizer: merge " + std::to_string(rank) + " '" + m +
                                        "' has no separating space");
        }
        const int32_t left = find_id(m.substr(0, cut));
        const int32_t right = find_id(m.substr(cut + 1));
        const int32_t result = find_id(m.substr(0, cut) + m.substr(cut + 1));
        if (left < 0 || right < 0 || result < 0) continue;
        merges_.emplace(pair_key(left, right), Merge{static_cast<int32_t>(rank), result});
    }

    const ByteTable& bytes = byte_table();
    for (int b = 0; b < 256; ++b) {
        char hex[8];
        std::snprintf(hex, sizeof hex, "<0x%02X>", b);
        const int32_t id = find_id(bytes.utf8[b]);
        byte_tokens_[b] = id >= 0 ? id : find_id(hex);
    }

    pieces_.resize(n);
    for (std::size_t id = 0; id < n; ++id) {
        const std::string& text = vocab_.tokens[id];
        const int32_t type = vocab_.token_types[id];
        pieces_[id] = token_bytes(text, type);
        if ((type == kTokenControl || type == kTokenUserDefined) && !text.empty()) {
            specials_by_first_byte_[static_cast<uint8_t>(text[0])].push_back(id);
        }
    }
    for (auto& ids : specials_by_first_byte_) {
        std::stable_sort(ids.begin(), ids.end(), [this](int32_t a, int32_t b) {
            return vocab_.tokens[a].size() > vocab_.tokens[b].size();
        });
    }

    if (vocab_.eos_id >= 0) eog_ids_.push_back(vocab_.eos_id);
    for (const char* text : {"<|im_end|>", "<|endoftext|>"}) {
        const int32_t id = find_id(text);
        if (id >= 0 && id != vocab_.eos_id) eog_ids_.push_back(id);
    }
    parse_chat_template();
}

std::vector<int32_t> BPETokenizer::encode(const std::string& text, bool parse_special) const {
    std::vector<int32_t> out;
    out.reserve(text.size() / 3 + 1);
    if (vocab_.add_bos && vocab_.bos_id >= 0) out.push_back(vocab_.bos_id);
    Workspace ws;
    std::size_t fragment = 0;  // start of the text not yet encoded
    std::size_t i = 0;
    while (parse_special && i < text.size()) {
        int32_t match = -1;
        for (const int32_t id : specials_by_first_byte_[static_cast<uint8_t>(text[i])]) {
            if (text.compare(i, vocab_.tokens[id].size(), vocab_.tokens[id]) == 0) {
                match = id;
                break;
            }
        }
        if (match < 0) {
            ++i;
            continue;
        }
        encode_fragment(text, fragment, i, ws, out);
        out.push_back(match);
        i += vocab_.tokens[match].size();
        fragment = i;
    }
    encode_fragment(text, fragment, text.size(), ws, out);
    return out;
}

void BPETokenizer::encode_fragment(const std::string& text, std::size_t begin, std::size_t end,
                                   Workspace& ws, std::vector<int32_t>& out) const {
    ws.cps.clear();
    ws.flags.clear();
    ws.offsets.clear();
    for (std::size_t i = begin; i < end;) {
        uint32_t cp;
        const std::size_t len = decode_utf8(text, i, &cp);
        ws.cps.push_back(cp);
        ws.flags.push_back(unicode_flags(cp));
        ws.offsets.push_back(i);
        i += len;
    }
    ws.offsets.push_back(end);

    // First pass: every \p{N} code point is a piece of its own; the GPT-2 pattern splits the gaps.
    ws.piece_ends.clear();
    const std::size_t n = ws.cps.size();
    std::size_t gap = 0;
    for (std::size_t i = 0; i <= n; ++i) {
        if (i < n && !(ws.flags[i] & kUnicodeNumber)) continue;
        split_gpt2(ws.cps, ws.flags, gap, i, ws.piece_ends);
        if (i < n) ws.piece_ends.push_back(i + 1);
        gap = i + 1;
    }
    std::size_t start = 0;
    for (const std::size_t piece_end : ws.piece_ends) {
        encode_piece(text, ws.offsets[start], ws.offsets[piece_end], ws, out);
        start = piece_end;
    }
}

void BPETokenizer::encode_piece(const std::string& text, std::size_t begin, std::size_t end,
                                Workspace& ws, std::vector<int32_t>& out) const {
    auto& sym = ws.symbols;
    sym.clear();
    for (std::size_t i = begin; i < end; ++i) {
        const int32_t id = byte_tokens_[static_cast<uint8_t>(text[i])];
        if (id < 0) continue;  // neither a byte character nor a <0xNN> token: dropped
        const auto k = static_cast<int32_t>(sym.size());
        sym.push_back(Symbol{id, k - 1, k + 1});
    }
    if (sym.empty()) return;
    sym.back().next = -1;

    auto& heap = ws.heap;
    heap.clear();
    auto push_pair = [&](int32_t left) {
        if (left < 0 || sym[left].next < 0) return;
        const int32_t right = sym[left].next;
        const auto it = merges_.find(pair_key(sym[left].id, sym[right].id));
        if (it == merges_.end()) return;
        heap.push_back(Candidate{it->second.rank, left, right, sym[left].id, sym[right].id,
                                 it->second.result});
        std::push_heap(heap.begin(), heap.end(), std::greater<Candidate>());
    };
    for (int32_t k = 0; k + 1 < static_cast<int32_t>(sym.size()); ++k) push_pair(k);

    while (!heap.empty()) {
        std::pop_heap(heap.begin(), heap.end(), std::greater<Candidate>());
        const Candidate c = heap.back();
        heap.pop_back();
        // Stale if either side was merged since: a symbol's id changes whenever it grows.
        Symbol& left = sym[c.left];
        if (left.id != c.left_id || left.next != c.right || sym[c.right].id != c.right_id) continue;
        Symbol& right = sym[c.right];
        left.id = c.result;
        left.next = right.next;
        if (right.next >= 0) sym[right.next].prev = c.left;
        right.id = -1;
        push_pair(left.prev);
        push_pair(c.left);
    }
    for (int32_t k = 0; k >= 0; k = sym[k].next) out.push_back(sym[k].id);
}

std::string BPETokenizer::decode(const std::vector<int32_t>& ids) const {
    std::string out;
    for (const int32_t id : ids) {
        if (id < 0 || id >= vocab_size()) {
            throw std::out_of_range("tokenizer: token id " + std::to_string(id) +
                                    " outside the vocabulary");
        }
        out += pieces_[id];
    }
    return out;
}

std::string BPETokenizer::token_to_piece(int32_t id) const {
    return decode({id});
}

bool BPETokenizer::is_eog(int32_t id) const {
    return std::find(eog_ids_.begin(), eog_ids_.end(), id) != eog_ids_.end();
}

void BPETokenizer::parse_chat_template() {
    // Normalized forms of the pieces of the ChatML template, e.g. SmolLM2's:
    //   {% for message in messages %}
    //   [{% if loop.first and messages[0]['role'] != 'system' %}
    //     {{ '<|im_start|>system\n<default system message><|im_end|>\n' }}{% endif %}]
    //   {{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}
    //   {% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}
    static const std::string kHead = "{%formessageinmessages%}";
    static const std::string kSystemOpen =
        "{%ifloop.firstandmessages[0]['role']!='system'%}{{'<|im_start|>system\n";
    static const std::string kSystemClose = "<|im_end|>\n'}}{%endif%}";
    static const std::string kTurnAndTail =
        "{{'<|im_start|>'+message['role']+'\n'+message['content']+'<|im_end|>'+'\n'}}"
        "{%endfor%}{%ifadd_generation_prompt%}{{'<|im_start|>assistant\n'}}{%endif%}";

    const std::string t = normalize_template(vocab_.chat_template);
    if (t.compare(0, kHead.size(), kHead) != 0) return;
    std::size_t pos = kHead.size();
    if (t.compare(pos, kSystemOpen.size(), kSystemOpen) == 0) {
        pos += kSystemOpen.size();
        const std::size_t close = t.find(kSystemClose, pos);
        if (close == std::string::npos) return;
        has_default_system_ = true;
        default_system_ = t.substr(pos, close - pos);
        pos = close + kSystemClose.size();
    }
    chatml_ = t.compare(pos, std::string::npos, kTurnAndTail) == 0;
}

std::string BPETokenizer::apply_chat_template(
    const std::vector<std::pair<std::string, std::string>>& messages,
    bool add_generation_prompt) const {
    if (!chatml_) {
        throw std::runtime_error(vocab_.chat_template.empty()
                                     ? "tokenizer: the vocabulary has no chat template"
                                     : "tokenizer: unrecognised chat template (only ChatML)");
    }
    std::string out;
    if (has_default_system_ && !messages.empty() && messages[0].first != "system") {
        out += "<|im_start|>system\n" + default_system_ + "<|im_end|>\n";
    }
    for (const auto& [role, content] : messages) {
        out += "<|im_start|>" + role + "\n" + content + "<|im_end|>\n";
    }
    if (add_generation_prompt) out += "<|im_start|>assistant\n";
    return out;
}

BPETokenizer::Vocab vocab_from_gguf(const GGUFFile& file) {
    const std::string model = file.get_string("tokenizer.ggml.model");
    if (model != "gpt2") {
        throw std::runtime_error("tokenizer: unsupported tokenizer.ggml.model '" + model +
                                 "' (only gpt2 byte-level BPE)");
    }
    auto to_id = [&](const char* key) {
        const int64_t v = file.get_int(key, -1);
        if (v < -1 || v > INT32_MAX) {
            throw std::runtime_error(std::string("tokenizer: ") + key + " out of range");
        }
        return static_cast<int>(v);
    };
    BPETokenizer::Vocab vocab;
    vocab.tokens = file.get_string_array("tokenizer.ggml.tokens");
    if (file.has("tokenizer.ggml.token_type")) {
        for (const int64_t t : file.get_int_array("tokenizer.ggml.token_type")) {
            vocab.token_types.push_back(static_cast<int32_t>(t));
        }
    }
    vocab.merges = file.get_string_array("tokenizer.ggml.merges");
    vocab.pre = file.has("tokenizer.ggml.pre") ? file.get_string("tokenizer.ggml.pre") : "";
    vocab.bos_id = to_id("tokenizer.ggml.bos_token_id");
    vocab.eos_id = to_id("tokenizer.ggml.eos_token_id");
    vocab.unk_id = to_id("tokenizer.ggml.unknown_token_id");
    vocab.add_bos = file.get_bool("tokenizer.ggml.add_bos_token", false);
    if (file.has("tokenizer.chat_template")) {
        vocab.chat_template = file.get_string("tokenizer.chat_template");
    }
    return vocab;
}

}  // namespace veloxquant
