"""Times torch bf16 scaled_dot_product_attention(enable_gqa=True) decode at the shapes of
bench_cuda_attention (one query per head, 32 query heads, 8 KV heads) and, in the same process on
the same tokens, our fused decode through the Python API (veloxquant.cuda.CudaTurboQuantBatch
over one CudaTurboQuantCache per sequence, each filled by encoding SDPA's bf16 keys and values);
then the causal attention of one layer's 128K-token prefill. Every timed loop starts from a
rested GPU (rest_until_clock: a sustained sweep runs under the power cap) and records the SM
clock before and after it. Given bench_cuda_attention's JSON it prints the comparison: speedups
through the API (same process) and of the kernels alone (graph-timed by that binary, with their
share of the copy bandwidth), and each encode of 128K tokens x 8 KV heads as a share of the
prefill attention. Without a CUDA build of veloxquant on the path only SDPA is timed.
Usage: torch_sdpa.py OUT.json [CUDA_BENCH.json]
"""
import json
import math
import os
import sys
import time

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


def rest_until_clock(full_mhz, max_s=0.25):
    """Sleeps in 20 ms steps until the SM clock is back within 2% of full_mhz or max_s have
    passed; returns the seconds rested (bench_cuda_attention paces its points the same way)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    while time.perf_counter() - start < max_s:
        mhz = sm_clock_mhz()
        if mhz is None or mhz >= 0.98 * full_mhz:
            break
        time.sleep(0.02)
    return time.perf_counter() - start


def paced(fn, copies, full_mhz):
    """time_ms after a rest, with the clocks before and after."""
    rested = rest_until_clock(full_mhz)
    before = sm_clock_mhz()
    ms = time_ms(fn, copies)
    return ms, {"rest_s": rested, "start_sm_mhz": before, "sm_mhz": sm_clock_mhz()}


# Our methods, as bench_cuda_attention names them: (key bits, key stages, value bits)
METHODS = {"k1v2": (1, 1, 2), "k4v4": (4, 1, 4), "k2x2v4": (2, 2, 4)}


def ours_api():
    """veloxquant.cuda where this build has the CUDA backend, else None."""
    try:
        import veloxquant.cuda as vq_cuda
    except ImportError:
        return None
    return vq_cuda if vq_cuda.is_available() else None


def time_ours(vq_cuda, method, q, ks, vs, out_ref, full_mhz):
    """Our decode through the Python API over caches holding the tokens of ks / vs; as many sets
    of caches as keep 512 MiB of codes in rotation (the L2 holds 60 MB); relative error of the
    output of set 0 against SDPA's (out_ref)."""
    from veloxquant.cache.base import KVCacheConfig
    bits, stages, value_bits = METHODS[method]
    config = KVCacheConfig(method="turboquant_rvq", bits=bits, num_residuals=stages,
                           value_bits=value_bits)
    batch, _, tokens, d = ks[0].shape
    sets, set_bytes = [], 0
    while len(sets) < 128 and len(sets) * set_bytes < ROTATE_BYTES:
        kv = len(sets) % len(ks)
        caches = [vq_cuda.CudaTurboQuantCache(config, num_heads=KV_HEADS, head_dim=d,
                                              max_seq_len=tokens) for _ in range(batch)]
        vq_cuda.CudaTurboQuantBatch().append(caches, ks[kv], vs[kv])
        sets.append(caches)
        set_bytes = sum(c.nbytes for c in caches)
    # one batch object per set of caches, as each layer of a model has its own
    steps = [vq_cuda.CudaTurboQuantBatch() for _ in sets]
    queries = q[:, :, 0, :].float().contiguous()  # [batch, q_heads, d]
    out = torch.empty_like(queries)
    steps[0].attend(sets[0], queries, out=out)
    err = ((out - out_ref).norm() / out_ref.norm()).item()
    ms, clocks = paced(lambda i: steps[i].attend(sets[i], queries, out=out), len(sets), full_mhz)
    row = {"method": method, "ms": ms[len(ms) // 2], "ms_min": ms[0], "cache_sets": len(sets),
           "cache_bytes": set_bytes, "rel_error_vs_sdpa": err, **clocks}
    if tokens == 8192 and d == 128 and method == "k1v2":  # host-bound: the API's own cost
        row["host_us_per_call"] = host_us(lambda i: steps[i].attend(sets[i], queries, out=out),
                                          len(sets))
        shared = vq_cuda.CudaTurboQuantBatch()  # one object for every set: checks every call
        row["host_us_per_call_shared_batch"] = host_us(
            lambda i: shared.attend(sets[i], queries, out=out), len(sets))
    del sets, steps
    return row


def host_us(fn, copies, calls=400):
    """Wall microseconds per call of `calls` back-to-back calls, synchronized at the end: the
    host's cost of a call wherever it exceeds the GPU's (small batches and contexts)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(calls):
        fn(i % copies)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


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
    sm_clock_mhz(50_000_000)  # ~25 ms of spin first: an idle GPU clocks down to ~300 MHz
    full_mhz = sm_clock_mhz() or 0.0  # the clock the points' rests wait for
    vq_cuda = ours_api()
    print(f"SM clock {full_mhz:.0f} MHz; our decode through the Python API: "
          f"{'yes' if vq_cuda else 'no (no CUDA build of veloxquant on the path)'}", flush=True)
    rows, api = [], []
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

                ms, clocks = paced(call, copies, full_mhz)
                if tokens == 8192 and d == 128:
                    clocks["host_us_per_call"] = host_us(call, copies)
                med = ms[len(ms) // 2]
                names = kernel_names(lambda: call(0)) if (batch, tokens) == (8, 131072) else []
                rows.append({"d": d, "batch": batch, "tokens": tokens, "ms": med, "ms_min": ms[0],
                             "kv_bytes": kv_bytes, "gbps": kv_bytes / (med * 1e-3) / 1e9, "kernels": names,
                             **clocks})
                print(f"torch sdpa d={d:3d} B={batch:2d} N={tokens:6d}: {med:.4f} ms  "
                      f"{rows[-1]['gbps']:.0f} GB/s  {clocks['start_sm_mhz'] or 0:.0f} -> "
                      f"{clocks['sm_mhz'] or 0:.0f} MHz {' '.join(names)}", flush=True)
                if vq_cuda is not None:
                    reference = call(0)[:, :, 0, :].float()
                    for method in METHODS:
                        r = time_ours(vq_cuda, method, q, ks, vs, reference, full_mhz)
                        api.append({"d": d, "batch": batch, "tokens": tokens, **r})
                        print(f"  ours {method:7s} (API): {r['ms']:.4f} ms  {med / r['ms']:5.2f}x  "
                              f"{r['start_sm_mhz'] or 0:.0f} -> {r['sm_mhz'] or 0:.0f} MHz  "
                              f"rel. error vs SDPA {r['rel_error_vs_sdpa']:.3f}  "
                              f"({r['cache_sets']} cache sets)", flush=True)
                        if "host_us_per_call" in r:
                            print(f"  host time per call: ours {r['host_us_per_call']:.1f} us "
                                  f"({r['host_us_per_call_shared_batch']:.1f} us with one batch "
                                  f"object for every set), SDPA {clocks['host_us_per_call']:.1f} us",
                                  flush=True)
                        torch.cuda.empty_cache()
                del q, ks, vs
                torch.cuda.empty_cache()
    prefill = prefill_rows()
    result = {"command": os.environ.get("VQ_BENCH_COMMAND", ""), "script": " ".join(sys.argv),
              "device": dev, "torch": torch.__version__, "q_heads": Q_HEADS, "kv_heads": KV_HEADS,
              "dtype": "bfloat16", "full_sm_mhz": full_mhz, "sdpa": rows, "ours_api": api,
              "causal_prefill": prefill}
    prefill_ms = {r["d"]: r["ms"] for r in prefill}
    ref = {(r["d"], r["batch"], r["tokens"]): r for r in rows}
    ours_by = {(r["method"], r["d"], r["batch"], r["tokens"]): r for r in api}
    if len(sys.argv) > 2:  # our decode against SDPA at each point
        ours = json.load(open(sys.argv[2]))
        result["speedup"] = []
        for p in ours["decode"]:
            sdpa = ref[(p["d"], p["batch"], p["tokens"])]
            a = ours_by.get((p["method"], p["d"], p["batch"], p["tokens"]))
            result["speedup"].append({
                "method": p["method"], "d": p["d"], "batch": p["batch"], "tokens": p["tokens"],
                "kernel_ms": p["ms"], "sdpa_ms": sdpa["ms"], "kernel_speedup": sdpa["ms"] / p["ms"],
                "api_ms": a["ms"] if a else None, "api_speedup": sdpa["ms"] / a["ms"] if a else None,
                "ratio_to_copy": p["ratio_to_copy"], "kernel_sm_mhz": p.get("sm_mhz"),
                "api_sm_mhz": a["sm_mhz"] if a else None, "sdpa_sm_mhz": sdpa["sm_mhz"],
                "rel_error_vs_sdpa": a["rel_error_vs_sdpa"] if a else None})
        result["encode_share_of_prefill"] = [
            {"method": e["method"], "d": e["d"], "tokens": e["tokens"], "encode_ms": e["ms"],
             "prefill_attention_ms": prefill_ms[e["d"]], "share": e["ms"] / prefill_ms[e["d"]]}
            for e in ours["encode"] if e["d"] in prefill_ms and e["tokens"] == PREFILL_TOKENS]
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)

    if len(sys.argv) > 2:
        print(f"\ncopy bandwidth (read + write): {ours['copy_gbps_read_plus_write']:.0f} GB/s. "
              "api: our decode through the Python API, timed in this process alternately with "
              "SDPA on the same tokens; kernel: bench_cuda_attention's graph-timed launches; "
              "rel err: our output against SDPA's on those random tokens (that both read the "
              "same tokens, not a quality figure: unrelated outputs differ by about 1.4)")
        print(f"{'method':8} {'d':>4} {'B':>3} {'N':>7} {'api ms':>8} {'sdpa ms':>8} {'speedup':>8} "
              f"{'kernel ms':>9} {'speedup':>8} {'of copy':>8} {'MHz api/sdpa/kernel':>20} {'rel err':>8}")
        fmt = lambda x, spec: format(x, spec) if x is not None else format("-", spec[:-2] + "s")
        for r in result["speedup"]:
            mhz = "/".join(f"{m or 0:.0f}" for m in (r["api_sm_mhz"], r["sdpa_sm_mhz"], r["kernel_sm_mhz"]))
            print(f"{r['method']:8} {r['d']:4d} {r['batch']:3d} {r['tokens']:7d} {fmt(r['api_ms'], '8.4f')} "
                  f"{r['sdpa_ms']:8.4f} {fmt(r['api_speedup'], '8.2f')} {r['kernel_ms']:9.4f} "
                  f"{r['kernel_speedup']:8.2f} {r['ratio_to_copy']:8.2f} {mhz:>20} "
                  f"{fmt(r['rel_error_vs_sdpa'], '8.3f')}")
        for e in ours["encode"]:
            print(f"encode {e['method']:8} d={e['d']:3d} {e['tokens']} tokens: {e['ms']:.3f} ms "
                  f"{e['gbps']:.0f} GB/s ({e['ratio_to_copy']:.2f} of copy)")
        for e in result["encode_share_of_prefill"]:
            print(f"encode {e['method']:8} d={e['d']:3d}: {e['share'] * 100:.2f}% of one layer's "
                  f"causal SDPA prefill of the same tokens ({e['prefill_attention_ms']:.1f} ms)")


if __name__ == "__main__":
    main()
