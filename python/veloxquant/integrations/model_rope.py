"""The RoPE of a torch model as the caches need it for centred keys: its frequencies (the rotary
embedding's inv_freq) and how it pairs coordinates, (i, i + P) (transformers' rotate_half) or
(2i, 2i + 1). Used by ``KVCacheBuilder.build`` and ``VeloxQuantCache.from_model``; needs torch
only when handed a torch module, so importing it does not import torch."""

from __future__ import annotations

import dataclasses
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..cache.base import KVCacheConfig


def _rope_half_split(model: Any) -> bool:
    """Whether the model's RoPE turns pairs (i, i + P) (transformers' usual rotate_half) rather
    than adjacent pairs (2i, 2i + 1) (e.g. Cohere's): told by applying the rotate_half of the
    attention's modeling module to a probe. ValueError where there is none or it is neither."""
    modules = getattr(model, "modules", None)
    for module in modules() if callable(modules) else ():
        if type(module).__name__.endswith("Attention"):
            rotate_half = getattr(sys.modules.get(type(module).__module__), "rotate_half", None)
            if rotate_half is None:
                break
            probe = sys.modules["torch"].tensor([1.0, 2.0, 3.0, 4.0])
            turned = rotate_half(probe).tolist()
            if turned == [-3.0, -4.0, 1.0, 2.0]:
                return True
            if turned == [-2.0, 1.0, -4.0, 3.0]:
                return False
            break
    raise ValueError("cannot tell how this model's RoPE pairs key coordinates (no rotate_half "
                     "beside its attention, or an unknown one); center_keys and commvq's "
                     "rope_inv_freq need it")


def _rope_inv_freq(model: Any) -> list[float]:
    """The inv_freq of the model's rotary embedding. ValueError where there is none, several
    that differ (e.g. local and global layers), or one whose frequencies change with the
    sequence length (dynamic, longrope), which a cache's fixed frequencies would not follow."""
    found: list[list[float]] = []
    modules = getattr(model, "modules", None)
    for module in modules() if callable(modules) else ():
        inv_freq = getattr(module, "inv_freq", None)
        if not isinstance(inv_freq, sys.modules["torch"].Tensor):
            continue
        rope_type = getattr(module, "rope_type", "default")
        if rope_type in ("dynamic", "longrope"):
            raise ValueError(f"center_keys: the model's {rope_type} RoPE changes its frequencies "
                             "with the sequence length; the centred codec's are fixed")
        freqs = inv_freq.detach().double().cpu().flatten().tolist()
        if freqs not in found:
            found.append(freqs)
    if not found:
        raise ValueError("center_keys: found no rotary embedding (a module with inv_freq) in the "
                         "model")
    if len(found) > 1:
        raise ValueError(f"center_keys: the model has {len(found)} rotary embeddings with "
                         "different frequencies; one set of frequencies per cache is supported")
    return found[0]


def with_model_rope(model: Any, config: KVCacheConfig) -> KVCacheConfig:
    """config as the RoPE of `model` (a torch module, e.g. a transformers model) needs it: for
    center_keys, the model's pairing (rope_half_split) and its frequencies where the config has
    none; for commvq with rope_inv_freq, a check that the model turns adjacent pairs, which
    commvq's RoPE-commuting codebooks take (ValueError otherwise). Other configs, and objects
    that are not torch modules, are returned as they are."""
    if not (config.center_keys or (config.method == "commvq" and config.rope_inv_freq)):
        return config
    torch = sys.modules.get("torch")  # a torch module exists only once torch is imported
    if torch is None or not isinstance(model, torch.nn.Module):
        return config
    half_split = _rope_half_split(model)
    if config.method == "commvq":
        if half_split:
            raise ValueError("commvq's rope_inv_freq turns adjacent pairs (2i, 2i + 1); this "
                             "model's RoPE turns pairs (i, i + P): drop rope_inv_freq")
        return config
    freqs = config.rope_inv_freq if config.rope_inv_freq is not None else _rope_inv_freq(model)
    return dataclasses.replace(config, rope_inv_freq=list(freqs), rope_half_split=half_split)
