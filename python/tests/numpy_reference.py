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


# ---- RaBitQ (methods/rabitq.h) ---------------------------------------------------------------
# Code of one token: cluster id (1 byte if num_clusters <= 256, else 2, little-endian), then d
# levels u_j of `bits` bits packed LSB-first; one float f per token. Grid point
# x_bar_j = u_j - (2^B - 1)/2; decode x_hat = c + f x_bar, k_hat = R^T x_hat;
# score = <q', c> + f <x_bar, q'> with q' = R q.


def read_rabitq_file(path) -> dict:
    """Parses a QuantizedKVCache file of method rabitq (cache_io.cpp): the frame (magic
    VQKVCACH, u32 version 2, 3 or 4, u32 kind 1, u64 payload length, u32 CRC-32), the config
    (version 3 ends it with the center_keys flag, version 4 then with the rope_half_split
    flag), the shape and each head's codec state (with
    center_keys first u8 estimated + u64 count + float32 mean [d]; then i32 d, i32 k, u64 count
    + float32 centroids [k][d]). Returns method, seed, center_keys, rope_half_split, num_heads, head_dim, layer,
    size, centroids (one [k, d] per head) and whether the CRC matched; the pages that follow
    are not parsed."""
    import struct
    import zlib

    data = open(path, "rb").read()
    if data[:8] != b"VQKVCACH":
        raise ValueError("not a VeloxQuant cache file")
    version, kind, length, crc = struct.unpack_from("<IIQI", data, 8)
    if version not in (2, 3, 4) or kind != 1:
        raise ValueError(f"unsupported version/kind {version}/{kind}")
    payload = data[28:]
    if len(payload) != length:
        raise ValueError("truncated cache file")
    pos = 0

    def take(fmt):
        nonlocal pos
        values = struct.unpack_from("<" + fmt, payload, pos)
        pos += struct.calcsize("<" + fmt)
        return values if len(values) > 1 else values[0]

    def string():
        nonlocal pos
        n = take("Q")
        pos += n
        return payload[pos - n:pos].decode()

    def array():  # FloatArray: vec<int64> shape, vec<float> data
        nonlocal pos
        for size in (8, 4):
            n = take("Q")
            pos += size * n

    out = {"method": string()}
    ints = take("9i")
    out["bits"], out["num_clusters"] = ints[0], ints[5]
    out["use_hadamard"], _ = take("BB")
    out["seed"] = take("Q")
    array()  # codebook
    array()  # smooth_factors
    for _ in range(take("Q")):
        array()  # rotations
    for _ in range(take("Q")):
        string()
        take("i")  # bit_allocation
    array()  # ivf_centroids
    for _ in range(take("Q")):
        take("d")  # rope_inv_freq
    if take("B"):
        take("dq")  # outlier observer
        raise ValueError("outlier stores are not parsed")
    out["center_keys"] = version >= 3 and take("B") == 1
    out["rope_half_split"] = version >= 4 and take("B") == 1
    out["num_heads"], out["head_dim"], out["max_seq_len"], out["layer"] = take("4i")
    out["class_name"] = string()
    out["size"] = take("i")
    if out["method"] != "rabitq":
        raise ValueError("only rabitq codec state is parsed")
    centroids = []
    for _ in range(out["num_heads"]):
        if out["center_keys"]:
            take("B")  # estimated
            n = take("Q")
            pos += 4 * n  # the key mean
        d, k = take("2i")
        count = take("Q")
        if d != out["head_dim"] or count != k * d:
            raise ValueError("corrupted rabitq state")
        centroids.append(np.frombuffer(payload, np.float32, count, pos).reshape(k, d).copy())
        pos += 4 * count
    out["centroids"] = centroids
    out["crc_ok"] = zlib.crc32(payload) == crc
    return out


def rabitq_id_bytes(num_clusters: int) -> int:
    return 1 if num_clusters <= 256 else 2


def rabitq_split(codes: np.ndarray, d: int, bits: int, num_clusters: int) -> tuple[np.ndarray, np.ndarray]:
    """(cluster ids [n], levels [n, d]) of raw codes [n, id bytes + ceil(d bits / 8)]."""
    ib = rabitq_id_bytes(num_clusters)
    ids = codes[:, 0].astype(np.int64)
    if ib == 2:
        ids = ids | (codes[:, 1].astype(np.int64) << 8)
    return ids, unpack(codes[:, ib:], d, bits)


