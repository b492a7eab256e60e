"""Sliding windows on the device: one layer's cache (8 KV heads of dim 128, 32 query heads)
filled to N positions, with and without a window (sink_tokens 4), in the same process: a
CudaKVCache (generic kernels) for every method, and for turboquant_rvq a CudaTurboQuantCache
too (tuned kernels; a window takes their general kernels).

Measured per cache, method and N:
  - decode attention time: one query per query head on the codes, CUDA events around each
    call, the median of --repeats calls after --warmup (through the Python API: at one
    sequence the host's ~25-40 us a call bound it); and the same call captured in a CUDA
    graph and replayed (the kernels' own time; null where the capture fails);
  - device bytes: the cache's own count (page pool as allocated, tables, workspace) and the
    change of cudaMemGetInfo's free bytes over making and filling the cache (every allocator);
  - torch bf16 scaled_dot_product_attention (enable_gqa) over the tokens each cache attends
    (N, or the window and sinks), timed both ways: the dense baseline.

Usage: python bench/cuda/window_decode.py [--positions 32768,131072] [--window 4096]
Writes JSON to $OUT/window_decode.json (or bench/results/window_decode.json).
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from sdpa_prefill_chunk import time_ms  # (this folder: run as bench/cuda/window_decode.py)

from veloxquant import cuda as vq_cuda
from veloxquant.cache.base import KVCacheConfig

H, HQ, D, SINKS = 8, 32, 128, 4


def timed(fn, warmup: int, repeats: int) -> float:
    """The median milliseconds of fn() over `repeats` calls after `warmup`."""
    for _ in range(warmup):
        fn()
    return time_ms(fn, repeats)


def free_bytes() -> int:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()[0]


def graph_ms(fn, warmup: int, repeats: int) -> float | None:
    """The median milliseconds of a CUDA graph holding one fn() call, replayed; None where
    fn cannot be captured."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up off the capture (workspaces allocated)
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError as e:
        print(f"graph capture failed: {e}", flush=True)
        torch.cuda.synchronize()
        return None
    return timed(graph.replay, warmup, repeats)


def run(config: KVCacheConfig, positions: int, window: int, kind: str, args) -> dict:
    before = free_bytes()
    cls = vq_cuda.CudaTurboQuantCache if kind == "tuned" else vq_cuda.CudaKVCache
    cache = cls(config, H, D, max_seq_len=positions, window=window,
                sink_tokens=SINKS if window else 0)
    g = torch.Generator(device="cuda").manual_seed(1)
    chunk = 4096
    for start in range(0, positions, chunk):
        n = min(chunk, positions - start)
        k = torch.randn(H, n, D, device="cuda", generator=g)
        cache.append(k, torch.randn(H, n, D, device="cuda", generator=g))
    q = torch.randn(HQ, D, device="cuda", generator=g)
    out = torch.empty(HQ, D, device="cuda")
    ms = timed(lambda: cache.attend(q, out=out), args.warmup, args.repeats)
    graph = graph_ms(lambda: cache.attend(q, out=out), args.warmup, args.repeats)
    held = positions if not window else min(positions, window + SINKS)
    kd = torch.randn(1, H, held, D, device="cuda", dtype=torch.bfloat16, generator=g)
    vd = torch.randn(1, H, held, D, device="cuda", dtype=torch.bfloat16, generator=g)
    qd = torch.randn(1, HQ, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
    def dense():
        return torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, enable_gqa=True)

    sdpa = timed(dense, args.warmup, args.repeats)
    sdpa_graph = graph_ms(dense, args.warmup, args.repeats)
    del kd, vd
    device_bytes = before - free_bytes()
    result = {"cache": type(cache).__name__, "method": config.method, "bits": config.bits,
              "value_bits": config.value_bits, "positions": positions, "window": window,
              "decode_ms": ms, "decode_graph_ms": graph,
              "sdpa_bf16_ms_same_tokens": sdpa, "sdpa_bf16_graph_ms": sdpa_graph,
              "cache_nbytes": cache.nbytes,
              "device_bytes_delta": device_bytes}
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--positions", default="32768,131072")
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    configs = [KVCacheConfig(method="turboquant_rvq", bits=2, value_bits=4, seed=1),
               KVCacheConfig(method="turboquant_rvq", bits=1, value_bits=2, seed=1),
               KVCacheConfig(method="fp16", value_bits=16)]
    results = {"device": torch.cuda.get_device_name(),
               "command": "python bench/cuda/window_decode.py --positions " + args.positions +
               f" --window {args.window} --warmup {args.warmup} --repeats {args.repeats}",
               "runs": []}
    for config in configs:
        kinds = ("generic", "tuned") if config.method == "turboquant_rvq" else ("generic",)
        for kind in kinds:
            for positions in (int(p) for p in args.positions.split(",")):
                for window in (0, args.window):
                    results["runs"].append(run(config, positions, window, kind, args))
    out = os.path.join(os.environ.get("OUT", "bench/results"), "window_decode.json")
    with open(out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
