"""Independent numpy reference implementations of VeloxQuant's codecs, written from the
documented formats (DESIGN.md, include/ and the codec headers), for the test suite.

Nothing here calls the library except for the Lloyd-Max codebooks, which the tests read
through ``veloxquant._core._debug.scalar_codebook`` (and check separately against their
defining density). The seeded random objects are rebuilt from the documented generators:
SplitMix64 seed derivation, xoshiro256** streams, Box-Muller normals in double precision.
"""

from __future__ import annotations

import math

import numpy as np

MASK64 = (1 << 64) - 1
KEY_ROTATION, VALUE_ROTATION, SKETCH = 1, 2, 3  # RandomPurpose


def _splitmix64(state: int) -> tuple[int, int]:
    state = (state + 0x9E3779B97F4A7C15) & MASK64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return state, z ^ (z >> 31)


def derive_seed(seed: int, layer: int, head: int, dim: int, purpose: int) -> int:
    """Mixes (seed, layer, head, dim, purpose) into one 64-bit seed, as core/rng.cpp does."""
    state, h = _splitmix64(seed & MASK64)
    for part in (layer & 0xFFFFFFFF, head & 0xFFFFFFFF, dim & 0xFFFFFFFF, purpose):
        state = h ^ ((part * 0xD6E8FEB86659FD93) & MASK64)
        state, h = _splitmix64(state)
    return h


def _rotl(x: int, k: int) -> int:
    return ((x << k) | (x >> (64 - k))) & MASK64


class Rng:
    """xoshiro256** seeded by SplitMix64; uniform with 53 bits; Box-Muller normals whose
    second value of each pair is kept for the next call."""

    def __init__(self, seed: int) -> None:
        state = seed & MASK64
        self.s = []
        for _ in range(4):
            state, z = _splitmix64(state)
            self.s.append(z)
        self.spare: float | None = None

    def next_u64(self) -> int:
        s = self.s
        result = (_rotl((s[1] * 5) & MASK64, 7) * 9) & MASK64
        t = (s[1] << 17) & MASK64
        s[2] ^= s[0]
        s[3] ^= s[1]
        s[1] ^= s[2]
        s[0] ^= s[3]
        s[2] ^= t
        s[3] = _rotl(s[3], 45)
        return result

    def uniform(self) -> float:
        return (self.next_u64() >> 11) * 2.0**-53

    def normal(self) -> float:
        if self.spare is not None:
            value, self.spare = self.spare, None
            return value
        u1 = 0.0
        while u1 <= 0.0:
            u1 = self.uniform()
        u2 = self.uniform()
        r = math.sqrt(-2.0 * math.log(u1))
        theta = 6.283185307179586476925 * u2
        self.spare = r * math.sin(theta)
        return r * math.cos(theta)


def hadamard(d: int) -> np.ndarray:
    """The Sylvester Hadamard matrix of order d (a power of two), entries +-1."""
    h = np.ones((1, 1))
    while h.shape[0] < d:
        h = np.block([[h, h], [h, -h]])
    return h


def rotation_matrix(d: int, use_hadamard: bool, seed: int) -> np.ndarray:
    """R (float64, y = R x): the randomized Walsh-Hadamard transform H diag(signs) / sqrt(d)
    for a power-of-two d with use_hadamard, else the Gram-Schmidt (twice) orthonormalisation
    of a row-major Gaussian matrix, stored as float32."""
    rng = Rng(seed)
    if use_hadamard and d & (d - 1) == 0:
        signs = np.array([-1.0 if rng.next_u64() >> 63 else 1.0 for _ in range(d)])
        return hadamard(d) / math.sqrt(d) * signs[None, :]
    a = np.array([rng.normal() for _ in range(d * d)]).reshape(d, d)
    for i in range(d):
        for _ in range(2):
            for j in range(i):
                a[i] -= (a[i] @ a[j]) * a[j]
        a[i] /= math.sqrt(a[i] @ a[i])
    return a.astype(np.float32).astype(np.float64)


