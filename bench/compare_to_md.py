#!/usr/bin/env python3
"""Renders the JSON of `veloxquant compare --json` as a Markdown table.

    python3 bench/compare_to_md.py RESULT.json OUT.md "MACHINE" "COMMAND"

The table has, per configuration: key and value bits per coordinate (every scalar counted), KV
MiB at the evaluated context, KLD and top-1 agreement against the fp16 cache, delta perplexity,
needle cases found, and decode tokens/s at each measured context.
"""
import json
import sys


def main():
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    src, out, machine, command = sys.argv[1:]
    with open(src, encoding="utf-8") as f:
        doc = json.load(f)
    contexts = [str(c) for c in doc["decode_contexts"]]
    lines = [
        f"# compare: {doc['tokens_scored']} tokens scored, ctx {doc['ctx']}",
        "",
        f"`{command}` on {machine}. Text {doc['text']} ({doc['text_tokens']} tokens): "
        f"{doc['chunks']} chunk(s) of {doc['ctx']}, positions {doc['score_from']}..{doc['ctx'] - 1} "
        f"scored. Needle lengths {doc['needle_lengths']} at depths {doc['needle_depths']}; decode "
        f"{doc['decode_steps']} greedy steps per context. Calibrated methods learned from "
        "WikiText-2 valid (8192 tokens) in the same run.",
        "",
        "| config | K bits | V bits | KV MiB | KLD | top-1 | dPPL | needle | "
        + " | ".join(f"tok/s@{c}" for c in contexts) + " |",
        "|---|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(contexts),
    ]
    for r in doc["rows"]:
        fp = r["footprint"]
        cases = r["needle"]["cases"]
        found = sum(1 for c in cases if c["found"])
        speeds = " | ".join(f"{r['decode_tokens_per_second'][c]:.1f}" for c in contexts)
        lines.append(
            f"| {r['label']} | {fp['key_bits_per_coordinate']:.2f} | {fp['value_bits_per_coordinate']:.2f} | {r['kv_mib']:.2f} | "
            f"{r['kld']:.4f} | {100 * r['top1']:.1f}% | {r['delta_ppl']:+.3f} | {found}/{len(cases)} | "
            f"{speeds} |")
    with open(out, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
