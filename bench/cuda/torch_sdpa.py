"""Times torch bf16 scaled_dot_product_attention(enable_gqa=True) decode at the shapes of
bench_cuda_attention (one query per head, 32 query heads, 8 KV heads), and the causal attention
of one layer's 128K-token prefill, and, given that binary's JSON, prints the comparison: the
decode speedups, and each encode of 128K tokens x 8 KV heads as a share of that prefill
attention. Usage: torch_sdpa.py OUT.json [CUDA_BENCH.json]
"""
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

Q_HEADS, KV_HEADS = 32, 8
ROTATE_BYTES = 512 << 20  # cycle through K/V copies so repeated calls do not hit the L2


def kernel_names(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sorted({e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA})


def time_ms(fn, copies, reps=40):
    for i in range(copies):
        fn(i)
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for r in range(reps):
        starts[r].record()
        fn(r % copies)
        ends[r].record()
    torch.cuda.synchronize()
    return sorted(s.elapsed_time(e) for s, e in zip(starts, ends))


def sm_clock_mhz(cycles=2_000_000):
    """The SM clock (MHz) right after the work queued before it, as bench_cuda_attention reads
    its own: clock cycles of torch's spin kernel over its event-timed milliseconds. A sustained
    sweep runs under the GPU's power cap, so each point records the clock it ran at. None where
    this torch has no spin kernel."""
    try:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        return cycles / (start.elapsed_time(end) * 1e3)
    except (AttributeError, RuntimeError):
        return None


PREFILL_TOKENS = 131072


def prefill_rows():
    """Causal SDPA of one sequence of PREFILL_TOKENS tokens (one layer of a prefill), against
    which the encode of as many tokens is weighed."""
    rows = []
    for d in (128, 64):
        shape = (1, Q_HEADS, PREFILL_TOKENS, d)
        q = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, KV_HEADS, PREFILL_TOKENS, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, KV_HEADS, PREFILL_TOKENS, d, device="cuda", dtype=torch.bfloat16)

        def call(_):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        try:
            ms = time_ms(call, 1, reps=5)
        except RuntimeError as err:  # no fused kernel takes it: reported, not timed
            print(f"torch sdpa causal prefill d={d}: {err}", flush=True)
            continue
        med = ms[len(ms) // 2]
        rows.append({"d": d, "tokens": PREFILL_TOKENS, "ms": med, "ms_min": ms[0],
                     "kernels": kernel_names(lambda: call(0))})
        print(f"torch sdpa causal prefill d={d:3d} N={PREFILL_TOKENS}: {med:.2f} ms "
              f"{' '.join(rows[-1]['kernels'])}", flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    return rows


def main():
    out_path = sys.argv[1]
    dev = torch.cuda.get_device_name()
    rows = []
    for d in (128, 64):
        for batch in (1, 8, 32):
            for tokens in (8192, 32768, 131072):
                kv_bytes = 2 * batch * KV_HEADS * tokens * d * 2
                copies = max(1, min(8, math.ceil(ROTATE_BYTES / kv_bytes)))
                q = torch.randn(batch, Q_HEADS, 1, d, device="cuda", dtype=torch.bfloat16)
                ks = [torch.randn(batch, KV_HEADS, tokens, d, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
                vs = [torch.randn(batch, KV_HEADS, tokens, d, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]

                def call(i):
                    return F.scaled_dot_product_attention(q, ks[i], vs[i], enable_gqa=True)

                ms = time_ms(call, copies)
                mhz = sm_clock_mhz()
                med = ms[len(ms) // 2]
                names = kernel_names(lambda: call(0)) if (batch, tokens) == (8, 131072) else []
                rows.append({"d": d, "batch": batch, "tokens": tokens, "ms": med, "ms_min": ms[0],
                             "kv_bytes": kv_bytes, "gbps": kv_bytes / (med * 1e-3) / 1e9, "kernels": names,
                             "sm_mhz": mhz})
                print(f"torch sdpa d={d:3d} B={batch:2d} N={tokens:6d}: {med:.4f} ms  "
                      f"{rows[-1]['gbps']:.0f} GB/s  {mhz or 0:.0f} MHz {' '.join(names)}", flush=True)
                del q, ks, vs
                torch.cuda.empty_cache()
    prefill = prefill_rows()
    result = {"command": os.environ.get("VQ_BENCH_COMMAND", ""), "script": " ".join(sys.argv),
              "device": dev, "torch": torch.__version__, "q_heads": Q_HEADS, "kv_heads": KV_HEADS,
              "dtype": "bfloat16", "sdpa": rows, "causal_prefill": prefill}
    prefill_ms = {r["d"]: r["ms"] for r in prefill}
    ref = {(r["d"], r["batch"], r["tokens"]): r["ms"] for r in rows}
    ref_mhz = {(r["d"], r["batch"], r["tokens"]): r["sm_mhz"] for r in rows}
    if len(sys.argv) > 2:  # our decode against SDPA at each point
        ours = json.load(open(sys.argv[2]))
        result["speedup"] = [{"method": p["method"], "d": p["d"], "batch": p["batch"], "tokens": p["tokens"],
                              "ours_ms": p["ms"], "sdpa_ms": ref[(p["d"], p["batch"], p["tokens"])],
                              "speedup": ref[(p["d"], p["batch"], p["tokens"])] / p["ms"],
                              "ratio_to_copy": p["ratio_to_copy"], "sm_mhz": p.get("sm_mhz"),
                              "sdpa_sm_mhz": ref_mhz[(p["d"], p["batch"], p["tokens"])]}
                             for p in ours["decode"]]
        result["encode_share_of_prefill"] = [
            {"method": e["method"], "d": e["d"], "tokens": e["tokens"], "encode_ms": e["ms"],
             "prefill_attention_ms": prefill_ms[e["d"]], "share": e["ms"] / prefill_ms[e["d"]]}
            for e in ours["encode"] if e["d"] in prefill_ms and e["tokens"] == PREFILL_TOKENS]
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)

    if len(sys.argv) > 2:
        print(f"\ncopy bandwidth (read + write): {ours['copy_gbps_read_plus_write']:.0f} GB/s")
        print(f"{'method':8} {'d':>4} {'B':>3} {'N':>7} {'ours ms':>9} {'sdpa ms':>9} {'speedup':>8} "
              f"{'GB/s':>6} {'of copy':>8} {'SM MHz':>7} {'sdpa MHz':>8}")
        for p in ours["decode"]:
            t = ref[(p["d"], p["batch"], p["tokens"])]
            print(f"{p['method']:8} {p['d']:4d} {p['batch']:3d} {p['tokens']:7d} {p['ms']:9.4f} {t:9.4f} "
                  f"{t / p['ms']:8.2f} {p['gbps']:6.0f} {p['ratio_to_copy']:8.2f} {p.get('sm_mhz', 0):7.0f} "
                  f"{ref_mhz[(p['d'], p['batch'], p['tokens'])] or 0:8.0f}")
        for e in ours["encode"]:
            print(f"encode {e['method']:8} d={e['d']:3d} {e['tokens']} tokens: {e['ms']:.3f} ms "
                  f"{e['gbps']:.0f} GB/s ({e['ratio_to_copy']:.2f} of copy)")
        for e in result["encode_share_of_prefill"]:
            print(f"encode {e['method']:8} d={e['d']:3d}: {e['share'] * 100:.2f}% of one layer's "
                  f"causal SDPA prefill of the same tokens ({e['prefill_attention_ms']:.1f} ms)")


if __name__ == "__main__":
    main()
