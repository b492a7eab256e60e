"""The CUDA caches from Python (veloxquant.cuda, torch CUDA tensors through DLPack) against the CPU
cache of the same configuration, their bad-input errors, batches and centred keys (files,
sliding windows and the outlier side store: test_cuda_files_and_windows.py; the transformers
integration's GPU layers: test_cuda_transformers.py). Skipped without torch,
without a CUDA-enabled build (VQ_CUDA=ON) or without a CUDA device; the build-without-CUDA
message is checked wherever the build lacks it.

Criteria as the C++ parity tests: for CudaTurboQuantCache (tests/cuda/test_cuda_parity.cpp)
codes identical up to exact quantizer ties (at most 0.1% of indices), dequantized tokens within
1e-5 relative (at most 0.1% of tokens differ), decode attention within 1e-3 relative (L2) of
the CPU cache's; for CudaKVCache, every method (tests/cuda/test_cuda_codec_cache.cpp), pages
byte-identical (0.1% of bytes for polarquant's transcendental encoder), dequantize within 1e-5
(1e-3), decode and causal prefill attention within 1e-3.
"""

import warnings

import numpy as np
import pytest

from veloxquant import CapacityError, _core
from veloxquant import cuda as vq_cuda
from veloxquant.cache.base import KVCacheConfig
from veloxquant.cache.base import _create as create_cpu_cache

from cuda_support import needs_cuda, randn, rel, torch

# (head_dim, bits, num_residuals, value_bits, num_heads)
SHAPES = [(128, 1, 1, 2, 8), (128, 4, 3, 16, 2), (128, 2, 2, 4, 2), (64, 3, 1, 1, 4), (64, 4, 2, 2, 1)]


def config_of(bits, stages, value_bits, seed=7):
    return KVCacheConfig(method="turboquant_rvq", bits=bits, num_residuals=stages,
                         value_bits=value_bits, seed=seed)


def test_build_without_cuda_says_so():
    if vq_cuda.HAS_CUDA:
        assert hasattr(_core, "CudaTurboQuantCache") and hasattr(_core, "CudaCodecCache")
        return
    assert _core.cuda_device_count() == 0 and not vq_cuda.is_available()
    with pytest.raises(RuntimeError, match="built without CUDA"):
        vq_cuda.CudaTurboQuantCache(config_of(2, 1, 2), 2, 64)
    with pytest.raises(RuntimeError, match="built without CUDA"):
        vq_cuda.CudaKVCache(KVCacheConfig(method="qjl"), 2, 64)


