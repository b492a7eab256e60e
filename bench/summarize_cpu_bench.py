"""Summarises a bench_attention JSON file as Markdown: median decode time per method and
context, the ratio to dense float32 attention from the same run, bytes read (and their rate
against the same threads' read bandwidth, memory/read_f32), a 256-query causal prefill chunk's
time after the cached tokens (against dense float32 and the fp16 cache from the same run) and
append speed."""
import json
import sys


def main(path, out_path, command):
    doc = json.load(open(path))
    ctx = doc["context"]
    med = {}
    for b in doc["benchmarks"]:
        if b.get("aggregate_name") != "median":
            continue
        # run_name: "<kind>/<variant>/<tokens>[/iterations:N]/real_time"
        kind, variant, arg = b["run_name"].split("/")[:3]
        med[(kind + "/" + variant, int(arg))] = b
    lines = [
        "# CPU attention benchmark",
        "",
        f"Command: `{command}`  ",
        f"Machine: {ctx.get('host_name')}, {ctx.get('num_cpus')} CPUs @ {ctx.get('mhz_per_cpu')} MHz, "
        f"date {ctx.get('date')} (Google Benchmark's own library build: {ctx.get('library_build_type')}; "
        "VeloxQuant is built Release)  ",
        "Shape: 8 KV heads, 32 query heads, head dim 128, one decode query per head (a prefill "
        "chunk: 256); median of 5 repetitions.",
    ]
    read = next((b for (name, _), b in med.items() if name == "memory/read_f32"), None)
    read_gbps = read["GB/s"] if read else float("nan")
    if read:
        lines.append(f"Read bandwidth of the same threads (memory/read_f32, a sum over 256 MiB): "
                     f"{read_gbps:.2f} GB/s.")
    decode = [(name[7:], n, b) for (name, n), b in sorted(med.items()) if name.startswith("decode/")]
    if decode:
        lines += [
            "",
            "| method | tokens | decode µs | vs dense f32 | KV bytes | GB/s on compressed bytes | of read bandwidth |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
    for name, n, b in decode:
        dense = med.get(("decode/dense_f32", n))
        ratio = dense["real_time"] / b["real_time"] if dense else float("nan")
        lines.append(f"| {name} | {n} | {b['real_time']:.1f} | {ratio:.2f}x | {b['kv_bytes']:.0f} | "
                     f"{b['GB/s']:.2f} | {b['GB/s'] / read_gbps:.2f} |")
    prefill = [(name[8:], n, b) for (name, n), b in sorted(med.items()) if name.startswith("prefill/")]
    if prefill:
        lines += [
            "",
            "Prefill chunk: 256 queries per query head, causal, at the end of the cached tokens "
            "plus those 256.",
            "",
            "| method | cached tokens | chunk ms | vs dense f32 | vs fp16 cache | queries/s |",
            "|---|---:|---:|---:|---:|---:|",
        ]
    for name, n, b in prefill:
        dense, fp16 = med.get(("prefill/dense_f32", n)), med.get(("prefill/fp16", n))
        vs_dense = dense["real_time"] / b["real_time"] if dense else float("nan")
        vs_fp16 = fp16["real_time"] / b["real_time"] if fp16 else float("nan")
        lines.append(f"| {name} | {n} | {b['real_time']:.1f} | {vs_dense:.2f}x | {vs_fp16:.2f}x | "
                     f"{b['queries/s']:.0f} |")
    append = [(name[7:], n, b) for (name, n), b in sorted(med.items()) if name.startswith("append/")]
    if append:
        lines += ["", "| method | tokens | append ms | tokens/s |", "|---|---:|---:|---:|"]
    for name, n, b in append:
        lines.append(f"| {name} | {n} | {b['real_time']:.1f} | {b['tokens/s']:.0f} |")
    open(out_path, "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(*sys.argv[1:4])
