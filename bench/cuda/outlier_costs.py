"""What the outlier side store costs on the device: one layer's CudaKVCache (8 KV heads of dim
128, 32 query heads) filled to N positions with and without an outlier observer (KeyNormObserver
z_threshold 3), in the same process. Keys are Gaussian rows whose norms are log-normal
(sigma 0.5), so the observer flags the tails it would flag in a model's keys.

Measured per config and N:
  - outlier_tokens: the entries the side store holds (all heads);
  - fill_ms: appending the N positions in 4096-token chunks (norms, the host's observer and the
    records included), wall time around the loop after a synchronization;
  - append_ms: one decode token's append, the median of --repeats calls;
  - decode_ms: one query per query head, CUDA events, the median of --repeats after --warmup;
  - chunk_ms: a causal chunk of 512 queries (the side store's caches take the generic kernel,
    the others the wide prefill kernel);
  - cache_nbytes: device bytes the cache holds after all that (pages, tables, workspace kept
    between calls, side store).

With --batch B (> 1), B such caches of --batch-positions positions each (made by empty_like, so
they share the observer) also time a decode step of the whole batch (each sequence's token
appended, then one query per query head attended): step_batched_ms through CudaKVCacheBatch
(one append and one attention launch for all), step_each_ms through each cache in turn, the
medians of --repeats steps.

Usage: python bench/cuda/outlier_costs.py [--positions 32768,131072] [--batch 8]
Writes JSON to $OUT/outlier_costs.json (or bench/results/outlier_costs.json).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from sdpa_prefill_chunk import time_ms  # (this folder: run as bench/cuda/outlier_costs.py)

from veloxquant import KeyNormObserver
from veloxquant import cuda as vq_cuda
from veloxquant.cache.base import KVCacheConfig

H, HQ, D, CHUNK = 8, 32, 128, 512


def keys_of(n: int, g: torch.Generator) -> torch.Tensor:
    k = torch.randn(H, n, D, device="cuda", generator=g)
    norms = torch.exp(0.5 * torch.randn(H, n, 1, device="cuda", generator=g))
    return k * norms


def run(method: str, bits: int, value_bits: int, positions: int, observed: bool, args) -> dict:
    config = KVCacheConfig(method=method, bits=bits, value_bits=value_bits, seed=1,
                           outlier_observer=KeyNormObserver(3.0) if observed else None)
    cache = vq_cuda.CudaKVCache(config, H, D, max_seq_len=positions + args.repeats + 8)
    g = torch.Generator(device="cuda").manual_seed(1)
    chunks = []
    for start in range(0, positions, 4096):
        n = min(4096, positions - start)
        chunks.append((keys_of(n, g), torch.randn(H, n, D, device="cuda", generator=g)))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for k, v in chunks:
        cache.append(k, v)
    torch.cuda.synchronize()
    fill_ms = 1e3 * (time.perf_counter() - t0)
    del chunks
    q = torch.randn(HQ, D, device="cuda", generator=g)
    out = torch.empty(HQ, D, device="cuda")
    for _ in range(args.warmup):
        cache.attend(q, out=out)
    decode = time_ms(lambda: cache.attend(q, out=out), args.repeats)
    qc = torch.randn(HQ, CHUNK, D, device="cuda", generator=g)
    for _ in range(2):
        cache.attend(qc)
    chunk = time_ms(lambda: cache.attend(qc), max(5, args.repeats // 4))
    one_k, one_v = keys_of(1, g), torch.randn(H, 1, D, device="cuda", generator=g)
    append = time_ms(lambda: cache.append(one_k, one_v), args.repeats)
    result = {"method": method, "bits": bits, "value_bits": value_bits, "positions": positions,
              "observer": observed, "outlier_tokens": cache.outlier_tokens, "fill_ms": fill_ms,
              "append_ms": append, "decode_ms": decode, "chunk_ms": chunk,
              "cache_nbytes": cache.nbytes}
    print(json.dumps(result), flush=True)
    return result


def run_batch(bits: int, value_bits: int, positions: int, observed: bool, args) -> dict:
    config = KVCacheConfig(method="turboquant_rvq", bits=bits, value_bits=value_bits, seed=1,
                           outlier_observer=KeyNormObserver(3.0) if observed else None)
    first = vq_cuda.CudaKVCache(config, H, D, max_seq_len=positions + 4 * args.repeats + 16)
    caches = [first] + [first.empty_like() for _ in range(args.batch - 1)]
    g = torch.Generator(device="cuda").manual_seed(2)
    for cache in caches:
        for start in range(0, positions, 4096):
            n = min(4096, positions - start)
            cache.append(keys_of(n, g), torch.randn(H, n, D, device="cuda", generator=g))
    B = args.batch
    k = torch.stack([keys_of(1, g) for _ in range(B)])  # [B, H, 1, D]
    v = torch.randn(B, H, 1, D, device="cuda", generator=g)
    q = torch.randn(B, HQ, D, device="cuda", generator=g)
    out = torch.empty(B, HQ, D, device="cuda")
    batch = vq_cuda.CudaKVCacheBatch()
    assert batch.alike(caches)

    def batched():
        batch.append(caches, k, v)
        batch.attend(caches, q, out=out)

    def each():
        for b, cache in enumerate(caches):
            cache.append(k[b], v[b])
            cache.attend(q[b], out=out[b])

    result = {"method": "turboquant_rvq", "bits": bits, "value_bits": value_bits, "batch": B,
              "positions": positions, "observer": observed,
              "step_batched_ms": time_ms(batched, args.repeats),
              "step_each_ms": time_ms(each, args.repeats),
              "outlier_tokens": sum(c.outlier_tokens for c in caches)}
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--positions", default="32768,131072")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--batch-positions", type=int, default=32768)
    args = parser.parse_args()
    results = {"device": torch.cuda.get_device_name(),
               "command": "python bench/cuda/outlier_costs.py --positions " + args.positions +
               f" --warmup {args.warmup} --repeats {args.repeats} --batch {args.batch}"
               f" --batch-positions {args.batch_positions}",
               "runs": []}
    for method, bits, value_bits in (("turboquant_rvq", 2, 4), ("turboquant_rvq", 1, 2)):
        for positions in (int(p) for p in args.positions.split(",")):
            for observed in (False, True):
                results["runs"].append(run(method, bits, value_bits, positions, observed, args))
    if args.batch > 1:
        results["batch_runs"] = [run_batch(bits, value_bits, args.batch_positions, observed, args)
                                 for bits, value_bits in ((2, 4), (1, 2))
                                 for observed in (False, True)]
    out = os.path.join(os.environ.get("OUT", "bench/results"), "outlier_costs.json")
    with open(out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
