#!/usr/bin/env python3
"""Process memory and decode speed at a long context, one process per cache configuration.

Each configuration runs `veloxquant generate --raw` on the same ~N-token WikiText-2 prompt in a
fresh process, so its peak resident set (getrusage) holds only its own cache. The table reports
the KV bytes the caches hold, the process peak RSS, and both differences against the fp16 cache
of the same run: the RSS should fall by about the KV bytes saved.

    python3 bench/run_memory.py [--tokens 8192] [--max-tokens 64] [--repeats 3]

Writes bench/results/memory_<date>.json and .md (median of the repeats for the speeds; peak RSS
and KV bytes do not vary between repeats).
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = os.path.join(ROOT, "build", "tools", "veloxquant", "veloxquant")

# (label, generate options): the baseline first, then each method near 4 and near 2.5 bits.
CONFIGS = [
    ("fp16", ["--method", "fp16", "--value-bits", "16"]),
    ("turboquant_rvq b=4 r=1 v=4", ["--method", "turboquant_rvq", "--bits", "4", "--num-residuals", "1", "--value-bits", "4"]),
    ("turboquant_rvq b=1 r=2 v=2 (defaults)", ["--method", "turboquant_rvq"]),
    ("rabitq b=4 v=4", ["--method", "rabitq", "--bits", "4", "--value-bits", "4"]),
    ("rabitq b=2 v=2", ["--method", "rabitq", "--bits", "2", "--value-bits", "2"]),
    ("qjl m=256 v=4", ["--method", "qjl", "--sketch-dim", "256", "--value-bits", "4"]),
    ("polarquant b=4 v=4", ["--method", "polarquant", "--bits", "4", "--value-bits", "4"]),
    ("ratequant b=3 v=3", ["--method", "ratequant", "--bits", "3", "--value-bits", "3"]),
]


def prompt_text(tokens):
    # About 4 characters per token on WikiText-2; the CLI reports the exact count.
    with open(os.path.join(ROOT, "..", "shared", "data", "wikitext-2", "test.txt"), encoding="utf-8") as f:
        text = f.read()
    return text[: int(tokens * 4.0)]


def run_one(opts, prompt_path, ctx, max_tokens, model):
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as out:
        path = out.name
    cmd = [CLI, "generate", "--raw", "--quiet", "--ctx", str(ctx), "--max-tokens", str(max_tokens), "--json", path]
    if model:
        cmd += ["--model", model]
    with open(prompt_path, encoding="utf-8") as stdin:
        subprocess.run(cmd + opts + ["-"], stdin=stdin, stdout=subprocess.DEVNULL, check=True, cwd=ROOT)
    with open(path, encoding="utf-8") as f:
        result = json.load(f)
    os.unlink(path)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=8192, help="prompt length, about")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens generated (decode timing)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="")
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d")
    out = args.out or os.path.join(ROOT, "bench", "results", f"memory_{stamp}")
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
        f.write(prompt_text(args.tokens))
        prompt_path = f.name
    ctx = 2 * args.tokens + args.max_tokens  # capacity only: pages are allocated as tokens arrive
    rows = []
    for label, opts in CONFIGS:
        runs = [run_one(opts, prompt_path, ctx, args.max_tokens, args.model) for _ in range(args.repeats)]
        rows.append({
            "label": label,
            "options": opts,
            "prompt_tokens": runs[0]["prompt_tokens"],
            "kv_bytes": runs[0]["footprint"]["storage_bytes"],
            "bits_per_coordinate": runs[0]["footprint"]["bits_per_coordinate"],
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs),
            "prefill_tokens_per_second": statistics.median(r["prefill_tokens_per_second"] for r in runs),
            "decode_tokens_per_second": statistics.median(r["decode_tokens_per_second"] for r in runs),
        })
        print(f"{label}: {rows[-1]}", file=sys.stderr)
    os.unlink(prompt_path)

    base = rows[0]
    command = "python3 bench/run_memory.py " + " ".join(sys.argv[1:])
    meta = {"command": command, "machine": platform.node(), "cpu_count": os.cpu_count(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "all cores"),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "repeats": args.repeats,
            "max_tokens": args.max_tokens}
    with open(out + ".json", "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    mib = 1024.0 * 1024.0
    lines = [f"# Memory and decode speed at {base['prompt_tokens']} tokens of context", "",
             f"`{command}` on {meta['machine']} ({meta['cpu_count']} CPUs, OMP_NUM_THREADS="
             f"{meta['omp_num_threads']}), {meta['date']}; one process per row; speeds are the median"
             f" of {args.repeats} runs, decode over {args.max_tokens} generated tokens.", "",
             "| config | bits/coord | KV MiB | KV saved MiB | peak RSS MiB | RSS saved MiB | decode tok/s | x fp16 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['bits_per_coordinate']:.2f} | {r['kv_bytes'] / mib:.1f} | "
            f"{(base['kv_bytes'] - r['kv_bytes']) / mib:.1f} | {r['peak_rss_bytes'] / mib:.1f} | "
            f"{(base['peak_rss_bytes'] - r['peak_rss_bytes']) / mib:.1f} | "
            f"{r['decode_tokens_per_second']:.1f} | "
            f"{r['decode_tokens_per_second'] / base['decode_tokens_per_second']:.2f} |")
    with open(out + ".md", "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
