"""The CUDA caches from Python against the CPU cache of the same configuration (as test_cuda.py,
with its criteria): a device cache's move to the CPU and its files, sliding windows (codec and
turboquant caches, one by one and batched) and the outlier side store. Skipped without torch, a
CUDA-enabled build or a CUDA device.
"""

import numpy as np
import pytest

from veloxquant import KeyNormObserver
from veloxquant import cuda as vq_cuda
from veloxquant.cache.base import KVCacheConfig
from veloxquant.cache.base import _create as create_cpu_cache

from cuda_support import needs_cuda, rel, torch


@needs_cuda
def test_codec_cache_to_cpu_save_and_load(tmp_path):
    """A device cache's pages and learned state (rabitq's centroids, trained on the GPU cache's
    first append) become a CPU cache, and a saved file loads back onto the device."""
    from veloxquant.cache.base import KVCache
    config = KVCacheConfig(method="rabitq", bits=2, value_bits=4, num_clusters=8, seed=5)
    gpu = vq_cuda.CudaKVCache(config, 2, 64, max_seq_len=512)
    g = torch.Generator(device="cuda").manual_seed(1)
    keys = torch.randn(2, 100, 64, device="cuda", generator=g)
    gpu.append(keys, torch.randn(2, 100, 64, device="cuda", generator=g))
    queries = torch.randn(8, 64, device="cuda", generator=g)
    want = gpu.attend(queries)
    cpu = gpu.to_cpu()
    assert type(cpu).__name__ == "RaBitQKVCache" and cpu.size == 100
    got = cpu.attend(queries.cpu().numpy()[:, None, :], causal=True)[:, 0]
    np.testing.assert_allclose(got, want.cpu().numpy(), rtol=1e-3, atol=1e-4)
    path = tmp_path / "gpu.vqc"
    gpu.save(path)
    assert KVCache.load(path).size == 100
    back = vq_cuda.CudaKVCache.load(path)
    assert back.size == 100 and back.method == "rabitq"
    torch.testing.assert_close(back.attend(queries), want, rtol=1e-5, atol=1e-6)
    with pytest.raises((RuntimeError, ValueError)):
        path.write_bytes(path.read_bytes()[:-10])
        vq_cuda.CudaKVCache.load(path)


def _window_steps(gpu, cpu, seed, decode_only):
    """Appends chunks of 300 and 40 tokens and three single tokens ([2, n, 128]) to a device
    window and its CPU twin; after each, 8 query heads attend on both within 1e-3: the chunk's
    queries causally, or one decode query. Returns the generator, for more inputs."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    for n in (300, 40, 1, 1, 1):
        k = torch.randn(2, n, 128, device="cuda", generator=g)
        v = torch.randn(2, n, 128, device="cuda", generator=g)
        gpu.append(k, v)
        cpu.append(k.cpu().numpy(), v.cpu().numpy())
        if decode_only:
            q = torch.randn(8, 128, device="cuda", generator=g)
            want = cpu.attend(q.cpu().numpy()[:, None, :], causal=True)[:, 0]
        else:
            q = torch.randn(8, n, 128, device="cuda", generator=g)
            want = cpu.attend(q.cpu().numpy(), causal=True)
        assert rel(gpu.attend(q).cpu().numpy(), want) < 1e-3, n
    return g


def _batched_window_step(step, gpu, g):
    """A second window like gpu (empty_like, 150 tokens) and gpu take a decode step together
    through the batch `step`, alike; each sequence's output follows its cache alone (1e-5).
    Returns the step's keys [2, 2, 1, 128] and queries [2, 8, 128]."""
    other = gpu.empty_like()
    other.append(torch.randn(2, 150, 128, device="cuda", generator=g),
                 torch.randn(2, 150, 128, device="cuda", generator=g))
    assert step.alike([gpu, other])
    k = torch.randn(2, 2, 1, 128, device="cuda", generator=g)
    step.append([gpu, other], k, k)
    q = torch.randn(2, 8, 128, device="cuda", generator=g)
    together = step.attend([gpu, other], q)
    for b, cache in enumerate((gpu, other)):
        assert rel(together[b].cpu().numpy(), cache.attend(q[b]).cpu().numpy()) < 1e-5, b
    return k, q


