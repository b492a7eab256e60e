"""End to end on the GPU through transformers: a LlamaForCausalLM at an 8B-like shape (hidden
4096, 32 query heads over 8 KV heads of dim 128, intermediate 14336, vocab 128256; random bf16
weights; --layers of them, 32 by default) decodes after a long prompt with VeloxQuantCache on
the device (veloxquant.cuda, attn_implementation="veloxquant") and with transformers' default
DynamicCache, in the same process.

Measured per context (32K, then 64K while the time budget allows) and cache:
  - decode tokens/s: greedy single-token steps after the prefill, wall time per step with a
    synchronize (Python overhead included, as a user sees it); the median step over --repeats
    runs of --steps steps, after --warmup steps; with --batch B, B sequences decode together
    (in one batch step per layer, or one by one with --per-sequence-decode)
    and tokens/s counts all of theirs; with --left-pad P sequence b of the batch starts with
    b * P positions of padding (an attention mask on every step, position ids counted over each
    sequence's own tokens, as generate does);
  - KV memory: torch.cuda.memory_allocated delta over the prefill (the DynamicCache tensors;
    our pages are not torch allocations, so this is ~0 for ours), the device-wide delta of
    cudaMemGetInfo (free bytes, after empty_cache: every allocator), and the caches' own byte
    counts (ours: page pools as allocated + tables + workspaces; default: keys + values);
  - the prefill wall time (ours: SDPA on the exact prompt + encoding; see the integration).
Correctness at a short context: teacher-forced decode steps with our cache at high bits (keys 4
bits r=3, fp16 values) and at the benchmarked widths against the default cache: max relative
logit error (max |diff| / max |ref|) and greedy (argmax) agreement per step.

Usage: python bench/cuda/e2e_transformers.py [--layers 32] [--contexts 32768,65536] ...
Writes JSON to $OUT/e2e_transformers.json (or bench/results/e2e_transformers.json).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

import torch

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=32, help="decoder layers (8B has 32)")
    p.add_argument("--contexts", default="32768,65536", help="prompt lengths, comma separated")
    p.add_argument("--steps", type=int, default=16, help="decode steps per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=1,
                   help="sequences decoded together (tokens/s counts every sequence's tokens)")
    p.add_argument("--per-sequence-decode", action="store_true",
                   help="decode a batch's sequences one by one on the GPU layers, as before "
                        "CudaTurboQuantBatch and CudaKVCacheBatch (for comparison)")
    p.add_argument("--left-pad", type=int, default=0,
                   help="left padding of sequence b: b times this many positions")
    p.add_argument("--mask-read-per-layer", action="store_true",
                   help="read a padded batch's mask on the host at every layer, as before the "
                        "integration kept a forward's reading (for comparison)")
    p.add_argument("--configs", default=DEFAULT_CONFIGS,
                   help=f"caches to run besides DynamicCache, of: {', '.join(CONFIGS)}")
    p.add_argument("--short", type=int, default=256, help="prompt of the correctness check")
    p.add_argument("--check-steps", type=int, default=8)
    p.add_argument("--budget-s", type=float, default=150.0,
                   help="skip further contexts once this much wall time is spent")
    p.add_argument("--out", default=None, help="JSON path (default $OUT/e2e_transformers.json)")
    p.add_argument("--profile", type=int, default=0,
                   help="also profile this many decode steps per cache (torch.profiler; tables "
                        "next to the JSON as e2e_profile_<context>_<cache>.txt)")
    return p.parse_args()


def build_model(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8,
                      head_dim=128, max_position_embeddings=131072, rope_theta=500000.0,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.to(torch.bfloat16).eval()


CONFIGS = {  # name -> KVCacheConfig kwargs
    "k1r1_v2": dict(method="turboquant_rvq", bits=1, num_residuals=1, value_bits=2),
    "k4r1_v4": dict(method="turboquant_rvq", bits=4, num_residuals=1, value_bits=4),
    "k2r2_v4": dict(method="turboquant_rvq", bits=2, num_residuals=2, value_bits=4),
    # centred keys (center_keys: from_model reads the model's RoPE), run when --configs names them
    "k1r1_v2c": dict(method="turboquant_rvq", bits=1, num_residuals=1, value_bits=2,
                     center_keys=True),
    "k4r1_v4c": dict(method="turboquant_rvq", bits=4, num_residuals=1, value_bits=4,
                     center_keys=True),
    # a method off the tensor-core kernels: the generic device path (CudaKVCache)
    "polar3_v4": dict(method="polarquant", bits=3, value_bits=4),
    # more generic-path methods, run when --configs names them
    "qjl256_v4": dict(method="qjl", bits=1, sketch_dim=256, value_bits=4),
    "rabitq3_v4": dict(method="rabitq", bits=3, value_bits=4),
    # centred keys on the generic device path
    "polar3_v4c": dict(method="polarquant", bits=3, value_bits=4, center_keys=True),
}
DEFAULT_CONFIGS = "k1r1_v2,k4r1_v4,polar3_v4"
HIGH = dict(method="turboquant_rvq", bits=4, num_residuals=3, value_bits=16)


def make_cache(model, name: str, max_seq_len: int):
    from transformers import DynamicCache

    from veloxquant.cache.base import KVCacheConfig
    from veloxquant.integrations.transformers import VeloxQuantCache
    if name == "dynamic":
        return DynamicCache(config=model.config), "sdpa"
    kwargs = HIGH if name == "high" else CONFIGS[name]
    cache = VeloxQuantCache.from_model(model, KVCacheConfig(**kwargs), max_seq_len=max_seq_len,
                                       backend="cuda")
    return cache, "veloxquant"


def cache_bytes(cache) -> int:
    from veloxquant.integrations.transformers import VeloxQuantCache
    if isinstance(cache, VeloxQuantCache):
        return int(cache.nbytes)
    return int(sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers
                   if getattr(layer, "keys", None) is not None))


def step(model, cache, ids, mask=None):
    """The last position's logits of every sequence: [batch, vocab]. `mask`: the attention
    mask of every position so far, ids' included ([batch, positions], 0 at padding)."""
    extra = {}
    if mask is not None:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        extra = {"attention_mask": mask, "position_ids": positions}
    return model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1,
                 **extra).logits[:, -1]