def rabitq_grid(levels: np.ndarray, bits: int) -> np.ndarray:
    """x_bar = u - (2^B - 1)/2."""
    return levels - 0.5 * ((1 << bits) - 1)


def rabitq_decode(codes: np.ndarray, f: np.ndarray, centroids: np.ndarray, rotation: np.ndarray,
                  bits: int, num_clusters: int) -> np.ndarray:
    """k_hat = R^T (c[id] + f x_bar) for every token."""
    d = rotation.shape[0]
    ids, levels = rabitq_split(codes, d, bits, num_clusters)
    x_hat = centroids[ids] + f[:, None] * rabitq_grid(levels, bits)
    return x_hat @ rotation


def rabitq_scores(query: np.ndarray, codes: np.ndarray, f: np.ndarray, centroids: np.ndarray,
                  rotation: np.ndarray, bits: int, num_clusters: int) -> np.ndarray:
    """The estimator <q', c[id]> + f <x_bar, q'> (q' = R q) of every token, from the codes."""
    d = rotation.shape[0]
    q = rotation @ query
    ids, levels = rabitq_split(codes, d, bits, num_clusters)
    return (centroids @ q)[ids] + f * (rabitq_grid(levels, bits) @ q)


def rabitq_cosine(levels: np.ndarray, residual: np.ndarray, bits: int) -> np.ndarray:
    """<x_bar, e> / (||x_bar|| ||e||) of levels [..., d] against residuals [..., d]."""
    g = rabitq_grid(levels, bits)
    num = (g * residual).sum(-1)
    den = np.linalg.norm(g, axis=-1) * np.linalg.norm(residual, axis=-1)
    return num / np.where(den > 0, den, 1.0)


def rabitq_best_levels(residual: np.ndarray, bits: int) -> np.ndarray:
    """Levels [d] maximising the cosine <x_bar, e>/||x_bar|| over the 2^(B d) codes, by the
    critical-point argument: the optimum has the signs of e and magnitudes s_j + 1/2 with
    s_j = min(floor(t |e_j|), M - 1), M = 2^(B-1), for some t > 0; s is constant between
    consecutive critical values s/|e_j|, so evaluating one t inside every such interval (and
    one below the first) is exhaustive. Ties go to the smallest t."""
    m = 1 << (bits - 1)
    a = np.abs(residual)
    if m > 1 and np.any(a > 0):
        crit = np.unique((np.arange(1, m)[None, :] / a[a > 0][:, None]).ravel())
        t = np.concatenate([[crit[0] / 2], (crit[:-1] + crit[1:]) / 2, [crit[-1] * 2]])
        s = np.minimum(np.floor(t[:, None] * a[None, :]), m - 1)
        g = s + 0.5
        cos2 = (g @ a) ** 2 / (g * g).sum(1)
        steps = s[int(np.argmax(cos2))].astype(np.int64)
    else:
        steps = np.zeros(len(a), dtype=np.int64)
    return np.where(residual >= 0, m + steps, m - 1 - steps)


def rabitq_brute_force_levels(residual: np.ndarray, bits: int) -> np.ndarray:
    """Levels [d] of the best cosine found by enumerating every one of the 2^(B d) codes
    (small d only); ties to the first code in lexicographic order."""
    d = len(residual)
    grids = np.stack(np.meshgrid(*[np.arange(1 << bits)] * d, indexing="ij"), -1).reshape(-1, d)
    cos = rabitq_cosine(grids, residual[None, :], bits)
    return grids[int(np.argmax(cos))]


def rabitq_factor(levels: np.ndarray, residual: np.ndarray, bits: int) -> np.ndarray:
    """f = ||e||^2 / <x_bar, e> (0 where e = 0)."""
    num = (residual * residual).sum(-1)
    den = (rabitq_grid(levels, bits) * residual).sum(-1)
    return np.where(num > 0, num / np.where(den != 0, den, 1.0), 0.0)


def rabitq_encode(keys: np.ndarray, rotation: np.ndarray, centroids: np.ndarray,
                  bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(cluster ids [n], levels [n, d], f [n], rotated keys [n, d]) of keys [n, d]: the
    nearest centroid (squared L2, ties to the lowest index) of x = R k, then the best levels
    of e = x - c and f."""
    x = keys @ rotation.T
    dist = ((x[:, None, :] - centroids[None, :, :]) ** 2).sum(-1)
    ids = np.argmin(dist, axis=1)
    residual = x - centroids[ids]
    levels = np.stack([rabitq_best_levels(e, bits) for e in residual])
    return ids, levels, rabitq_factor(levels, residual, bits), x
