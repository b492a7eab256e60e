"""KVCacheBuilder.build takes our runtime's model object (the default model, when present)."""

from pathlib import Path

import pytest

from veloxquant.cache.base import KVCacheBuilder, KVCacheConfig
from veloxquant.model import LlamaModel

MODEL = Path(__file__).resolve().parents[2] / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.skipif(not MODEL.exists(), reason="default model not fetched (scripts/install_deps.sh)")
def test_builder_takes_runtime_model():
    model = LlamaModel.load(str(MODEL))
    assert model.n_layer == 30
    assert model.cache_shape() == [(3, 64)] * 30
    caches = KVCacheBuilder.build(model, KVCacheConfig(method="turboquant_rvq"), max_seq_len=256)
    assert len(caches) == 30
    assert all(c.num_heads == 3 and c.head_dim == 64 for c in caches)


def test_runtime_model_load_error_carries_message(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(RuntimeError, match="gguf"):
        LlamaModel.load(str(bad))
