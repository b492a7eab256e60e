"""veloxquant.calibration on the default model: calibrate from Python, files, application to
caches, and the errors. The CLI (`veloxquant calibrate`, VQ_CLI) is the cross-check: the same
text and settings must give the same file contents."""

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from veloxquant.cache.base import KVCacheBuilder, KVCacheConfig
from veloxquant.calibration import Calibration, calibrate, calibrated_methods
from veloxquant.model import LlamaModel

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
VALID = Path("/work/shared/data/wikitext-2/valid.txt")
if not VALID.exists():
    VALID = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
SMALL = dict(tokens=512, ctx=256, max_rows=256)

pytestmark = pytest.mark.skipif(not MODEL.exists() or not VALID.exists(),
                                reason="default model or WikiText-2 missing (scripts/install_deps.sh)")


@pytest.fixture(scope="module")
def model():
    return LlamaModel.load(str(MODEL))


@pytest.fixture(scope="module")
def text():
    return VALID.read_text(encoding="utf-8")[:20000]


@pytest.fixture(scope="module")
def spectral(model, text):
    return calibrate(model, KVCacheConfig(method="spectral"), text, **SMALL)


def test_calibrate_spectral_describes_the_model(model, spectral):
    assert set(calibrated_methods()) == {"vecinfer", "spectral", "ratequant", "rabitq", "commvq"}
    assert spectral.sections == ["spectral"]
    assert spectral.shape == model.cache_shape()
    assert "30 layers" in spectral.model
    config = spectral.apply(KVCacheConfig(method="spectral"))
    assert len(config.rotations) == 30
    for r in config.rotations:
        assert r.shape[0] == 3 and r.shape[-1] == 64 and np.isfinite(r).all()


def test_file_round_trip_and_merge(tmp_path, model, text, spectral):
    path = tmp_path / "smol.vqcal"
    spectral.save(path)
    rabitq = calibrate(model, KVCacheConfig(method="rabitq", num_clusters=16), text, **SMALL)
    rabitq.save(path)  # merges: the spectral section stays
    loaded = Calibration.load(path)
    assert sorted(loaded.sections) == ["rabitq", "spectral"]
    a = loaded.apply(KVCacheConfig(method="spectral")).rotations
    b = spectral.apply(KVCacheConfig(method="spectral")).rotations
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    centroids = loaded.apply(KVCacheConfig(method="rabitq")).ivf_centroids
    assert centroids.shape == (30, 3, 16, 64)


@pytest.mark.skipif(not os.environ.get("VQ_CLI"), reason="VQ_CLI (the veloxquant binary) not set")
def test_same_file_as_the_cli(tmp_path, spectral, text):
    src = tmp_path / "text.txt"
    src.write_text(text, encoding="utf-8")
    out = tmp_path / "cli.vqcal"
    subprocess.run([os.environ["VQ_CLI"], "calibrate", "--method", "spectral", "--model", str(MODEL),
                    "--text", str(src), "--out", str(out), "--tokens", "512", "--ctx", "256",
                    "--max-rows", "256", "--quiet"], check=True, capture_output=True)
    cli = Calibration.load(out).apply(KVCacheConfig(method="spectral")).rotations
    ours = spectral.apply(KVCacheConfig(method="spectral")).rotations
    assert all(np.array_equal(x, y) for x, y in zip(cli, ours))


def test_builder_applies_a_calibration(tmp_path, model, spectral):
    path = tmp_path / "s.vqcal"
    spectral.save(path)
    config = KVCacheConfig(method="spectral", value_bits=4)
    by_path = KVCacheBuilder.build(model, config, calibration=str(path))
    by_object = KVCacheBuilder.build(model, spectral.apply(config))
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((3, 40, 64)).astype(np.float32)
    values = rng.standard_normal((3, 40, 64)).astype(np.float32)
    queries = rng.standard_normal((9, 1, 64)).astype(np.float32)
    outs = []
    for caches in (by_path, by_object):
        caches[5].append(keys, values)
        outs.append(caches[5].attend(queries))
    np.testing.assert_array_equal(outs[0], outs[1])
    assert config.rotations is None  # the caller's config is left as it was


def test_errors(tmp_path, model, text, spectral):
    with pytest.raises(ValueError, match="nothing to calibrate"):
        calibrate(model, KVCacheConfig(method="turboquant_rvq"), text, **SMALL)
    with pytest.raises(RuntimeError, match="missing.vqcal"):
        Calibration.load(tmp_path / "missing.vqcal")
    path = tmp_path / "cut.vqcal"
    spectral.save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(RuntimeError):
        Calibration.load(path)
    with pytest.raises(ValueError, match="calibrate --method vecinfer"):
        spectral.apply(KVCacheConfig(method="vecinfer"))
    with pytest.raises(ValueError):
        KVCacheBuilder.build([(3, 64)] * 29, KVCacheConfig(method="spectral"), calibration=spectral)
    with pytest.raises(ValueError, match="Calibration"):
        KVCacheBuilder.build(model, KVCacheConfig(method="spectral"), calibration=42)


def test_extension_fields_cross_to_the_core():
    config = KVCacheConfig(method="commvq", rope_inv_freq=[1.0, 0.5, 0.25],
                           ivf_centroids=np.ones((1, 1, 2, 4), dtype=np.float32))
    back = KVCacheConfig.from_core(config.to_core())
    assert back.rope_inv_freq == [1.0, 0.5, 0.25]
    assert back.ivf_centroids.shape == (1, 1, 2, 4)
