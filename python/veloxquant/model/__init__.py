"""VeloxQuant's own CPU runtime for Llama-family GGUF models.

``LlamaModel.load(path)`` gives a model whose ``cache_shape()`` ``KVCacheBuilder.build`` reads, so
the caches built for it match its layers::

    from veloxquant.model import LlamaModel
    model = LlamaModel.load("models/SmolLM2-135M-Instruct.Q4_1.gguf")
    caches = KVCacheBuilder.build(model, KVCacheConfig(method="turboquant_rvq"))
"""

from veloxquant._core import LlamaModel

__all__ = ["LlamaModel"]
