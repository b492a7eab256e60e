"""Array plumbing between user inputs (numpy arrays, torch tensors, nested lists) and the C++
core, which takes C-contiguous float32 CPU arrays ([num_heads, n, head_dim] for tokens,
[num_q_heads, n_queries, head_dim] for queries).

Accepted layouts: ``[heads, n, head_dim]`` or, with a leading batch dimension of 1,
``[1, heads, n, head_dim]`` (the layout of transformers and mlx_lm); results keep the caller's
layout. float32 C-contiguous inputs cross without a copy (torch through DLPack); float16,
bfloat16 (torch) and other real dtypes are converted to float32 first.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def is_torch(x: Any) -> bool:
    """True for a torch.Tensor, without importing torch."""
    return type(x).__module__.split(".", 1)[0] == "torch"


def as_float32(x: Any, name: str) -> Any:
    """x as a C-contiguous float32 CPU array: a torch tensor stays a torch tensor (passed to
    the core through DLPack), anything else becomes a numpy array. No copy when x already is
    one."""
    if is_torch(x):
        import torch

        if x.device.type != "cpu":
            raise ValueError(
                f"{name} is on {x.device}; this build's caches run on the CPU: pass {name}.cpu()"
            )
        if x.dtype.is_complex or x.dtype == torch.bool:
            raise ValueError(f"{name} must hold real numbers, got {x.dtype}")
        x = x.detach()
        if x.dtype != torch.float32:
            x = x.to(torch.float32)
        return x.contiguous()
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"{name} must be a real-valued array, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in x.shape)


def _drop_batch(x: Any, name: str) -> tuple[Any, bool]:
    """Removes a leading batch dimension of size 1 from a 4-D array."""
    shape = _shape(x)
    if len(shape) == 4:
        if shape[0] != 1:
            raise ValueError(
                f"{name} has batch size {shape[0]}; a cache holds one sequence (batch size 1)"
            )
        return x[0], True
    return x, False


def token_array(x: Any, name: str, num_heads: int, head_dim: int) -> tuple[Any, bool]:
    """Keys or values as float32 [num_heads, n, head_dim]; also returns whether the input had
    a batch dimension. Raises ValueError naming the expected shape."""
    x = as_float32(x, name)
    x3, batched = _drop_batch(x, name)
    shape = _shape(x3)
    if len(shape) != 3 or shape[0] != num_heads or shape[2] != head_dim:
        raise ValueError(
            f"{name} must have shape [num_heads={num_heads}, n_tokens, head_dim={head_dim}] "
            f"or [1, {num_heads}, n_tokens, {head_dim}]; got {list(_shape(x))}"
        )
    return x3, batched


def query_array(x: Any, num_heads: int, head_dim: int) -> tuple[Any, bool]:
    """Queries as float32 [num_q_heads, n_queries, head_dim] with num_q_heads a multiple of
    the cache's KV heads (grouped-query attention); also returns whether it was batched."""
    x = as_float32(x, "queries")
    x3, batched = _drop_batch(x, "queries")
    shape = _shape(x3)
    if len(shape) != 3 or shape[2] != head_dim or shape[0] % num_heads != 0 or shape[0] == 0:
        raise ValueError(
            f"queries must have shape [num_q_heads, n_queries, head_dim={head_dim}] (or with a "
            f"leading batch dimension of 1), num_q_heads a multiple of the {num_heads} KV heads; "
            f"got {list(_shape(x))}"
        )
    return x3, batched


def output_array(out: Any, like: Any, batched: bool) -> tuple[Any, Any]:
    """(the array to return, its [heads, n, head_dim] view that the core writes into).
    With out=None a new array of like's kind (numpy or torch) is made; otherwise out must be
    a C-contiguous float32 CPU array shaped like the queries."""
    shape3 = _shape(like)
    if out is None:
        if is_torch(like):
            import torch

            target = torch.empty(shape3, dtype=torch.float32)
        else:
            target = np.empty(shape3, dtype=np.float32)
        return (target[None] if batched else target), target
    expected = (1, *shape3) if batched else shape3
    if is_torch(out):
        import torch

        ok = out.dtype == torch.float32 and out.device.type == "cpu" and out.is_contiguous()
    else:
        ok = isinstance(out, np.ndarray) and out.dtype == np.float32 and out.flags.c_contiguous
        ok = ok and out.flags.writeable
    if not ok or _shape(out) != expected:
        raise ValueError(
            f"out must be a writable C-contiguous float32 CPU array of shape {list(expected)}"
        )
    return out, (out[0] if batched else out)


def float_array(x: Any, name: str) -> np.ndarray:
    """A configuration array (codebook, smooth factors, rotation) as C-contiguous float32."""
    if is_torch(x):
        x = x.detach().cpu().float().numpy()
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiu" or arr.ndim == 0:
        raise ValueError(f"KVCacheConfig.{name} must be a real-valued array, got {arr!r:.60}")
    return np.ascontiguousarray(arr, dtype=np.float32)
