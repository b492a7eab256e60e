#!/usr/bin/env python3
"""Write golden tokenizations for tests/test_tokenizer.cpp, in llama.cpp's .inp/.out style.

The reference is the Hugging Face `tokenizers` package: a byte-level BPE built from the GGUF's
vocab and merges, with SmolLM's pre-tokenizer (a Sequence of Digits(individual_digits=True) and
ByteLevel(add_prefix_space=False, use_regex=True)) and its control tokens as special tokens.

Outputs (cases are separated by "\\n__ggml_vocab_test__\\n", one id line per case):
  tests/data/tokenizer_golden.inp        the input texts
  tests/data/tokenizer_golden.out        ids with special tokens parsed
  tests/data/tokenizer_golden.plain.out  ids with special-token texts treated as plain text

Usage: .venv/bin/python scripts/make_tokenizer_golden.py [model.gguf] [wikitext test.txt]
"""
import pathlib
import random
import sys

from gguf import GGUFReader
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "models/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_WIKITEXT = pathlib.Path("/work/shared/data/wikitext-2/test.txt")
SEPARATOR = "\n__ggml_vocab_test__\n"
TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED = 3, 4

# Hand-written cases: whitespace, contractions, numbers, code, scripts, special tokens.
HAND_CASES = [
    "",
    " ",
    "  ",
    "\t",
    "\n",
    "\n\n\n",
    " \n \n",
    "Hello world! 123",
    "Hello world",
    " Hello world",
    "  Hello   world  ",
    "hello\tworld\t\t tabs",
    "line one\nline two\r\nline three\n\n  indented\n",
    "trailing spaces   ",
    "I'm sure you've seen they'll say it's what we'd do, didn't they? I'M SHOUTING'S",
    "'s 't 're 've 'm 'll 'd ''s x's y'LL",
    "3.14159 1,000,000 -42 +7 1e-9 0x1F 2024-05-09 12:30:45",
    "9876543210 and 007 and 1st 2nd 3rd",
    "Numbers ²³ ½ Ⅻ ٣٤ ५६ ０１２",
    "int main(int argc, char** argv) {\n    return argc > 1 ? 0 : -1;\n}\n",
    "def f(x):\n\tif x:\n\t\treturn [i**2 for i in range(10)]  # comment\n",
    "std::vector<int32_t> v{1, 2, 3}; v.push_back(4); // done",
    "<div class=\"x\">a &amp; b</div>",
    "$$ \\frac{a}{b} = \\sum_{i=0}^{n} x_i $$",
    "!!!??? ... --- *** ### @@@ ~~~ ```",
    "Café naïve façade résumé Ångström Øresund straße",
    "日本語のテキストと中文文本，还有한국어 텍스트。",
    "Emoji: 😀👍🏽🇫🇷 👨‍👩‍👧‍👦 ❤️ ✨",
    "Привет, мир! Съешь же ещё этих мягких французских булок.",
    "مرحبا بالعالم ١٢٣ السلام عليكم",
    "Ελληνικά και עברית και हिन्दी और ไทย",
    "Mixed\u00a0no-break\u3000ideographic\u2028line\u2029para\u0085nel end",
    "controls \x1c\x1d\x1e\x1f \x0b\x0c here",
    "zero\u200bwidth\u200djoiner \ufeffbom",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text",
    "<|im_end|><|im_end|> <|im_start|>",
    "<repo_name>owner/repo<file_sep>path/file.py\n<jupyter_code>print(1)",
    "almost special <|im_star|> and <|im_end| and <im_end|>",
    "a" * 300,
    " " * 40 + "x",
    "ab" * 100 + " " + "1" * 50,
    "a  1 b  ! c \t\nd\u00a0e \u00a0f  \n\ng",
    "cafe\u0301 n\u0303 (combining marks are not letters)",
    "'''ll '' 's's 'd'd 've've",
]

# Random strings over a pool that stresses the pre-tokenizer's alternatives and their edges.
FUZZ_POOL = [
    " ", " ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "a", "Z", "word", "é", "ß", "日本",
    "😀", "я", "ع", "0", "7", "42", "²", "٣", "'", "'s", "'ll", "'D", "!", ".", ",", "-", "_", "#",
    "{", "\"", "<|im_end|>", "<|endoftext|>", "<|im", "\u0301",
]


def fuzz_cases(count=40, seed=1234):
    rng = random.Random(seed)
    return ["".join(rng.choice(FUZZ_POOL) for _ in range(rng.randint(1, 40))) for _ in range(count)]


def bytes_to_unicode():
    """GPT-2's byte -> character table: printable bytes map to themselves, the rest to U+0100+."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    for k, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(0x100 + k)
    return table


def read_vocab(path):
    reader = GGUFReader(str(path))
    fields = reader.fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    merges = fields["tokenizer.ggml.merges"].contents()
    assert fields["tokenizer.ggml.pre"].contents() == "smollm"
    special_types = (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED)
    specials = [t for t, ty in zip(tokens, types) if ty in special_types]
    return tokens, merges, specials


def build_reference(tokens, merges, specials):
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = []
    for m in merges:
        cut = m.find(" ", 1)  # llama.cpp's rule: a merge side may start with a space
        pairs.append((m[:cut], m[cut + 1:]))
    tok = Tokenizer(models.BPE(vocab, pairs))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    if specials:
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tok


def wikitext_cases(path):
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    nonempty = [l for l in lines if l.strip()]
    cases = nonempty[:: max(1, len(nonempty) // 150)][:150]  # every k-th line, as-is
    cases.append("".join(lines[:60]))  # a multi-line chunk with headings and blank lines
    return cases


def encode_all(tok, cases):
    return [tok.encode(c, add_special_tokens=False).ids for c in cases]


def main() -> None:
    model = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_MODEL
    wikitext = pathlib.Path(sys.argv[2]) if len(sys.argv) > 2 else DEFAULT_WIKITEXT
    tokens, merges, specials = read_vocab(model)
    special_ref = build_reference(tokens, merges, specials)
    plain_ref = build_reference(tokens, merges, [])

    known = special_ref.encode("Hello world! 123", add_special_tokens=False).ids
    assert known == [19556, 905, 17, 216, 33, 34, 35], known
    assert special_ref.encode("<|im_end|>").ids == [2]

    cases = HAND_CASES + fuzz_cases() + wikitext_cases(wikitext)
    assert all(SEPARATOR not in c for c in cases)
    ids = encode_all(special_ref, cases)
    plain_ids = encode_all(plain_ref, cases)
    # Bytes whose GPT-2 character is not a token (SmolLM lacks 21, e.g. 0x1D) are dropped.
    dropped = {b for b, ch in bytes_to_unicode().items() if ch not in set(tokens)}
    for c, i in zip(cases, ids):
        kept = bytes(b for b in c.encode("utf-8") if b not in dropped)
        assert special_ref.decode(i, skip_special_tokens=False).encode("utf-8") == kept, c

    out_dir = ROOT / "tests/data"
    with open(out_dir / "tokenizer_golden.inp", "w", encoding="utf-8", newline="") as f:
        f.write("".join(c + SEPARATOR for c in cases))
    for name, rows in (("tokenizer_golden.out", ids), ("tokenizer_golden.plain.out", plain_ids)):
        with open(out_dir / name, "w", encoding="utf-8", newline="") as f:
            f.write("".join(" ".join(map(str, r)) + "\n" for r in rows))
    print(f"wrote {len(cases)} cases to {out_dir}")


if __name__ == "__main__":
    main()
