#!/usr/bin/env python3
"""One table per method from several `veloxquant compare --json` runs of the same text and
context (runs split across processes or machines because of time limits):

    python3 bench/compare_summary.py OUT.md RUN.json [RUN.json ...]

Rows: methods; columns: the defaults and each swept bit width (labels give each method's key
settings at that width), each cell "KLD (K+V bits/coord,
needle found)". Then the decode tokens/s at the largest context of each row next to its run's
fp16 baseline (runs differ in machine load, so only ratios within a run compare). Every run
must have the same text, ctx, score_from and tokens scored; anything else is an error.
"""
import json
import sys

KEYS = ("text_tokens", "ctx", "score_from", "tokens_scored", "needle_lengths", "decode_contexts")


def load(paths):
    runs = []
    for p in paths:
        with open(p, encoding="utf-8") as f:
            runs.append((p, json.load(f)))
    first = runs[0][1]
    for p, doc in runs[1:]:
        for k in KEYS:
            if doc[k] != first[k]:
                sys.exit(f"{p}: {k} = {doc[k]} differs from {runs[0][0]} ({first[k]})")
    return runs


def column(row):
    """The sweep's column: "defaults", or the swept width, which compare sets as the value bits
    of every method (the key-side knob differs: bits, sketch rows, signal/noise bits)."""
    if "(defaults)" in row["label"]:
        return "defaults"
    return f"{row['config']['value_bits']} bits"


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    out, paths = sys.argv[1], sys.argv[2:]
    runs = load(paths)
    table, order, speed = {}, [], []
    top = str(max(runs[0][1]["decode_contexts"]))
    for path, doc in runs:
        base = next(r for r in doc["rows"] if r["config"]["method"] == "fp16")
        for r in doc["rows"]:
            method = r["config"]["method"]
            if method == "fp16":
                continue
            col = column(r)
            fp = r["footprint"]
            found = sum(1 for c in r["needle"]["cases"] if c["found"])
            cell = (f"{r['kld']:.4f} ({fp['key_bits_per_coordinate']:.2f}+"
                    f"{fp['value_bits_per_coordinate']:.2f}, {found}/{len(r['needle']['cases'])})")
            if method not in table:
                table[method] = {}
                order.append(method)
            table[method][col] = cell
            tps, ref = r["decode_tokens_per_second"][top], base["decode_tokens_per_second"][top]
            speed.append(f"| {r['label']} | {tps:.1f} | {ref:.1f} | {tps / ref:.2f}x | {path} |")
    cols = ["defaults"] + sorted({c for m in table.values() for c in m if c != "defaults"},
                                 key=lambda c: int(c.split()[0]))
    doc = runs[0][1]
    lines = [
        f"# compare summary: {doc['tokens_scored']} tokens scored at ctx {doc['ctx']}",
        "",
        "Runs: " + ", ".join(f"`{p}`" for p, _ in runs) + " (each file's Markdown twin has its "
        "command and machine). Cell: KLD against the fp16 cache (key+value bits per coordinate, "
        f"needle cases found at lengths {doc['needle_lengths']}).",
        "",
        "| method | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for m in order:
        lines.append(f"| {m} | " + " | ".join(table[m].get(c, "") for c in cols) + " |")
    lines += ["", f"Decode at {top} tokens of context against the same run's fp16 cache:", "",
              f"| config | tok/s | fp16 tok/s | ratio | run |", "|---|---:|---:|---:|---|"]
    lines += speed
    with open(out, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
