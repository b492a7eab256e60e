"""Oracle for the C++ Llama forward pass: an independent numpy forward over weights read and
dequantized by the gguf package (gguf-py), compared with the logits that tools/logits_dump writes.

Skips unless numpy and gguf import, the model exists (VQ_MODEL, default models/SmolLM2-135M-
Instruct.Q4_1.gguf) and VQ_LOGITS_DUMP names the logits_dump binary.

Conventions written from the GGUF/llama.cpp documentation, not from our C++: RMSNorm
x / sqrt(mean(x^2) + eps) * w; RoPE on adjacent pairs (x[2i], x[2i+1]) with
theta_i = base^(-2i / rope_dim) (GGUF llama Q/K rows are permuted by the converter, so llama.cpp
uses LLAMA_ROPE_TYPE_NORM); grouped-query causal softmax attention with scale 1/sqrt(head_dim);
SwiGLU; tied output head when output.weight is absent. Keys and values are rounded to float16
because the "fp16" cache that logits_dump uses stores them so.
"""

import os
import pathlib
import subprocess

import pytest

np = pytest.importorskip("numpy")
gguf = pytest.importorskip("gguf")
from gguf import quants  # noqa: E402  (after the importorskip guard)

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL = os.environ.get("VQ_MODEL") or str(ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
LOGITS_DUMP = os.environ.get("VQ_LOGITS_DUMP")
# "The capital of France is Paris. It is" in SmolLM2's vocabulary.
TOKENS = [504, 3575, 282, 4649, 314, 7042, 30, 657, 314]
TOLERANCE = 1e-3  # max |ours - numpy| / max |numpy|


def scalar(reader, key, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise KeyError(key)
        return default
    return field.parts[field.data[0]][0].item()


def weights(reader):
    """Every tensor as a float32 array of shape (rows, cols) or (n,)."""
    out = {}
    for t in reader.tensors:
        a = quants.dequantize(t.data, t.tensor_type)
        out[t.name] = np.asarray(a, dtype=np.float32).reshape(tuple(reversed(t.shape.tolist())))
    return out


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x, positions, rope_dim, base):
    """x: (T, heads, head_dim); rotates adjacent pairs of the first rope_dim coordinates."""
    i = np.arange(rope_dim // 2, dtype=np.float64)
    angle = positions[:, None] * base ** (-2.0 * i / rope_dim)  # (T, rope_dim / 2)
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    out = x.copy()
    x0, x1 = x[..., 0:rope_dim:2], x[..., 1:rope_dim:2]
    out[..., 0:rope_dim:2] = x0 * cos - x1 * sin
    out[..., 1:rope_dim:2] = x0 * sin + x1 * cos
    return out


def numpy_forward(path, tokens):
    reader = gguf.GGUFReader(path)
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "llama"
    n_layer = scalar(reader, "llama.block_count")
    n_head = scalar(reader, "llama.attention.head_count")
    n_head_kv = scalar(reader, "llama.attention.head_count_kv", n_head)
    n_embd = scalar(reader, "llama.embedding_length")
    head_dim = n_embd // n_head
    rope_dim = scalar(reader, "llama.rope.dimension_count", head_dim)
    base = scalar(reader, "llama.rope.freq_base", 10000.0)
    eps = scalar(reader, "llama.attention.layer_norm_rms_epsilon")
    w = weights(reader)

    T = len(tokens)
    pos = np.arange(T, dtype=np.float64)
    group = n_head // n_head_kv
    mask = np.triu(np.full((T, T), -np.inf), k=1)
    x = w["token_embd.weight"][tokens].astype(np.float64)
    for layer in range(n_layer):
        p = f"blk.{layer}."
        xn = rms_norm(x, w[p + "attn_norm.weight"], eps)
        q = (xn @ w[p + "attn_q.weight"].T).reshape(T, n_head, head_dim)
        k = (xn @ w[p + "attn_k.weight"].T).reshape(T, n_head_kv, head_dim)
        v = (xn @ w[p + "attn_v.weight"].T).reshape(T, n_head_kv, head_dim)
        q = rope(q, pos, rope_dim, base)
        k = rope(k, pos, rope_dim, base).astype(np.float16).astype(np.float64)
        v = v.astype(np.float16).astype(np.float64)
        att = np.empty((T, n_head, head_dim))
        for h in range(n_head):
            s = q[:, h] @ k[:, h // group].T / np.sqrt(head_dim) + mask
            s = np.exp(s - s.max(axis=1, keepdims=True))
            att[:, h] = (s / s.sum(axis=1, keepdims=True)) @ v[:, h // group]
        x = x + att.reshape(T, -1) @ w[p + "attn_output.weight"].T
        xf = rms_norm(x, w[p + "ffn_norm.weight"], eps)
        gate = xf @ w[p + "ffn_gate.weight"].T
        up = xf @ w[p + "ffn_up.weight"].T
        x = x + (gate / (1.0 + np.exp(-gate)) * up) @ w[p + "ffn_down.weight"].T
    head = w.get("output.weight", w["token_embd.weight"])
    return rms_norm(x, w["output_norm.weight"], eps) @ head.T


@pytest.fixture(scope="module")
def paths():
    if not os.path.exists(MODEL):
        pytest.skip(f"{MODEL} not found (set VQ_MODEL)")
    if not LOGITS_DUMP:
        pytest.skip("VQ_LOGITS_DUMP (path of the logits_dump binary) is not set")
    return MODEL, LOGITS_DUMP


def ours(dump, model, out, *extra):
    ids = ",".join(map(str, TOKENS))
    subprocess.run([dump, model, "--tokens", ids, "--out", str(out), *extra], check=True,
                   capture_output=True)
    return np.fromfile(out, dtype="<f4")


def test_logits_match_numpy_forward(paths, tmp_path):
    model, dump = paths
    expected = numpy_forward(model, TOKENS)
    got = ours(dump, model, tmp_path / "all.f32").reshape(expected.shape)
    rel = np.abs(got - expected).max() / np.abs(expected).max()
    print(f"max |ours - numpy| / max |numpy| = {rel:.3e}")
    assert rel < TOLERANCE
    # Same next-token predictions at every position.
    assert (got.argmax(axis=1) == expected.argmax(axis=1)).all()


def test_chunked_and_last_only_runs_agree(paths, tmp_path):
    model, dump = paths
    full = ours(dump, model, tmp_path / "full.f32").reshape(len(TOKENS), -1)
    chunked = ours(dump, model, tmp_path / "chunked.f32", "--chunk", "3").reshape(full.shape)
    last = ours(dump, model, tmp_path / "last.f32", "--last")
    scale = np.abs(full).max()
    # Chunks of 3 take the dot-product kernels, the 9-token call the register tiles: float sums
    # in another order, which can round a key or value to the neighbouring fp16 value in the
    # cache, so the bound is the oracle's rather than float round-off.
    assert np.abs(chunked - full).max() / scale < TOLERANCE
    assert np.abs(last - full[-1]).max() / scale < 1e-5