def decode_step(model, cache, token, mask):
    """One greedy step after `token`; the mask grown by its position (None: no padding)."""
    if mask is not None:
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    return greedy(step(model, cache, token, mask)), mask


def greedy(logits):
    return logits.argmax(-1, keepdim=True)  # [batch, 1]


def settle() -> None:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def bench_one(model, name: str, prompt: torch.Tensor, args, mask=None) -> dict:
    batch, ctx = prompt.shape
    extra = args.warmup + args.steps * args.repeats + 8
    settle()
    alloc0, free0 = torch.cuda.memory_allocated(), torch.cuda.mem_get_info()[0]
    torch.cuda.reset_peak_memory_stats()
    cache, attention = make_cache(model, name, ctx + extra)
    model.set_attn_implementation(attention)
    try:
        with torch.no_grad():
            torch.cuda.synchronize()
            t = time.perf_counter()
            logits = step(model, cache, prompt, mask)
            token = greedy(logits)
            torch.cuda.synchronize()
            prefill_s = time.perf_counter() - t
            peak = torch.cuda.max_memory_allocated() - alloc0
            del logits
            settle()
            alloc1, free1 = torch.cuda.memory_allocated(), torch.cuda.mem_get_info()[0]
            held = cache_bytes(cache)
            for _ in range(args.warmup):
                token, mask = decode_step(model, cache, token, mask)
            torch.cuda.synchronize()
            steps, per_repeat = [], []
            for _ in range(args.repeats):
                start = time.perf_counter()
                for _ in range(args.steps):
                    t = time.perf_counter()
                    token, mask = decode_step(model, cache, token, mask)
                    torch.cuda.synchronize()
                    steps.append(time.perf_counter() - t)
                per_repeat.append(batch * args.steps / (time.perf_counter() - start))
            if args.profile > 0:
                token = profile_steps(model, cache, token, mask, args, f"{ctx}_{name}")
            length = cache.get_seq_length()
    finally:
        model.set_attn_implementation("sdpa")
    result = {
        "context": ctx,
        "batch": batch,
        "left_padding": [] if mask is None else (mask.shape[1] - mask.sum(-1)).tolist(),
        "cache": name,
        "config": None if name == "dynamic" else CONFIGS.get(name, HIGH),
        "prefill_s": prefill_s,
        "decode_step_ms_median": 1e3 * statistics.median(steps),
        "decode_tokens_per_s": batch / statistics.median(steps),
        "decode_tokens_per_s_per_repeat": per_repeat,
        "decode_tokens_per_s_median_of_repeats": statistics.median(per_repeat),
        "torch_allocated_delta_bytes": alloc1 - alloc0,
        "device_used_delta_bytes": free0 - free1,
        "cache_reported_bytes": held,
        "prefill_peak_torch_allocated_delta_bytes": peak,
        "final_length": length,
    }
    del cache
    settle()
    log(f"ctx {ctx} x{batch} {name:8s}: prefill {prefill_s:6.2f} s, decode {result['decode_step_ms_median']:7.2f} "
        f"ms/token ({result['decode_tokens_per_s']:6.1f} tok/s), KV: cache {held / 2**20:8.1f} MiB, "
        f"torch delta {(alloc1 - alloc0) / 2**20:8.1f} MiB, device delta {(free0 - free1) / 2**20:8.1f} MiB")
    return result


