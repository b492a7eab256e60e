"""Calibration of the data-dependent methods from a model's activations, and calibration files.

vecinfer (codebooks, smoothing), spectral (eigenbases), ratequant (bit allocation), rabitq (IVF
centroids) and commvq (RoPE-commuting codebooks) learn from the keys, values and queries a
model produces on a text. ``calibrate`` runs the pipeline of ``veloxquant calibrate`` (the C++
runtime runs the GGUF model with fp16 caches, samples activations per layer and KV head, and
fits the method); a ``Calibration`` holds the result with the model's fingerprint::

    from veloxquant.cache.base import KVCacheBuilder, KVCacheConfig
    from veloxquant.calibration import Calibration, calibrate
    from veloxquant.model import LlamaModel

    model = LlamaModel.load("models/SmolLM2-135M-Instruct.Q4_1.gguf")
    config = KVCacheConfig(method="spectral")
    cal = calibrate(model, config, open("valid.txt").read())   # about a minute on two cores
    cal.save("smollm2.vqcal")          # merged into an existing file of the same model
    caches = KVCacheBuilder.build(model, config, calibration="smollm2.vqcal")

Files are versioned, CRC-checked and written atomically; loading a damaged file, or applying a
calibration to a model of another shape, raises an error naming the problem.
"""

from __future__ import annotations

import os
from typing import Any

from . import _core
from .cache.base import KVCacheConfig, model_cache_shape

__all__ = ["Calibration", "calibrate", "calibrated_methods"]


def calibrated_methods() -> list[str]:
    """Methods ``calibrate`` knows."""
    return list(_core.calibrated_methods())


class Calibration:
    """What the calibrated methods learned from one model: any of the sections vecinfer,
    spectral, ratequant, commvq and rabitq, with the model's fingerprint and RoPE."""

    def __init__(self, core: _core.Calibration) -> None:
        if not isinstance(core, _core.Calibration):
            raise TypeError("use Calibration.load(path) or calibrate(...)")
        self._core = core

    @classmethod
    def load(cls, path: str | os.PathLike) -> Calibration:
        """Reads a file written by ``save`` or ``veloxquant calibrate`` (RuntimeError naming the
        file and the problem for a missing, truncated, corrupted or wrong-version file)."""
        return cls(_core.Calibration.load(os.fspath(path)))

    def save(self, path: str | os.PathLike) -> None:
        """Writes atomically; the other sections of an existing file of the same model are kept,
        a file of another model is left alone (ValueError naming both models)."""
        self._core.save(os.fspath(path))

    @property
    def sections(self) -> list[str]:
        """Names of the sections present, e.g. ["spectral", "rabitq"]."""
        return list(self._core.sections())

    @property
    def model(self) -> str:
        """The model it was made for, e.g. "SmolLM2 135M Instruct (llama, 30 layers, ...)"."""
        return self._core.model

    @property
    def shape(self) -> list[tuple[int, int]]:
        """(num_kv_heads, head_dim) of every layer of that model."""
        return [tuple(p) for p in self._core.shape]

    def check_shape(self, model: Any) -> None:
        """ValueError unless ``model`` (anything ``KVCacheBuilder.build`` takes) has the layer
        shapes of the calibrated model."""
        self._core.check_shape(model_cache_shape(model))

    def apply(self, config: KVCacheConfig) -> KVCacheConfig:
        """A copy of ``config`` with ``config.method``'s calibrated fields filled (codebook,
        smooth_factors, rotations, bit_allocation, ivf_centroids, rope_inv_freq as the method
        needs); ValueError naming the calibrate command when the section is missing."""
        if not isinstance(config, KVCacheConfig):
            raise ValueError(f"config must be a KVCacheConfig, got {type(config).__name__}")
        return KVCacheConfig.from_core(self._core.apply(config.to_core()))

    def __repr__(self) -> str:
        return f"Calibration({', '.join(self.sections) or 'empty'} for {self.model})"


def calibrate(model: Any, config: KVCacheConfig, text: str, *, bits: float | None = None,
              tokens: int = 8192, ctx: int = 512, max_rows: int = 4096) -> Calibration:
    """Learns ``config.method``'s section from ``model`` (a ``veloxquant.model.LlamaModel`` or
    the path of a GGUF file) run over ``text`` (tokenized by the model's tokenizer; the first
    ``tokens`` tokens, 0 = all, cut into sequences of ``ctx``). ``max_rows`` keys, values and
    queries are sampled per layer and KV head. ``bits`` is the average target of ratequant
    (fractional allowed) and the rate of vecinfer/commvq (default ``config.bits``); the seed,
    rotation kind and ``num_clusters`` come from ``config``."""
    if not isinstance(config, KVCacheConfig):
        raise ValueError(f"config must be a KVCacheConfig, got {type(config).__name__}")
    if isinstance(model, (str, os.PathLike)):
        model = _core.LlamaModel.load(os.fspath(model))
    if not isinstance(model, _core.LlamaModel):
        raise ValueError(f"model must be a LlamaModel or a GGUF path, got {type(model).__name__}")
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    target = float(config.bits if bits is None else bits)
    return Calibration(_core.calibrate(model, text, config.to_core(), target, int(tokens),
                                       int(ctx), int(max_rows)))
