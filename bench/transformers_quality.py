#!/usr/bin/env python3
"""Quality of VeloxQuant caches through the transformers integration, on a real model.

transformers loads the default GGUF model (SmolLM2-135M-Instruct Q4_1, dequantized to float32;
its loader turns the GGUF's adjacent-pair Q/K layout back into transformers' half-split RoPE),
runs WikiText-2 test in chunks of --ctx tokens, each a single prefill from an empty cache, and
scores positions --score-from..ctx-1 of every chunk: KL divergence of the next-token
distributions and top-1 agreement of each VeloxQuantCache configuration against the model's
default cache in the same process (attention "sdpa"). Each configuration runs with and without
``center_keys``, which from_model fills with the model's RoPE frequencies and pairing.

    python bench/transformers_quality.py [--chunks 8] [--ctx 1024] [--score-from 512]

Needs torch, transformers, accelerate and gguf beside the veloxquant package (not installed by
scripts/setup.sh: ``pip install torch transformers accelerate gguf``). Writes
bench/results/transformers_quality_<date>.json and .md.
"""
import argparse
import datetime
import inspect
import json
import os
import platform
import sys
import time
from dataclasses import replace

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from veloxquant.cache.base import KVCacheConfig
from veloxquant.integrations.transformers import ATTENTION_NAME, VeloxQuantCache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = os.path.join(ROOT, "..", "shared", "data", "wikitext-2", "test.txt")

# (label, config) at about 4.5 and 2.5 bits per coordinate; each also runs centred.
CONFIGS = [
    ("turboquant_rvq b=4 r=1 v=4", KVCacheConfig(method="turboquant_rvq", bits=4, value_bits=4, num_residuals=1)),
    ("turboquant_rvq b=2 r=1 v=2", KVCacheConfig(method="turboquant_rvq", bits=2, value_bits=2, num_residuals=1)),
    ("rabitq b=4 v=4", KVCacheConfig(method="rabitq", bits=4, value_bits=4)),
]


def chunk_logits(model, chunks, score_from, cache_for):
    """Logits [tokens scored, vocab] (float32) of every chunk, each from a fresh cache."""
    # transformers 5.25 renamed forward's past_key_values to cache.
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = []
    with torch.no_grad():
        for ids in chunks:
            cache = cache_for()
            logits = model(ids[None], **{name: cache}, use_cache=cache is not None).logits
            out.append(logits[0, score_from:].float())
    return torch.cat(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", default=os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--score-from", type=int, default=512)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results",
                                                  f"transformers_quality_{datetime.date.today():%Y%m%d}"))
    args = ap.parse_args()
    if not 0 <= args.score_from < args.ctx:
        ap.error("--score-from must be in [0, ctx)")
    torch.set_num_threads(args.threads)
    folder, name = os.path.split(args.gguf)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    with open(TEXT, encoding="utf-8") as f:
        # About 4 characters per token on WikiText-2, with room to spare.
        text = f.read()[: args.chunks * args.ctx * 6]
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if len(ids) < args.chunks * args.ctx:
        sys.exit(f"the text gave {len(ids)} tokens, fewer than {args.chunks} x {args.ctx}")
    chunks = [ids[c * args.ctx:(c + 1) * args.ctx] for c in range(args.chunks)]

    model.set_attn_implementation("sdpa")
    reference = torch.log_softmax(chunk_logits(model, chunks, args.score_from, lambda: None), -1)
    model.set_attn_implementation(ATTENTION_NAME)
    rows = []
    for label, config in CONFIGS:
        for centre in (False, True):
            cfg = replace(config, center_keys=centre)
            t0 = time.time()
            logits = chunk_logits(model, chunks, args.score_from, lambda cfg=cfg: VeloxQuantCache.from_model(
                model, cfg, max_seq_len=args.ctx, backend="cpu"))
            seconds = time.time() - t0
            logp = torch.log_softmax(logits, -1)
            kld = (reference.exp() * (reference - logp)).sum(-1).mean().item()
            top1 = (logp.argmax(-1) == reference.argmax(-1)).float().mean().item()
            rows.append({"config": label + (" centred" if centre else ""), "kld": kld, "top1": top1,
                         "seconds": seconds})
            print(f"{rows[-1]['config']:<36} KLD {kld:.4f}  top-1 {top1:.1%}  ({seconds:.0f} s)", flush=True)

    command = "python bench/transformers_quality.py " + " ".join(sys.argv[1:])
    meta = {"command": command, "machine": platform.node(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "transformers": __import__("transformers").__version__,
            "gguf": args.gguf, "chunks": args.chunks, "ctx": args.ctx, "score_from": args.score_from,
            "tokens_scored": args.chunks * (args.ctx - args.score_from)}
    with open(args.out + ".json", "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    with open(args.out + ".md", "w", encoding="utf-8") as f:
        f.write(f"# VeloxQuantCache quality through transformers, {datetime.date.today()}\n\n"
                f"`{command}` on {meta['machine']} ({meta['cpu_count']} CPUs), torch {meta['torch']}, "
                f"transformers {meta['transformers']}. {os.path.basename(args.gguf)} loaded by transformers "
                f"(float32), WikiText-2 test, {args.chunks} chunks of {args.ctx} tokens, each one prefill "
                f"from an empty cache; positions {args.score_from}..{args.ctx - 1} scored "
                f"({meta['tokens_scored']} tokens) against the default cache in the same process.\n\n"
                "| config | KLD | top-1 |\n|---|---|---|\n")
        for r in rows:
            f.write(f"| {r['config']} | {r['kld']:.4f} | {r['top1']:.1%} |\n")
    print("wrote", args.out + ".md")


if __name__ == "__main__":
    main()