def profile_steps(model, cache, token, mask, args, tag: str):
    """Decode steps under torch.profiler: where a step's wall time goes (CPU ops, kernels)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.profile):
            token, mask = decode_step(model, cache, token, mask)
        torch.cuda.synchronize()
    averages = prof.key_averages()
    by_cpu = averages.table(sort_by="self_cpu_time_total", row_limit=25)
    by_cuda = averages.table(sort_by="self_device_time_total", row_limit=25)
    out_dir = os.path.dirname(args.out or os.path.join(os.environ.get("OUT") or "bench/results", "x"))
    with open(os.path.join(out_dir or ".", f"e2e_profile_{tag}.txt"), "w") as f:
        f.write(f"{args.profile} decode steps, {tag}\n\nby self CPU time\n{by_cpu}\n\n"
                f"by self device time\n{by_cuda}\n")
    log(f"profile {tag}: top CPU ops\n" + "\n".join(by_cpu.splitlines()[:16]))
    return token


def correctness(model, args) -> dict:
    """Teacher-forced: the default cache's greedy tokens drive every cache; per-step logits."""
    g = torch.Generator(device="cuda").manual_seed(123)
    prompt = torch.randint(0, model.config.vocab_size, (1, args.short), device="cuda", generator=g)
    n = args.check_steps

    def run(name, tokens=None):
        cache, attention = make_cache(model, name, args.short + n + 8)
        model.set_attn_implementation(attention)
        out, feed = [], []
        try:
            with torch.no_grad():
                logits = step(model, cache, prompt)[0]
                out.append(logits.float())
                for i in range(n):
                    tok = logits.argmax().view(1, 1) if tokens is None else tokens[i]
                    feed.append(tok)
                    logits = step(model, cache, tok)[0]
                    out.append(logits.float())
        finally:
            model.set_attn_implementation("sdpa")
        return torch.stack(out), feed

    ref, tokens = run("dynamic")
    result = {"prompt": args.short, "decode_steps": n}
    for name in ("high", *CONFIGS):
        got, _ = run(name, tokens)
        # row 0 is the prefill (exact SDPA on the prompt for ours), rows 1.. the decode steps
        err = ((got - ref).abs().amax(-1) / ref.abs().amax(-1)).tolist()
        agree = (got.argmax(-1) == ref.argmax(-1)).float().tolist()
        top2 = ref.topk(2, dim=-1).values
        result[name] = {
            "config": HIGH if name == "high" else CONFIGS[name],
            "prefill_max_rel_error": err[0],
            "decode_max_rel_error": max(err[1:]),
            "decode_max_rel_error_per_step": err[1:],
            "decode_greedy_agreement": sum(agree[1:]) / n,
            "reference_top1_margin_median": statistics.median((top2[1:, 0] - top2[1:, 1]).tolist()),
        }
        log(f"check {name:8s}: prefill rel err {err[0]:.2e}, decode max rel err {max(err[1:]):.3e}, "
            f"greedy agreement {sum(agree[1:]) / n:.2f}")
    return result