@needs_cuda
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "d{}_k{}r{}_v{}_h{}".format(*s))
def test_device_cache_matches_cpu_cache(shape):
    d, bits, stages, vbits, heads = shape
    config = config_of(bits, stages, vbits)
    cpu = create_cpu_cache(config, heads, d, 2048, 3)
    gpu = vq_cuda.CudaTurboQuantCache(config, heads, d, 2048, layer=3)
    seed, total = 100, 0
    for n in (37, 150, 64, 1):  # unaligned starts and page crossings
        k, v = randn(heads, n, d, seed=seed, scale=1.5), randn(heads, n, d, seed=seed + 1)
        seed += 2
        cpu.append(k.numpy(), v.numpy())
        gpu.append(k.cuda(), v.cuda())
        total += n
        for group in (1, 4):
            q = randn(group * heads, d, seed=seed, scale=0.05)  # the C++ parity test's scales
            seed += 1
            ref = cpu.attend(q[:, None, :].numpy(), scale=0.1)[:, 0, :]
            out = gpu.attend(q.cuda(), scale=0.1)
            assert out.shape == q.shape and out.device.type == "cuda" and out.dtype == torch.float32
            assert rel(out.cpu(), ref) <= 1e-3, (total, group)
    assert gpu.size == cpu.size == total

    # Codes: every page's key codes, key norms, value codes and value scales, by head.
    layout = gpu.layout
    P = layout["tokens_per_page"]
    idx_bad = scalar_bad = 0
    for page in range((total + P - 1) // P):
        raw = gpu.page(page)
        used = min(P, total - page * P)
        for h in range(heads):
            hl = layout["heads"][h]
            ref = _core._debug.page_regions(cpu._c, page, h)
            kcb, vcb = hl["key_code_bytes"], hl["value_code_bytes"]
            gk = raw[hl["key_codes_offset"]:hl["key_codes_offset"] + P * kcb].reshape(P, kcb)[:used]
            gv = raw[hl["value_codes_offset"]:hl["value_codes_offset"] + P * vcb].reshape(P, vcb)[:used]
            idx_bad += int((gk != ref["key_codes"][:used]).any(axis=1).sum())
            idx_bad += int((gv != ref["value_codes"][:used]).any(axis=1).sum())
            norms = raw[hl["key_scalars_offset"]:hl["key_scalars_offset"] + 4 * P].view(np.float32)[:used]
            ref_norms = ref["key_scalars"][0, :used]
            scalar_bad += int((np.abs(norms - ref_norms) > 1e-6 * np.abs(ref_norms)).sum())
            if hl["value_scalars"]:
                off = hl["value_scalars_offset"]
                scales = raw[off:off + 4 * P].view(np.float32)[:used]
                ref_scales = ref["value_scalars"][0, :used]
                scalar_bad += int((np.abs(scales - ref_scales) > 1e-6 * np.abs(ref_scales)).sum())
    rows = total * heads
    # A token whose code differs anywhere counts once per region; ties are rare (< 0.1%).
    assert idx_bad <= max(1, rows * 2 // 1000), idx_bad
    assert scalar_bad <= max(1, rows * 2 // 1000), scalar_bad

    # Dequantize: every token identical up to exact ties.
    gk, gv = gpu.dequantize()
    rk, rv = cpu.dequantize()
    assert gk.shape == (heads, total, d) and gk.device.type == "cuda"
    gk, gv = gk.cpu().numpy(), gv.cpu().numpy()
    bad = sum(rel(gk[h, t], rk[h, t]) > 1e-5 or rel(gv[h, t], rv[h, t]) > 1e-5
              for h in range(heads) for t in range(total))
    assert bad <= max(1, rows // 1000), bad
    assert gpu.nbytes > total * heads * d * bits // 8


@needs_cuda
def test_half_precision_inputs_batch_dimension_and_stream():
    d, heads = 128, 2
    config = config_of(4, 1, 4)
    a = vq_cuda.CudaTurboQuantCache(config, heads, d, 512)
    b = vq_cuda.CudaTurboQuantCache(config, heads, d, 512)
    k, v = randn(1, heads, 70, d, seed=1), randn(1, heads, 70, d, seed=2)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):  # work goes to torch's current stream
        a.append(k.cuda().half(), v.cuda().half())
        q = randn(1, 4 * heads, 1, d, seed=3).cuda().to(torch.bfloat16)
        out_a = a.attend(q)
    stream.synchronize()
    b.append(k.half().float().cuda(), v.half().float().cuda())
    out_b = b.attend(q.float())
    assert out_a.dtype == torch.bfloat16 and out_a.shape == q.shape
    assert rel(out_a.float().cpu(), out_b.cpu()) < 1e-2  # bf16 rounding of the output


def _expect_append_errors(cache, heads, d):
    """Every bad append a device cache refuses (in the wrapper and in the binding itself),
    leaving it empty."""
    good = torch.zeros(heads, 3, d, device="cuda")
    with pytest.raises(ValueError, match="CUDA tensor"):
        cache.append(good.cpu(), good.cpu())
    with pytest.raises(ValueError, match="CUDA tensor"):
        cache._impl.append(good.cpu(), good.cpu(), 0)  # the binding's own check
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        cache.append(good.double(), good.double())
    with pytest.raises(ValueError, match="float32"):
        cache._impl.append(good.half(), good.half(), 0)
    with pytest.raises(ValueError, match=rf"num_heads={heads}, n_tokens, head_dim={d}"):
        cache.append(torch.zeros(heads + 1, 3, d, device="cuda"),
                     torch.zeros(heads + 1, 3, d, device="cuda"))
    with pytest.raises(ValueError, match="same number of tokens"):
        cache.append(good, torch.zeros(heads, 4, d, device="cuda"))
    strided = torch.zeros(heads, d, 3, device="cuda").transpose(1, 2)
    with pytest.raises(ValueError, match="contiguous"):
        cache.append(strided, strided)
    with pytest.raises(ValueError, match="contiguous"):
        cache._impl.append(strided, strided, 0)
    for bad_value in (float("nan"), float("inf")):
        bad = good.clone()
        bad[heads - 1, 2, 5] = bad_value
        message = rf"values contain NaN or Inf \(head {heads - 1}, token 2\)"
        with pytest.raises(ValueError, match=message):
            cache.append(good, bad)
    assert cache.size == 0


@needs_cuda
def test_bad_inputs_are_reported_and_change_nothing():
    d, heads = 64, 2
    cache = vq_cuda.CudaTurboQuantCache(config_of(2, 1, 2), heads, d, 100)
    good = torch.zeros(heads, 3, d, device="cuda")
    _expect_append_errors(cache, heads, d)
    with pytest.raises(ValueError, match="no tokens"):
        cache.attend(torch.zeros(heads, d, device="cuda"))
    cache.append(torch.randn(heads, 99, d, device="cuda"), torch.randn(heads, 99, d, device="cuda"))
    with pytest.raises(CapacityError, match="max_seq_len"):
        cache.append(good, good)
    assert cache.size == 99
    with pytest.raises(ValueError, match="num_q_heads"):
        cache.attend(torch.zeros(heads, 2, d, device="cuda"))  # two queries per head
    with pytest.raises(ValueError, match="1..8 times"):
        cache.attend(torch.zeros(3, d, device="cuda"))
    with pytest.raises(ValueError, match="shaped like the queries"):
        cache.attend(torch.zeros(heads, d, device="cuda"), out=torch.zeros(heads, d + 1, device="cuda"))
    with pytest.raises(IndexError):
        cache.dequantize(90, 20)
    # Outside the backend's scope: a clear ValueError at construction.
    for bad in (KVCacheConfig(method="qjl"), config_of(5, 1, 2), config_of(2, 1, 3)):
        with pytest.raises(ValueError, match="CUDA backend"):
            vq_cuda.CudaTurboQuantCache(bad, heads, d)
    with pytest.raises(ValueError, match="head_dim must be 64 or 128"):
        vq_cuda.CudaTurboQuantCache(config_of(2, 1, 2), heads, 96)
    # trim and reset
    assert cache.trim(9) == 9 and cache.size == 90
    cache.reset()
    assert cache.size == 0
    cache.append(good, good)
    assert cache.size == 3


@needs_cuda
def test_turboquant_batch_steps_match_each_cache():
    """CudaTurboQuantBatch: decode steps of three sequences of different lengths (bfloat16
    inputs, as a model gives them) store what each cache alone stores and attend, in one launch,
    as each cache alone does (and within 1e-3 of the CPU cache); bad input changes no cache."""
    d, heads, group, lens = 128, 2, 4, (300, 64, 1)
    config = config_of(1, 1, 2)

    def make():
        return vq_cuda.CudaTurboQuantCache(config, heads, d, 1024, layer=2)

    joint, solo = [make() for _ in lens], [make() for _ in lens]
    cpu = [create_cpu_cache(config, heads, d, 1024, 2) for _ in lens]
    for b, n in enumerate(lens):
        k, v = randn(heads, n, d, seed=10 + b), randn(heads, n, d, seed=20 + b)
        for c in (joint[b], solo[b]):
            c.append(k.cuda(), v.cuda())
        cpu[b].append(k.numpy(), v.numpy())
    step = vq_cuda.CudaTurboQuantBatch()
    for t in range(3):
        k = randn(len(lens), heads, 1, d, seed=30 + t).to(torch.bfloat16)
        v = randn(len(lens), heads, 1, d, seed=40 + t).to(torch.bfloat16)
        step.append(joint, k.cuda(), v.cuda())
        q = randn(len(lens), group * heads, d, seed=50 + t, scale=0.05)
        out = step.attend(joint, q.cuda(), scale=0.1)
        assert out.shape == q.shape and out.dtype == torch.float32
        for b in range(len(lens)):
            solo[b].append(k[b].cuda(), v[b].cuda())
            cpu[b].append(k[b].float().numpy(), v[b].float().numpy())
            alone = solo[b].attend(q[b].cuda(), scale=0.1)
            assert rel(out[b].cpu(), alone.cpu()) <= 1e-5, (t, b)
            ref = cpu[b].attend(q[b][:, None, :].numpy(), scale=0.1)[:, 0, :]
            assert rel(out[b].cpu(), ref) <= 1e-3, (t, b)
    for b, n in enumerate(lens):
        assert joint[b].size == n + 3
        pages = (n + 3 + 63) // 64
        assert all((joint[b].page(p) == solo[b].page(p)).all() for p in range(pages))
    assert step.nbytes > 0
    # Bad input: NaN in sequence 1, a wrong shape, a full cache, a cache of another layer.
    sizes = [c.size for c in joint]
    bad = torch.zeros(len(lens), heads, 1, d, device="cuda")
    bad[1, 0, 0, 5] = float("nan")
    with pytest.raises(ValueError, match="sequence 1, head 0, token 0"):
        step.append(joint, bad, torch.zeros_like(bad))
    with pytest.raises(ValueError, match=r"\[batch, num_heads, n_tokens, head_dim\]"):
        step.append(joint, bad[:2], bad[:2])
    with pytest.raises(CapacityError):
        step.append(joint, torch.zeros(len(lens), heads, 722, d, device="cuda"),
                    torch.zeros(len(lens), heads, 722, d, device="cuda"))
    other = vq_cuda.CudaTurboQuantCache(config, heads, d, 1024, layer=3)
    other.append(torch.zeros(heads, 1, d, device="cuda"), torch.zeros(heads, 1, d, device="cuda"))
    with pytest.raises(ValueError, match="differs from sequence 0"):
        step.append(joint[:2] + [other], bad.nan_to_num(), bad.nan_to_num())
    with pytest.raises(ValueError, match="same cache"):
        step.attend([joint[0], joint[0]], torch.zeros(2, group * heads, d, device="cuda"))
    with pytest.raises(ValueError, match="not a CudaTurboQuantCache"):
        step.attend([joint[0], cpu[0]], torch.zeros(2, group * heads, d, device="cuda"))
    assert [c.size for c in joint] == sizes


@needs_cuda
@pytest.mark.parametrize("config", [
    KVCacheConfig(method="polarquant", bits=3, value_bits=4, seed=8),
    KVCacheConfig(method="qjl", bits=1, value_bits=2, sketch_dim=128, seed=3),
    KVCacheConfig(method="rabitq", bits=2, value_bits=4, num_clusters=8, seed=11),
], ids=lambda c: c.method)
def test_codec_batch_steps_match_each_cache(config):
    """CudaKVCacheBatch: decode steps of three sequences attend in one launch of each kernel
    as each CudaKVCache alone does (and within 1e-3 of the CPU cache), rabitq's too, whose
    caches each trained on their own prefill (the launch reads each sequence's centroids)."""
    d, heads, group, lens = 64, 2, 4, (130, 64, 20)
    joint = [vq_cuda.CudaKVCache(config, heads, d, 1024) for _ in lens]
    solo = [vq_cuda.CudaKVCache(config, heads, d, 1024) for _ in lens]
    cpu = [create_cpu_cache(config, heads, d, 1024, 0) for _ in lens]
    for b, n in enumerate(lens):
        k, v = randn(heads, n, d, seed=60 + b), randn(heads, n, d, seed=70 + b)
        for c in (joint[b], solo[b]):
            c.append(k.cuda(), v.cuda())
        cpu[b].append(k.numpy(), v.numpy())
    step = vq_cuda.CudaKVCacheBatch()
    assert step.alike(joint)
    for t in range(2):
        k = randn(len(lens), heads, 1, d, seed=80 + t)
        v = randn(len(lens), heads, 1, d, seed=90 + t)
        step.append(joint, k.cuda(), v.cuda())
        for b in range(len(lens)):
            solo[b].append(k[b].cuda(), v[b].cuda())
            cpu[b].append(k[b].numpy(), v[b].numpy())
        q = randn(len(lens), group * heads, d, seed=100 + t, scale=0.1)
        out = step.attend(joint, q.cuda(), scale=0.125)
        for b in range(len(lens)):
            alone = solo[b].attend(q[b].cuda(), scale=0.125)
            assert rel(out[b].cpu(), alone.cpu()) <= 1e-5, (t, b)
            ref = cpu[b].attend(q[b][:, None, :].numpy(), scale=0.125, causal=False)[:, 0, :]
            assert rel(out[b].cpu(), ref) <= 1e-3, (t, b)
    assert [c.size for c in joint] == [n + 2 for n in lens]
    with pytest.raises(ValueError, match="not a CudaKVCache"):
        step.append([joint[0], cpu[0]], torch.zeros(2, heads, 1, d, device="cuda"),
                    torch.zeros(2, heads, 1, d, device="cuda"))


def vecinfer_config(d, bits=2, sub_dim=2, seed=9):
    """vecinfer with a synthetic calibration: random product-VQ codewords and smoothing."""
    rng = np.random.default_rng(seed)
    codebook = rng.normal(0.0, 0.2, (d // sub_dim, 2 ** (bits * sub_dim), sub_dim))
    smooth = rng.uniform(0.5, 1.5, d)
    return KVCacheConfig(method="vecinfer", bits=bits, value_bits=4, seed=seed,
                         codebook=codebook.astype(np.float32),
                         smooth_factors=smooth.astype(np.float32))


# (id, config, num_heads, head_dim, fraction of page bytes that may differ from the CPU's)
CODEC_CASES = [
    ("tq_d96_dense_k3_v2", KVCacheConfig(method="turboquant_rvq", bits=3, value_bits=2,
                                         use_hadamard=False, seed=2), 2, 96, 0.0),
    ("ratequant_per_head", KVCacheConfig(method="ratequant", bits=3, value_bits=4, seed=5,
                                         bit_allocation={"0.0": 2, "0.1": 4}), 3, 128, 0.0),
    ("fp16_d128", KVCacheConfig(method="fp16", seed=6), 2, 128, 0.0),
    ("qjl_d128_m256_v2", KVCacheConfig(method="qjl", bits=1, value_bits=2, sketch_dim=256,
                                       seed=7), 2, 128, 0.0),
    ("polarquant_d64_b2_v4", KVCacheConfig(method="polarquant", bits=2, value_bits=4, seed=8),
     2, 64, 1e-3),
    ("rabitq_d128_trained_on_prefill", KVCacheConfig(method="rabitq", bits=2, value_bits=4,
                                                     num_clusters=16, seed=11), 2, 128, 0.0),
    ("vecinfer_d64_synthetic", vecinfer_config(64), 2, 64, 0.0),
]


def page_mismatch(gpu, cpu, total):
    """(differing bytes, bytes compared) of every head's regions over the used slots of every
    page, the device cache's against the CPU cache's."""
    layout = gpu.layout
    P = layout["tokens_per_page"]
    diff = count = 0
    for page in range((total + P - 1) // P):
        raw = gpu.page(page)
        used = min(P, total - page * P)
        for h, hl in enumerate(layout["heads"]):
            ref = _core._debug.page_regions(cpu._c, page, h)
            for name, size, rows in (("key_codes", hl["key_code_bytes"], None),
                                     ("key_scalars", 4 * P, hl["key_scalars"]),
                                     ("value_codes", hl["value_code_bytes"], None),
                                     ("value_scalars", 4 * P, hl["value_scalars"])):
                offset = hl[name + "_offset"]
                if rows is None:  # [P][bytes]
                    got = raw[offset:offset + P * size].reshape(P, size)[:used]
                    want = ref[name][:used]
                else:  # [rows][P] float32
                    got = raw[offset:offset + rows * size].view(np.float32).reshape(rows, P)
                    got = got[:, :used]
                    want = ref[name][:, :used]
                    got, want = got.view(np.uint8), np.ascontiguousarray(want).view(np.uint8)
                diff += int((got != want).sum())
                count += got.size
    return diff, count


@needs_cuda
@pytest.mark.parametrize("case", CODEC_CASES, ids=lambda c: c[0])
def test_codec_cache_matches_cpu_cache(case):
    _, config, heads, d, cell_mismatch = case
    hq = 4 * heads
    cpu = create_cpu_cache(config, heads, d, 4096, 0)
    gpu = vq_cuda.CudaKVCache(config, heads, d, 4096)
    seed, total = 100, 0
    # A prefill chunk (causal attention of its own queries), a second chunk across a page
    # boundary, then decode steps, in both query layouts.
    for n in (150, 70, 1, 1):
        k = randn(heads, n, d, seed=seed, scale=0.5)
        v = randn(heads, n, d, seed=seed + 1, scale=0.5)
        q = randn(hq, n, d, seed=seed + 2, scale=0.1)
        seed += 3
        cpu.append(k.numpy(), v.numpy())
        gpu.append(k.cuda(), v.cuda())
        total += n
        ref = cpu.attend(q.numpy(), scale=0.125, causal=True)
        out = gpu.attend(q.cuda(), scale=0.125)
        assert out.shape == q.shape and out.device.type == "cuda" and out.dtype == torch.float32
        assert rel(out.cpu(), ref) <= 1e-3, ("causal", total)
        if n == 1:
            out = gpu.attend(q[:, 0].cuda(), scale=0.125)
            assert out.shape == (hq, d) and rel(out.cpu(), ref[:, 0]) <= 1e-3, ("decode", total)
    assert gpu.size == cpu.size == total
    q = randn(hq, 2, d, seed=seed, scale=0.1)
    ref = cpu.attend(q.numpy(), scale=0.125, causal=False)
    assert rel(gpu.attend(q.cuda(), scale=0.125, causal=False).cpu(), ref) <= 1e-3, "non-causal"

    diff, count = page_mismatch(gpu, cpu, total)
    assert diff <= cell_mismatch * count, f"{diff} of {count} bytes differ"

    gk, gv = gpu.dequantize()
    rk, rv = cpu.dequantize()
    assert gk.shape == (heads, total, d) and gk.device.type == "cuda"
    tol = 1e-3 if cell_mismatch else 1e-5
    assert rel(gk.cpu(), rk) <= tol and rel(gv.cpu(), rv) <= tol
    gk, gv = gpu.dequantize(100, 30)
    assert rel(gk.cpu(), rk[:, 100:130]) <= tol and rel(gv.cpu(), rv[:, 100:130]) <= tol
    assert gpu.nbytes > 0

    # Truncation, then a decode step, as the CPU cache's trim.
    assert gpu.trim(total - 100) == total - 100 and gpu.size == 100
    cpu.trim(total - 100)
    q = randn(hq, d, seed=seed + 1, scale=0.1)
    ref = cpu.attend(q[:, None].numpy(), scale=0.125)[:, 0]
    assert rel(gpu.attend(q.cuda(), scale=0.125).cpu(), ref) <= 1e-3, "after trim"


@needs_cuda
def test_codec_cache_half_precision_batch_dimension_and_out():
    d, heads = 80, 2
    config = KVCacheConfig(method="qjl", bits=1, value_bits=4, seed=3)
    a = vq_cuda.CudaKVCache(config, heads, d, 512)
    b = vq_cuda.CudaKVCache(config, heads, d, 512)
    k, v = randn(1, heads, 70, d, seed=1), randn(1, heads, 70, d, seed=2)
    q = randn(1, 3 * heads, 5, d, seed=3).cuda().to(torch.bfloat16)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):  # work goes to torch's current stream
        a.append(k.cuda().half(), v.cuda().half())
        out_a = a.attend(q)
    stream.synchronize()
    b.append(k.half().float().cuda(), v.half().float().cuda())
    out_b = torch.empty(q.shape, device="cuda")
    assert b.attend(q.float(), out=out_b) is out_b
    assert out_a.dtype == torch.bfloat16 and out_a.shape == q.shape
    assert rel(out_a.float().cpu(), out_b.cpu()) < 1e-2  # bf16 rounding of the output
    decode = torch.empty(3 * heads, d, device="cuda")
    b.attend(q[0, :, -1].float(), out=decode)
    assert rel(decode.cpu(), out_b[0, :, -1].cpu()) < 1e-5
    assert "qjl" in repr(b) and b.method == "qjl"


@needs_cuda
def test_codec_cache_bad_inputs_are_reported_and_change_nothing():
    d, heads = 64, 2
    cache = vq_cuda.CudaKVCache(KVCacheConfig(method="polarquant", bits=2), heads, d, 100)
    good = torch.zeros(heads, 3, d, device="cuda")
    assert not cache.attend(torch.ones(heads, d, device="cuda"), causal=False).any()  # empty: zeros
    _expect_append_errors(cache, heads, d)
    cache.append(torch.randn(heads, 99, d, device="cuda"), torch.randn(heads, 99, d, device="cuda"))
    with pytest.raises(CapacityError, match="max_seq_len"):
        cache.append(good, good)
    assert cache.size == 99
    with pytest.raises(ValueError, match=r"num_q_heads, n_queries, head_dim=64"):
        flat = torch.zeros(heads, d, device="cuda")
        cache._impl.attend(flat, flat.clone(), 1.0, True, 0)
    with pytest.raises(ValueError, match=r"num_q_heads, n_queries, head_dim=64"):
        cache.attend(torch.zeros(heads, 2, d + 1, device="cuda"))
    with pytest.raises(ValueError, match="multiple"):
        cache.attend(torch.zeros(3, 1, d, device="cuda"))
    with pytest.raises(ValueError, match="causal"):
        cache.attend(torch.zeros(heads, 100, d, device="cuda"))  # more queries than tokens
    with pytest.raises(ValueError, match="shaped like the queries"):
        cache.attend(torch.zeros(heads, 2, d, device="cuda"),
                     out=torch.zeros(heads, 2, d + 1, device="cuda"))
    with pytest.raises(ValueError, match="shaped like the queries"):
        cache.attend(torch.zeros(heads, d, device="cuda"),
                     out=torch.zeros(heads, 1, d, device="cuda"))
    with pytest.raises(IndexError):
        cache.dequantize(90, 20)
    with pytest.raises(IndexError):
        cache._impl.truncate(120)
    with pytest.raises(IndexError):
        cache.page(2)
    # Outside the device cache's scope, or a config the method cannot take: ValueError.
    with pytest.raises(ValueError, match="head_dim"):
        vq_cuda.CudaKVCache(KVCacheConfig(method="fp16"), heads, 512)
    with pytest.raises(ValueError, match="needs calibration"):
        vq_cuda.CudaKVCache(KVCacheConfig(method="vecinfer"), heads, d)
    cache.reset()
    assert cache.size == 0
    cache.append(good, good)
    assert cache.size == 3


@needs_cuda
@pytest.mark.parametrize("kind,method", [("CudaTurboQuantCache", "turboquant_rvq"),
                                         ("CudaKVCache", "ratequant")])
def test_centred_device_cache_matches_cpu_cache(kind, method):
    """center_keys on both device caches through the bindings (the tuned kernels' and the
    generic ones'): keys with a shared pre-RoPE mean on half-split pairs, attention within 1e-3
    of the CPU cache of the same config, and most keys dequantized alike (a centre's rounding
    may move a code at a tie)."""
    heads, d, n = 2, 128, 300
    freqs = [10000.0 ** (-2.0 * i / d) for i in range(d // 2)]
    config = KVCacheConfig(method=method, bits=3, num_residuals=1, value_bits=4, seed=5,
                           center_keys=True, rope_inv_freq=freqs, rope_half_split=True)
    mean = randn(heads, d, seed=40, scale=3.0)
    angles = torch.arange(n, dtype=torch.float64)[:, None] * torch.tensor(freqs)[None, :]
    cos, sin = torch.cos(angles).float(), torch.sin(angles).float()
    x = mean[:, None, :] + randn(heads, n, d, seed=41)  # RoPE_t(mu + noise), rotate_half pairs
    re, im = x[..., : d // 2], x[..., d // 2:]
    keys = torch.cat([re * cos - im * sin, re * sin + im * cos], dim=-1).contiguous()
    values = randn(heads, n, d, seed=42)
    cpu = create_cpu_cache(config, heads, d, 1024, 0)
    gpu = getattr(vq_cuda, kind)(config, heads, d, 1024)
    for a, b in ((0, 200), (200, 201), (201, n)):
        cpu.append(keys[:, a:b].numpy(), values[:, a:b].numpy())
        gpu.append(keys[:, a:b].cuda(), values[:, a:b].cuda())
        q = randn(4 * heads, d, seed=43 + b, scale=0.1)
        want = cpu.attend(q[:, None, :].numpy(), scale=0.1)[:, 0, :]
        assert rel(gpu.attend(q.cuda(), scale=0.1).cpu(), want) <= 1e-3, b
    gk, _ = gpu.dequantize()
    rk, _ = cpu.dequantize()
    gk = gk.cpu().numpy()
    bad = sum(rel(gk[h, t], rk[h, t]) > 1e-4 for h in range(heads) for t in range(n))
    assert bad <= heads * n // 100, bad


@needs_cuda
@pytest.mark.parametrize("kind,method", [("CudaTurboQuantCache", "turboquant_rvq"),
                                         ("CudaKVCache", "ratequant")])
def test_a_short_first_device_append_warns_that_centring_is_off(kind, method):
    """As the CPU caches' appends: a centred device cache's first append (alone or through its
    batch class) of fewer than CENTER_MIN_TOKENS tokens warns; later or longer ones do not."""
    heads, d = 2, 128
    freqs = [10000.0 ** (-2.0 * i / d) for i in range(d // 2)]
    config = KVCacheConfig(method=method, bits=3, num_residuals=1, value_bits=4,
                           center_keys=True, rope_inv_freq=freqs, rope_half_split=True)
    keys, values = randn(heads, 20, d, seed=50).cuda(), randn(heads, 20, d, seed=51).cuda()
    make = getattr(vq_cuda, kind)
    short = make(config, heads, d, 256)
    with pytest.warns(RuntimeWarning, match="holds 8 tokens.*stay uncentred"):
        short.append(keys[:, :8].contiguous(), values[:, :8].contiguous())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        short.append(keys[:, 8:].contiguous(), values[:, 8:].contiguous())
        make(config, heads, d, 256).append(keys, values)
    step = vq_cuda.CudaTurboQuantBatch() if kind == "CudaTurboQuantCache" else \
        vq_cuda.CudaKVCacheBatch()
    pair = [make(config, heads, d, 256) for _ in range(2)]
    batch_keys = torch.stack([keys[:, :4], keys[:, 4:8]])
    batch_values = torch.stack([values[:, :4], values[:, 4:8]])
    with pytest.warns(RuntimeWarning, match="holds 4 tokens"):
        step.append(pair, batch_keys, batch_values)