def gaussian_sketch(m: int, d: int, seed: int) -> np.ndarray:
    """The QJL sketch S [m, d]: row-major standard normals, stored as float32."""
    rng = Rng(seed)
    return np.array([rng.normal() for _ in range(m * d)], dtype=np.float32).reshape(m, d)


def unpack(codes: np.ndarray, count: int, bits: int) -> np.ndarray:
    """[n, count] indices of `bits` bits each from an LSB-first packed stream per row."""
    stream = np.unpackbits(codes.astype(np.uint8), axis=-1, bitorder="little")
    fields = stream[..., : count * bits].reshape(*codes.shape[:-1], count, bits).astype(np.int64)
    return (fields << np.arange(bits)).sum(-1)


def quantize(x: np.ndarray, boundaries: np.ndarray) -> np.ndarray:
    """Lloyd-Max cell of each x: the number of boundaries strictly below it."""
    return np.searchsorted(boundaries, x, side="left")


def turboquant_decode(codes: np.ndarray, norms: np.ndarray, rotation: np.ndarray,
                      centroids: list[np.ndarray], bits: int) -> np.ndarray:
    """k_hat = ||k|| R^T sum_s C_s[i_s]; codes [n, stages * ceil(d * bits / 8)]."""
    d = rotation.shape[0]
    stage_bytes = (d * bits + 7) // 8
    total = np.zeros((codes.shape[0], d))
    for s, c in enumerate(centroids):
        total += c[unpack(codes[:, s * stage_bytes:(s + 1) * stage_bytes], d, bits)]
    return norms[:, None] * (total @ rotation)