@needs_cuda
def test_codec_cache_sliding_window_matches_the_cpu_window(tmp_path):
    """CudaKVCache(window=, sink_tokens=) attends as a CPU SlidingWindowKVCache of the same
    window (decode and a causal chunk, 1e-3), evicts the same pages, refuses what it refuses, and
    goes through to_cpu, a saved file and from_cpu with its window."""
    from veloxquant.cache.base import KVCache
    from veloxquant.cache.sliding_window_cache import SlidingWindowKVCache
    config = KVCacheConfig(method="turboquant_rvq", bits=2, value_bits=4, seed=9)
    gpu = vq_cuda.CudaKVCache(config, 2, 128, max_seq_len=2048, window=100, sink_tokens=4)
    cpu = SlidingWindowKVCache(create_cpu_cache(config, 2, 128, 2048, 0), 100, sink_tokens=4)
    assert (gpu.window, gpu.sink_tokens) == (100, 4) and "window=100" in repr(gpu)
    g = _window_steps(gpu, cpu, 2, decode_only=False)
    # pages wholly inside [4, 343 - 1 + 1 - 100) are gone: 1 and 2
    assert [gpu.position_held(64 * p) for p in range(6)] == [True, False, False, True, True, True]
    with pytest.raises(ValueError):  # a chunk whose first queries' windows were evicted
        gpu.attend(torch.randn(8, 100, 128, device="cuda", generator=g))
    with pytest.raises((IndexError, ValueError)):
        gpu.page(2)
    q = torch.randn(8, 128, device="cuda", generator=g)
    want = gpu.attend(q)
    host = gpu.to_cpu()
    assert isinstance(host, SlidingWindowKVCache) and (host.window, host.sink_tokens) == (100, 4)
    assert rel(host.attend(q.cpu().numpy()[:, None, :], causal=True)[:, 0],
               want.cpu().numpy()) < 1e-3
    path = tmp_path / "window.vqc"
    gpu.save(path)
    assert isinstance(KVCache.load(path), SlidingWindowKVCache)
    back = vq_cuda.CudaKVCache.load(path)
    assert (back.window, back.sink_tokens, back.size) == (100, 4, 343)
    torch.testing.assert_close(back.attend(q), want, rtol=1e-5, atol=1e-6)
    again = vq_cuda.CudaKVCache.from_cpu(cpu)
    assert again.window == 100 and not again.position_held(64)
    assert gpu.empty_like().window == 100
    # Windows of one width batch: a decode step of two in one launch follows each alone.
    step = vq_cuda.CudaKVCacheBatch()
    assert not step.alike([gpu, vq_cuda.CudaKVCache(config, 2, 128, max_seq_len=2048)])
    _batched_window_step(step, gpu, g)


@needs_cuda
def test_turboquant_cache_sliding_window_matches_the_cpu_window():
    """CudaTurboQuantCache(window=, sink_tokens=) decodes as a CPU SlidingWindowKVCache of the
    same window (1e-3; the 1-bit / 2-bit layout, which the window sends to the general kernels),
    evicts the same pages, refuses evicted tokens, and batches with windows of its width."""
    from veloxquant.cache.sliding_window_cache import SlidingWindowKVCache
    config = KVCacheConfig(method="turboquant_rvq", bits=1, value_bits=2, seed=9)
    gpu = vq_cuda.CudaTurboQuantCache(config, 2, 128, max_seq_len=2048, window=100,
                                      sink_tokens=4)
    cpu = SlidingWindowKVCache(create_cpu_cache(config, 2, 128, 2048, 0), 100, sink_tokens=4)
    assert (gpu.window, gpu.sink_tokens) == (100, 4) and "window=100" in repr(gpu)
    g = _window_steps(gpu, cpu, 3, decode_only=True)
    # pages wholly inside [4, 343 - 1 + 1 - 100) are gone: 1 and 2
    assert [gpu.position_held(64 * p) for p in range(6)] == [True, False, False, True, True, True]
    with pytest.raises((IndexError, ValueError)):
        gpu.page(2)
    with pytest.raises((IndexError, ValueError)):
        gpu.dequantize(64, 10)
    assert gpu.empty_like().window == 100
    with pytest.raises(ValueError):  # centred keys with a window: CudaKVCache serves them
        vq_cuda.CudaTurboQuantCache(KVCacheConfig(method="turboquant_rvq", bits=1, value_bits=2,
                                                  center_keys=True), 2, 128, window=100)
    step = vq_cuda.CudaTurboQuantBatch()
    k, q = _batched_window_step(step, gpu, g)
    plain = vq_cuda.CudaTurboQuantCache(config, 2, 128, max_seq_len=2048)
    plain.append(k[0], k[0])
    with pytest.raises(ValueError, match="window"):  # no window: not batched with one
        step.attend([gpu, plain], q)