def main() -> int:
    args = parse()
    chosen = [c for c in args.configs.split(",") if c]
    unknown = [c for c in chosen if c not in CONFIGS]
    if unknown or not chosen:
        print(f"e2e_transformers: --configs {args.configs!r}: unknown {unknown}; "
              f"known: {', '.join(CONFIGS)}", file=sys.stderr)
        return 2
    for name in [c for c in CONFIGS if c not in chosen]:  # every loop below runs CONFIGS
        del CONFIGS[name]
    if not torch.cuda.is_available():
        print("e2e_transformers: no CUDA device", file=sys.stderr)
        return 1
    import transformers

    from veloxquant import cuda as vq_cuda
    if not vq_cuda.is_available():
        print(f"e2e_transformers: {vq_cuda.BUILT_WITHOUT_CUDA}", file=sys.stderr)
        return 1
    out_path = args.out or os.path.join(os.environ.get("OUT") or "bench/results",
                                        "e2e_transformers.json")
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    report = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model": {"shape": "Llama 8B-like, random bf16 weights", "layers": args.layers,
                  "layers_note": "8B has 32 layers" + ("" if args.layers == 32 else
                                                      f"; this run uses {args.layers}"),
                  "hidden": 4096, "q_heads": 32, "kv_heads": 8, "head_dim": 128,
                  "intermediate": 14336, "vocab": 128256},
        "method": {"decode": "ours: fused CUDA decode on the codes (turboquant: tensor-core kernel; "
                             "polarquant: the generic kernel); default: SDPA (bf16)",
                   "prefill": "ours: SDPA on the exact prompt, then encode (integration doc)",
                   "timing": "wall per step incl. Python, median over repeats x steps"},
        "args": vars(args), "results": [], "skipped_contexts": [],
    }
    if args.mask_read_per_layer:
        import veloxquant.integrations.transformers as integration
        integration._real_positions = integration._read_real_positions
    if args.per_sequence_decode:
        from veloxquant.integrations.transformers import VeloxQuantCudaKVLayer, VeloxQuantCudaLayer
        VeloxQuantCudaLayer._batch_class = VeloxQuantCudaKVLayer._batch_class = None
    log(f"building the model ({args.layers} layers) on {report['device']}")
    model = build_model(args.layers)
    report["weights_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    log(f"model ready: {report['weights_bytes'] / 2**30:.1f} GiB of weights")
    report["correctness"] = correctness(model, args)
    contexts = [int(c) for c in args.contexts.split(",") if c]
    for i, ctx in enumerate(contexts):
        if i > 0 and time.perf_counter() - T0 > args.budget_s:
            log(f"skipping context {ctx}: {args.budget_s:.0f} s budget spent")
            report["skipped_contexts"].append(ctx)
            continue
        g = torch.Generator(device="cuda").manual_seed(ctx)
        prompt = torch.randint(0, model.config.vocab_size, (args.batch, ctx), device="cuda",
                               generator=g)
        mask = None
        if args.left_pad > 0:
            mask = torch.ones(args.batch, ctx, dtype=torch.long, device="cuda")
            for b in range(args.batch):
                mask[b, :min(b * args.left_pad, ctx - 1)] = 0
        rows = {}
        for name in ("dynamic", *CONFIGS):
            try:
                rows[name] = bench_one(model, name, prompt, args, mask)
            except torch.OutOfMemoryError as e:
                log(f"ctx {ctx} {name}: out of memory ({e})")
                rows[name] = {"context": ctx, "cache": name, "error": "out of memory"}
                settle()
            report["results"].append(rows[name])
        base = rows.get("dynamic", {})
        for name in CONFIGS:
            r = rows.get(name, {})
            if "decode_tokens_per_s" in r and "decode_tokens_per_s" in base:
                r["decode_speedup_vs_dynamic"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
                r["kv_bytes_ratio_vs_dynamic"] = r["cache_reported_bytes"] / base["cache_reported_bytes"]
                log(f"ctx {ctx} {name}: decode x{r['decode_speedup_vs_dynamic']:.2f} vs DynamicCache, "
                    f"KV bytes x{r['kv_bytes_ratio_vs_dynamic']:.3f}")
        with open(out_path, "w") as f:  # partial results survive a later failure
            json.dump(report, f, indent=2)
    report["total_seconds"] = time.perf_counter() - T0
    with open(out_path, "w") as f:
        json.dump(report, f, indent=2)
    log(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