def turboquant_encode(keys: np.ndarray, rotation: np.ndarray, centroids: list[np.ndarray],
                      boundaries: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(indices [n, stages, d], norms [n]) of TurboQuant RVQ on keys [n, d]."""
    norms = np.linalg.norm(keys, axis=1)
    u = keys @ rotation.T / np.where(norms > 0, norms, 1.0)[:, None]
    stages = []
    for c, b in zip(centroids, boundaries):
        idx = quantize(u, b)
        stages.append(idx)
        u = u - c[idx]
    return np.stack(stages, axis=1), norms


def qjl_signs(codes: np.ndarray, m: int) -> np.ndarray:
    """+-1 [n, m] from the packed sign bits (bit i set iff (S k)_i >= 0)."""
    return np.where(unpack(codes, m, 1) == 1, 1.0, -1.0)


def qjl_decode(codes: np.ndarray, norms: np.ndarray, sketch: np.ndarray) -> np.ndarray:
    """||k|| sqrt(pi/2)/m S^T sign(S k)."""
    m = sketch.shape[0]
    return norms[:, None] * math.sqrt(math.pi / 2) / m * (qjl_signs(codes, m) @ sketch)


def qjl_scores(query: np.ndarray, codes: np.ndarray, norms: np.ndarray,
               sketch: np.ndarray) -> np.ndarray:
    """The unbiased estimator sqrt(pi/2)/m * ||k|| * <S q, sign(S k)> for every token."""
    m = sketch.shape[0]
    return math.sqrt(math.pi / 2) / m * norms * (qjl_signs(codes, m) @ (sketch @ query))


def polar_layout(d: int, bits: int) -> tuple[int, int]:
    """(bytes of the d/2 level-1 indices at bits + 2, bytes of the d/4 + d/8 + d/16 upper
    indices at bits); the d/16 fp16 final radii follow."""
    return (d // 2 * (bits + 2) + 7) // 8, ((d // 4 + d // 8 + d // 16) * bits + 7) // 8


def polar_decode(codes: np.ndarray, norms: np.ndarray, rotation: np.ndarray,
                 centroids: list[np.ndarray], bits: int) -> np.ndarray:
    """Inverse 4-level polar transform: each block of 16 rotated coordinates unfolds from its
    final radius (||k|| times the stored fp16 ratio) through the level 4..1 angles (a radius
    r and angle psi become r cos psi, r sin psi), then k = R^T y. centroids[l - 1] holds the
    level-l angle centroids."""
    d = rotation.shape[0]
    l1, upper = polar_layout(d, bits)
    levels = [unpack(codes[:, :l1], d // 2, bits + 2)]
    rest = unpack(codes[:, l1:l1 + upper], d // 4 + d // 8 + d // 16, bits)
    for width in (d // 4, d // 8, d // 16):
        levels.append(rest[:, :width])
        rest = rest[:, width:]
    radii = codes[:, l1 + upper:].copy().view(np.float16).astype(np.float64)
    r = norms[:, None] * radii
    for level in (4, 3, 2, 1):
        angle = centroids[level - 1][levels[level - 1]]
        r = np.stack([r * np.cos(angle), r * np.sin(angle)], axis=-1).reshape(len(r), -1)
    return r @ rotation


def polar_encode(keys: np.ndarray, rotation: np.ndarray,
                 boundaries: list[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]:
    """(angle indices of levels 1..4, final radii / ||k||) of keys [n, d]: level-1 angles
    atan2(y_odd, y_even) in [0, 2 pi), upper levels atan2 of pairs of radii."""
    norms = np.linalg.norm(keys, axis=1)
    y = keys @ rotation.T
    theta = np.mod(np.arctan2(y[:, 1::2], y[:, 0::2]), 2 * np.pi)
    indices = [quantize(theta, boundaries[0])]
    r = np.hypot(y[:, 0::2], y[:, 1::2])
    for level in (2, 3, 4):
        indices.append(quantize(np.arctan2(r[:, 1::2], r[:, 0::2]), boundaries[level - 1]))
        r = np.hypot(r[:, 0::2], r[:, 1::2])
    return indices, r / norms[:, None]


def value_decode(codes: np.ndarray, scales: np.ndarray, rotation: np.ndarray,
                 centroids: np.ndarray, bits: int) -> np.ndarray:
    """v_hat = scale R^T c[i] (bits 1..8), or the fp16 values themselves (bits 16)."""
    d = rotation.shape[0]
    if bits == 16:
        return codes.view(np.float16).astype(np.float64)
    return scales[:, None] * (centroids[unpack(codes, d, bits)] @ rotation)


def value_encode(values: np.ndarray, rotation: np.ndarray, centroids: np.ndarray,
                 boundaries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(indices [n, d], scales [n]): u = R v / ||v|| quantized per coordinate, and the
    least-squares scale ||v|| <u, c> / ||c||^2."""
    norms = np.linalg.norm(values, axis=1)
    u = values @ rotation.T / np.where(norms > 0, norms, 1.0)[:, None]
    idx = quantize(u, boundaries)
    c = centroids[idx]
    scales = norms * (u * c).sum(1) / (c * c).sum(1)
    return idx, scales


def attention(queries: np.ndarray, keys: np.ndarray, values: np.ndarray, scale: float,
              causal: bool, scores=None) -> np.ndarray:
    """Softmax attention with grouped-query heads. queries [Hq, nq, d], keys/values
    [H, T, d]; scores(h, q) -> [T] overrides q . keys[h] (e.g. a codec's estimator)."""
    hq, nq, _ = queries.shape
    h_kv, total, _ = keys.shape
    group = hq // h_kv
    out = np.zeros(queries.shape)
    for g in range(hq):
        h = g // group
        for i in range(nq):
            s = scores(h, queries[g, i]) if scores else keys[h] @ queries[g, i]
            logits = scale * np.asarray(s, dtype=np.float64)
            if causal:
                logits[total - nq + i + 1:] = -np.inf
            p = np.exp(logits - logits.max())
            out[g, i] = (p / p.sum()) @ values[h]
    return out


def rotated_coordinate_pdf(d: int, x: np.ndarray) -> np.ndarray:
    """Unnormalised density of one coordinate of a uniform unit vector in R^d."""
    return np.clip(1.0 - x * x, 0.0, None) ** ((d - 3) / 2)