@needs_cuda
@pytest.mark.parametrize("window", [0, 100])
def test_turboquant_cache_goes_to_the_cpu_and_its_files(tmp_path, window):
    """CudaTurboQuantCache.to_cpu gives the CPU's turboquant cache of the same pages (in a
    SlidingWindowKVCache for a window), decoding as the device does (1e-3); save writes its
    file, which KVCache.load and CudaTurboQuantCache.load read (the device copy decodes as the
    saved cache); from_cpu takes a CPU cache, and refuses another method's (ValueError)."""
    from veloxquant.cache.base import KVCache
    from veloxquant.cache.sliding_window_cache import SlidingWindowKVCache
    config = KVCacheConfig(method="turboquant_rvq", bits=1, value_bits=2, seed=4)
    gpu = vq_cuda.CudaTurboQuantCache(config, 2, 128, max_seq_len=2048, window=window)
    g = torch.Generator(device="cuda").manual_seed(5)
    for n in (300, 1, 1):
        gpu.append(torch.randn(2, n, 128, device="cuda", generator=g),
                   torch.randn(2, n, 128, device="cuda", generator=g))
    q = torch.randn(8, 128, device="cuda", generator=g)
    want = gpu.attend(q)
    host = gpu.to_cpu()
    assert isinstance(host, SlidingWindowKVCache) == (window > 0) and host.size == 302
    assert rel(host.attend(q.cpu().numpy()[:, None, :], causal=True)[:, 0],
               want.cpu().numpy()) < 1e-3
    path = tmp_path / "tq.vqc"
    gpu.save(path)
    assert type(KVCache.load(path)) is type(host)
    back = vq_cuda.CudaTurboQuantCache.load(path)
    assert isinstance(back, vq_cuda.CudaTurboQuantCache)
    assert (back.size, back.window, back.layer) == (302, window, 0)
    torch.testing.assert_close(back.attend(q), want, rtol=1e-5, atol=1e-6)
    again = vq_cuda.CudaTurboQuantCache.from_cpu(host)
    torch.testing.assert_close(again.attend(q), want, rtol=1e-5, atol=1e-6)
    fp16 = create_cpu_cache(KVCacheConfig(method="fp16", value_bits=16), 2, 128, 2048, 0)
    with pytest.raises(ValueError):
        vq_cuda.CudaTurboQuantCache.from_cpu(fp16)


@needs_cuda
def test_codec_cache_outlier_side_store_matches_the_cpu_cache(tmp_path):
    """CudaKVCache with an outlier observer flags the tokens the CPU cache's observer flags (each
    cache its own observer), attends as the CPU cache (a causal chunk and decode steps, 1e-3),
    dequantizes the flagged tokens from their records, and keeps them through to_cpu, a saved
    file and from_cpu; a CudaKVCacheBatch attends such caches as each alone."""
    from veloxquant.cache.base import KVCache

    def config():
        return KVCacheConfig(method="turboquant_rvq", bits=2, value_bits=4, seed=3,
                             outlier_observer=KeyNormObserver(z_threshold=3.0))

    gpu = vq_cuda.CudaKVCache(config(), 2, 128, max_seq_len=1024)
    cpu = create_cpu_cache(config(), 2, 128, 1024, 0)
    g = torch.Generator(device="cuda").manual_seed(4)
    for n in (200, 30, 1, 1, 1):
        k = torch.randn(2, n, 128, device="cuda", generator=g)
        k[:, ::11] *= 30.0  # outliers: far longer keys
        v = torch.randn(2, n, 128, device="cuda", generator=g)
        gpu.append(k, v)
        cpu.append(k.cpu().numpy(), v.cpu().numpy())
        assert gpu.outlier_tokens == cpu.outlier_tokens, n
        q = torch.randn(8, n, 128, device="cuda", generator=g)
        assert rel(gpu.attend(q).cpu().numpy(), cpu.attend(q.cpu().numpy(), causal=True)) < 1e-3
    assert gpu.outlier_tokens > 20
    for got, want in zip(gpu.dequantize(), cpu.dequantize()):
        assert rel(got.cpu().numpy(), want) < 1e-5
    q = torch.randn(8, 128, device="cuda", generator=g)
    want = gpu.attend(q)
    host = gpu.to_cpu()
    assert host.outlier_tokens == cpu.outlier_tokens
    path = tmp_path / "outliers.vqc"
    gpu.save(path)
    assert KVCache.load(path).outlier_tokens == cpu.outlier_tokens
    back = vq_cuda.CudaKVCache.load(path)
    torch.testing.assert_close(back.attend(q), want, rtol=1e-5, atol=1e-6)
    other = vq_cuda.CudaKVCache.from_cpu(cpu)
    assert other.outlier_tokens == cpu.outlier_tokens
    fresh = gpu.empty_like()  # plain keys: few entries if any
    fresh.append(torch.randn(2, 40, 128, device="cuda", generator=g),
                 torch.randn(2, 40, 128, device="cuda", generator=g))
    batch = vq_cuda.CudaKVCacheBatch()
    rows = [gpu, fresh, other]
    assert batch.alike(rows)
    qb = torch.randn(3, 8, 128, device="cuda", generator=g)
    together = batch.attend(rows, qb)
    for b, cache in enumerate(rows):
        torch.testing.assert_close(together[b], cache.attend(qb[b]), rtol=1e-4, atol=1e-5)
    gpu.reset()
    assert gpu.outlier_tokens == 0
