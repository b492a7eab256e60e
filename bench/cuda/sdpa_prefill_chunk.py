"""torch bf16 scaled_dot_product_attention of one prefill chunk over a longer context: the dense
baseline of bench_codec_cache's prefill chunk (CHUNK queries of 32 query heads at the end of N
tokens of 8 KV heads, causal from the bottom right, head_dim 128 or 64), timed the same way
(CUDA events, median of repeats after a warm-up).

With --window W: the dense baseline of bench_window_prefill's window points instead, a prompt of
each N tokens attending to itself causally within a sliding window of W tokens (a boolean mask,
as transformers' SDPA attention gets for a sliding layer; sinks 0), and the same prompt causal
without window (is_causal, the flash kernel).

Usage: python3 bench/cuda/sdpa_prefill_chunk.py OUT.json [--tokens 8192 32768] [--chunk 512]
       [--window W]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from torch.nn.attention.bias import causal_lower_right


def time_ms(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--dims", type=int, nargs="+", default=[128])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--window", type=int, default=0)
    args = ap.parse_args()
    rows = window_rows(args) if args.window > 0 else chunk_rows(args)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "rows": rows}, f, indent=1)


def window_rows(args) -> list:
    sdpa = torch.nn.functional.scaled_dot_product_attention
    rows = []
    for d in args.dims:
        for n in args.tokens:
            g = torch.Generator(device="cuda").manual_seed(n + d)
            q = torch.randn(1, 32, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
            k = torch.randn(1, 8, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
            v = torch.randn(1, 8, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
            i = torch.arange(n, device="cuda")
            mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - args.window)
            # GQA by expanding the KV heads, as transformers does where a mask is given.
            ke, ve = (t.repeat_interleave(4, dim=1) for t in (k, v))
            for name, kwargs in (("window", {"attn_mask": mask}), ("causal", {"is_causal": True})):
                ms = time_ms(lambda: sdpa(q, ke, ve, scale=d ** -0.5, **kwargs), args.repeats)
                rows.append({"d": d, "tokens": n, "window": args.window if name == "window" else 0,
                             "ms": ms})
                print(f"torch sdpa bf16 prompt d={d} N={n} {name} (window {args.window}): "
                      f"{ms:.3f} ms", flush=True)
            del mask, ke, ve
    return rows


def chunk_rows(args) -> list:
    rows = []
    for d in args.dims:
        for n in args.tokens:
            g = torch.Generator(device="cuda").manual_seed(n + d)
            q = torch.randn(1, 32, args.chunk, d, device="cuda", dtype=torch.bfloat16, generator=g)
            k = torch.randn(1, 8, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
            v = torch.randn(1, 8, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
            mask = causal_lower_right(args.chunk, n)
            # GQA by expanding the KV heads (the flash and efficient kernels then apply).
            ke, ve = (t.repeat_interleave(4, dim=1) for t in (k, v))
            ms = time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(
                q, ke, ve, attn_mask=mask, scale=d ** -0.5), args.repeats)
            rows.append({"d": d, "tokens": n, "chunk": args.chunk, "ms": ms})
            print(f"torch sdpa bf16 prefill chunk d={d} N={n} chunk={args.chunk}: {ms:.3f} ms",
                  flush=True)
    return rows


if __name__ == "__main__":
    main()
