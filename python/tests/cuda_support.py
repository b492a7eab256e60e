"""What the CUDA test files share: torch where it is installed (the build-without-CUDA checks
run without it), the skip mark for machines without a CUDA build or device, seeded random
tensors and the relative error of the parity checks."""

import math

import numpy as np
import pytest

from veloxquant import cuda as vq_cuda

try:
    import torch
except ImportError:
    torch = None

needs_cuda = pytest.mark.skipif(
    not vq_cuda.is_available(),
    reason="needs a CUDA-enabled build (VQ_CUDA=ON) and a CUDA device",
)


def rel(got, ref):
    """||got - ref|| / ||ref|| (L2 over every element, in double)."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return math.sqrt(((got - ref) ** 2).sum() / max((ref ** 2).sum(), 1e-300))


def randn(*shape, seed, scale=1.0):
    """A float32 CPU tensor of standard normals from its own seeded generator, times scale."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale
