"""The transformers integration on a small random-weight Llama (2 layers, hidden 128, 4 query
heads over 2 KV heads): logits through VeloxQuantCache and attn_implementation="veloxquant"
against the default cache and sdpa, prefill then decode, and generate. Skipped where torch or
transformers is not installed.

With VQ_TRANSFORMERS_REPORT=path.json the measured numbers (logit errors, top-1 agreement,
cache bytes against the default cache's) are written there.
"""

import json
import os
from dataclasses import replace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

from veloxquant.cache.base import KVCacheBuilder, KVCacheConfig, model_cache_shape  # noqa: E402
from veloxquant.integrations.transformers import (  # noqa: E402
    ATTENTION_NAME,
    VeloxQuantCache,
    VeloxQuantDeviceLayer,
)

PROMPT, TOTAL = 48, 64  # a causal prefill of 48 tokens, then 16 single-token decode steps
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def report():
    results = {}
    yield results
    path = os.environ.get("VQ_TRANSFORMERS_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump({"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                       "results": results}, f, indent=2, sort_keys=True)


def tiny_llama(layers):
    """A random-weight Llama: hidden 128, 4 query heads over 2 KV heads of dim 32."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, initializer_range=0.1,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_llama(2)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 512, (1, TOTAL), generator=torch.Generator().manual_seed(1))


def run(model, cache, tokens, attention):
    """Logits [TOTAL, vocab] (float32, CPU) of a prefill and then one step per token."""
    model.set_attn_implementation(attention)
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            tokens = tokens.to(device)
            logits = [model(tokens[:, :PROMPT], past_key_values=cache, use_cache=True).logits[0]]
            for i in range(PROMPT, TOTAL):
                logits.append(model(tokens[:, i:i + 1], past_key_values=cache, use_cache=True).logits[0])
    finally:
        model.set_attn_implementation("sdpa")
    return torch.cat(logits).float().cpu()


def prefill(model, cache, ids):
    """One forward pass of `ids` into `cache` with the veloxquant attention."""
    model.set_attn_implementation(ATTENTION_NAME)
    try:
        with torch.no_grad():
            model(ids, past_key_values=cache, use_cache=True)
    finally:
        model.set_attn_implementation("sdpa")


def default_run(model, tokens):
    cache = DynamicCache(config=model.config)
    logits = run(model, cache, tokens, "sdpa")
    held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    return logits, held


def compare(reference, logits):
    error = (logits - reference).abs().max().item() / reference.abs().max().item()
    cosine = torch.nn.functional.cosine_similarity(logits, reference, dim=-1).min().item()
    top1 = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    return {"max_rel_error": error, "min_cosine": cosine, "top1_agreement": top1}


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_codes_match_the_default_cache(model, tokens, report, device):
    model.to(device)
    try:
        reference, default_bytes = default_run(model, tokens)
        cache = VeloxQuantCache.from_model(model, KVCacheConfig(method="fp16"), max_seq_len=256)
        logits = run(model, cache, tokens, ATTENTION_NAME)
    finally:
        model.to("cpu")
    stats = compare(reference, logits)
    report[f"fp16_{device}"] = {**stats, "cache_bytes": cache.nbytes, "default_cache_bytes": default_bytes}
    assert cache.get_seq_length() == TOTAL
    assert stats["max_rel_error"] < 1e-3, stats
    assert stats["top1_agreement"] >= 0.95  # random weights: a near-tie may flip


def test_turboquant_logits_approach_the_default_as_bits_grow(model, tokens, report):
    reference, default_bytes = default_run(model, tokens)
    stats = {}
    for bits in (2, 4, 8):
        config = KVCacheConfig(method="turboquant_rvq", bits=bits, value_bits=bits)
        cache = VeloxQuantCache.from_model(model, config, max_seq_len=256)
        stats[bits] = compare(reference, run(model, cache, tokens, ATTENTION_NAME))
        report[f"turboquant_rvq_{bits}bit"] = {
            **stats[bits], "cache_bytes": cache.nbytes, "default_cache_bytes": default_bytes,
            "storage_bytes": sum(c.storage_bytes for c in cache.caches),
            "key_bits_per_coordinate": cache.caches[0].key_bits_per_coordinate,
            "value_bits_per_coordinate": cache.caches[0].value_bits_per_coordinate}
    errors = [stats[bits]["max_rel_error"] for bits in (2, 4, 8)]
    assert errors[0] > errors[1] > errors[2], stats
    assert stats[4]["min_cosine"] > 0.9 and stats[4]["top1_agreement"] >= 0.5, stats
    assert stats[8]["min_cosine"] > 0.999, stats  # top-1 flips on near-ties of random logits


def biased_model(family):
    """tiny_llama's shape ("llama", RoPE on pairs (i, i + 16); or "cohere", on adjacent pairs
    (2i, 2i + 1)) whose keys carry a strong shared mean before RoPE, as real models' keys do: a
    k_proj bias of scale 3 on the slowly turning half of each head's pairs (i >= 8), which a
    64-token block of RoPE turns by at most 1.1 radians."""
    from transformers import CohereConfig, CohereForCausalLM

    torch.manual_seed(0)
    shape = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                 initializer_range=0.1, attention_bias=True, attn_implementation="sdpa")
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**shape)).eval()
        slow = torch.arange(64) % 16 >= 8  # [2 heads x 32]: coordinates i and i + 16, i >= 8
    else:
        model = CohereForCausalLM(CohereConfig(**shape)).eval()
        slow = torch.arange(64) % 32 >= 16  # coordinates 2i and 2i + 1, i >= 8
    with torch.no_grad():
        for layer in model.model.layers:
            bias = layer.self_attn.k_proj.bias
            bias.copy_(3.0 * torch.randn_like(bias) * slow.float())
    return model


@pytest.mark.parametrize("family, half_split", [("llama", True), ("cohere", False)])
def test_centred_keys_follow_the_models_rope_pairs(report, family, half_split):
    # 512 positions, over which the slow pairs turn by up to 9 radians: a mean turned on the
    # wrong pairs drifts from the keys'.
    model = biased_model(family)
    tokens = torch.randint(0, 512, (1, 512), generator=torch.Generator().manual_seed(2))
    exact = DynamicCache(config=model.config)
    with torch.no_grad():
        model(tokens, past_key_values=exact, use_cache=True)
    inv_freq = model.model.rotary_emb.inv_freq.double().tolist()
    config = KVCacheConfig(method="turboquant_rvq", bits=3, value_bits=16, num_residuals=1)
    errors = {}
    for name in ("uncentred", "centred", "other pairs"):
        if name == "other pairs":  # the model's frequencies on the pairing it does not use
            wrong = replace(config, center_keys=True, rope_inv_freq=inv_freq,
                            rope_half_split=not half_split)
            # Built from the layer shapes: from the model, build would take its pairing.
            cache = VeloxQuantCache(KVCacheBuilder.build(model_cache_shape(model), wrong, 512))
        else:
            cache = VeloxQuantCache.from_model(
                model, replace(config, center_keys=name == "centred"), max_seq_len=512,
                backend="cpu")
        prefill(model, cache, tokens)
        # The decoded keys against the exact post-RoPE keys, over both layers.
        got = torch.cat([torch.as_tensor(c.dequantize()[0]).flatten() for c in cache.caches])
        want = torch.cat([layer.keys[0].flatten() for layer in exact.layers])
        errors[name] = ((got - want).norm() / want.norm()).item()
        if name == "centred":
            core = cache.caches[0].config
            assert core.center_keys and core.rope_half_split == half_split
            assert core.rope_inv_freq == pytest.approx(inv_freq, rel=1e-12)
    built = KVCacheBuilder.build(model, replace(config, center_keys=True), 512)
    assert [c.config.rope_half_split for c in built] == [half_split] * len(built)
    assert built[0].config.rope_inv_freq == pytest.approx(inv_freq, rel=1e-12)
    report[f"centred_keys_rel_error_{family}"] = errors
    assert errors["centred"] < 0.65 * errors["uncentred"], errors
    assert errors["centred"] < 0.8 * errors["other pairs"], errors


def test_centred_keys_refuse_a_rope_they_cannot_follow():
    config = KVCacheConfig(method="turboquant_rvq", bits=4, value_bits=4, center_keys=True)
    # Frequencies that change with the sequence length.
    dynamic = tiny_llama(1)
    dynamic.model.rotary_emb.rope_type = "dynamic"
    with pytest.raises(ValueError, match="dynamic RoPE"):
        VeloxQuantCache.from_model(dynamic, config, max_seq_len=64, backend="cpu")
    # Two rotary embeddings with different frequencies (local and global layers, say).
    two = tiny_llama(1)
    inv_freq = two.model.rotary_emb.inv_freq
    two.model.layers[0].self_attn.register_buffer("inv_freq", inv_freq * 0.5, persistent=False)
    with pytest.raises(ValueError, match="2 rotary embeddings"):
        KVCacheBuilder.build(two, config, 64)
    # An attention whose modeling module has no rotate_half: the pairing is unknown.
    class ToyAttention(torch.nn.Module):
        pass

    toy = tiny_llama(1)
    toy.model.layers[0].self_attn = ToyAttention()
    with pytest.raises(ValueError, match="cannot tell how this model's RoPE pairs"):
        KVCacheBuilder.build(toy, config, 64)
    # Without center_keys none of that is asked.
    assert len(KVCacheBuilder.build(toy, replace(config, center_keys=False), 64)) == 1


def test_commvq_rope_frequencies_are_refused_on_half_split_rope(model):
    config = KVCacheConfig(method="commvq", bits=2, rope_inv_freq=[1.0] * 16)
    with pytest.raises(ValueError, match="adjacent pairs"):
        VeloxQuantCache.from_model(model, config, max_seq_len=256, backend="cpu")


def test_attention_on_codes_equals_attention_on_dequantized_keys(tokens, report):
    # One layer, so that both runs quantize the very same keys: deeper layers' keys differ by
    # float32 rounding, and a coordinate that crosses a quantizer boundary then changes a code.
    single = tiny_llama(1)
    config = KVCacheConfig(method="turboquant_rvq", bits=4, value_bits=4)
    fused = run(single, VeloxQuantCache.from_model(single, config), tokens, ATTENTION_NAME)
    dequantized = VeloxQuantCache.from_model(single, config, fetch_dequantized=True)
    error = compare(run(single, dequantized, tokens, "sdpa"), fused)["max_rel_error"]
    # The float32 noise floor: two exact attention implementations on the default cache.
    eager = run(single, DynamicCache(config=single.config), tokens, "eager")
    floor = compare(default_run(single, tokens)[0], eager)["max_rel_error"]
    report["one_layer_fused_vs_dequantized_sdpa_max_rel_error"] = error
    report["one_layer_eager_vs_sdpa_max_rel_error"] = floor
    assert error < max(1e-5, 10 * floor)


def test_fetch_dequantized_under_the_veloxquant_attention(model, tokens):
    """fetch_dequantized with attn_implementation="veloxquant": SDPA over the stored tokens."""
    reference, _ = default_run(model, tokens)
    cache = VeloxQuantCache.from_model(model, KVCacheConfig(method="fp16"), fetch_dequantized=True)
    stats = compare(reference, run(model, cache, tokens, ATTENTION_NAME))
    assert stats["max_rel_error"] < 1e-3, stats


@pytest.mark.parametrize("attention", ["sdpa", ATTENTION_NAME])
def test_fetch_dequantized_on_sliding_window_layers(attention):
    """fetch_dequantized on a model with a sliding-window layer (a tiny Qwen2, window 24):
    update returns that layer's tokens from the earliest position its next queries reach (those
    before it may be evicted) and get_mask_sizes counts from there, as transformers' own sliding
    layers do. Through a 40-token prompt and 60 decode steps with fp16 codes, the logits follow
    the model's full forward, the window's evicted pages notwithstanding."""
    from llama_models import tiny_sliding_qwen2
    model = tiny_sliding_qwen2()
    ids = torch.randint(0, 512, (1, 100), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = model(ids, use_cache=False).logits.float()
    cache = VeloxQuantCache.from_model(model, KVCacheConfig(method="fp16", value_bits=16),
                                       max_seq_len=256, backend="cpu", fetch_dequantized=True)
    assert cache.layers[0].is_sliding and not cache.layers[1].is_sliding
    model.set_attn_implementation(attention)
    try:
        with torch.no_grad():
            logits = [model(ids[:, :40], past_key_values=cache, use_cache=True).logits]
            for i in range(40, 100):
                logits.append(model(ids[:, i:i + 1], past_key_values=cache, use_cache=True).logits)
    finally:
        model.set_attn_implementation("sdpa")
    got = torch.cat(logits, dim=1).float()
    assert ((got - reference).abs().max() / reference.abs().max()).item() < 2e-3
    assert cache.layers[0].get_mask_sizes(1) == (24, 77)  # the next query's window: 77..100


def test_generate_with_the_cache(model, tokens, report):
    prompt = tokens[:, :PROMPT]
    with torch.no_grad():
        expected = model.generate(prompt, max_new_tokens=12, do_sample=False)
        model.set_attn_implementation(ATTENTION_NAME)
        try:
            fp16 = VeloxQuantCache.from_model(model, KVCacheConfig(method="fp16"))
            got = model.generate(prompt, past_key_values=fp16, max_new_tokens=12, do_sample=False)
            quantized = VeloxQuantCache.from_model(
                model, KVCacheConfig(method="turboquant_rvq", bits=4, value_bits=4))
            got_q = model.generate(prompt, past_key_values=quantized, max_new_tokens=12, do_sample=False)
        finally:
            model.set_attn_implementation("sdpa")
    assert torch.equal(got, expected)
    assert got_q.shape == expected.shape
    assert fp16.get_seq_length() == quantized.get_seq_length() == PROMPT + 11
    report["generate_turboquant_4bit_token_agreement"] = (got_q == expected).float().mean().item()


def test_misuse_is_reported(model, tokens):
    cache = VeloxQuantCache.from_model(model, KVCacheConfig(method="fp16"))
    with torch.no_grad():
        model(tokens[:, :4], past_key_values=cache, use_cache=True)  # sdpa never reads the codes
        with pytest.raises(RuntimeError, match="attn_implementation='veloxquant'"):
            model(tokens[:, 4:5], past_key_values=cache, use_cache=True)
        model.set_attn_implementation(ATTENTION_NAME)
        try:
            with pytest.raises(ValueError, match="past_key_values=VeloxQuantCache"):
                model(tokens[:, :4], past_key_values=DynamicCache(config=model.config), use_cache=True)
        finally:
            model.set_attn_implementation("sdpa")
    cache = VeloxQuantCache.from_model(model, KVCacheConfig(method="fp16"), fetch_dequantized=True)
    cache.update(torch.zeros(1, 2, 3, 32), torch.zeros(1, 2, 3, 32), 0)
    with pytest.raises(ValueError, match="holds 1 sequences with tokens; got a batch of 2"):
        cache.update(torch.zeros(2, 2, 1, 32), torch.zeros(2, 2, 1, 32), 0)


def test_layers_left_on_the_cpu_beside_a_gpu_model_are_reported(model, monkeypatch):
    """With the model on a GPU, backend="auto" keeps out-of-scope layers on the CPU: it says so,
    once, naming the layers and why (no GPU needed: the device checks are stubbed)."""
    from veloxquant.integrations import transformers as integration

    monkeypatch.setattr(integration, "_cuda_unavailable_reason", lambda device: "")
    monkeypatch.setattr(integration, "_device_cache",
                        lambda *args: (None, "CUDA codec cache: no such method on the device"))
    with pytest.warns(RuntimeWarning) as caught:
        cache = VeloxQuantCache.from_model(model, KVCacheConfig(method="fp16"))
    messages = [str(w.message) for w in caught if "VeloxQuantCache" in str(w.message)]
    assert len(messages) == 1
    assert "2 of 2 layers keep their codes on the CPU" in messages[0]
    assert "layer 1: CUDA codec cache: no such method on the device" in messages[0]
    assert cache.devices == ["cpu", "cpu"]
    with pytest.raises(ValueError, match="layer 0 is outside the CUDA backend"):
        VeloxQuantCache.from_model(model, KVCacheConfig(method="fp16"), backend="cuda")


@pytest.mark.parametrize("device", DEVICES)
def test_a_batch_of_sequences_matches_the_default_cache(model, report, device):
    """Three sequences of the same length: each gets its own cache per layer; prefill, decode
    and greedy generation agree with DynamicCache on the same batch."""
    batch = torch.randint(0, 512, (3, TOTAL), generator=torch.Generator().manual_seed(5))
    model.to(device)
    try:
        reference, _ = default_run(model, batch)
        cache = VeloxQuantCache.from_model(model, KVCacheConfig(method="fp16"), max_seq_len=256)
        logits = run(model, cache, batch, ATTENTION_NAME)
        with torch.no_grad():
            prompt = batch[:, :PROMPT].to(device)
            expected = model.generate(prompt, max_new_tokens=8, do_sample=False)
            model.set_attn_implementation(ATTENTION_NAME)
            try:
                again = VeloxQuantCache.from_model(model, KVCacheConfig(method="fp16"))
                got = model.generate(prompt, past_key_values=again, max_new_tokens=8,
                                     do_sample=False)
            finally:
                model.set_attn_implementation("sdpa")
    finally:
        model.to("cpu")
    stats = compare(reference, logits)
    report[f"fp16_batch3_{device}"] = stats
    assert [layer.batch_size for layer in cache.layers] == [3, 3]
    assert cache.get_seq_length() == TOTAL
    assert all(c.size == TOTAL for layer in cache.layers for c in layer.rows)
    # on GPU layers the decode steps ran as a batch, whose arrays count too
    batches = [getattr(layer, "_batch", None) for layer in cache.layers]
    assert all((b is not None) == isinstance(layer, VeloxQuantDeviceLayer)
               for b, layer in zip(batches, cache.layers))
    assert cache.nbytes == (sum(c.nbytes for layer in cache.layers for c in layer.rows)
                            + sum(b.nbytes for b in batches if b is not None))
    assert stats["max_rel_error"] < 1e-3, stats
    assert torch.equal(got, expected)


def test_a_batch_on_sliding_window_layers(model):
    """Window layers make their further rows with empty_like: same window, sinks and layer."""
    from veloxquant.cache.base import _create
    from veloxquant.cache.sliding_window_cache import SlidingWindowKVCache
    config = KVCacheConfig(method="turboquant_rvq", bits=4)
    caches = [SlidingWindowKVCache(_create(config, 2, 32, 256, i), 20, sink_tokens=2)
              for i in range(2)]
    cache = VeloxQuantCache(caches)
    prefill(model, cache, torch.randint(0, 512, (2, 30), generator=torch.Generator().manual_seed(7)))
    extra = cache.layers[1].rows[1]
    assert isinstance(extra, SlidingWindowKVCache) and extra is not caches[1]
    assert (extra.window, extra.sink_tokens, extra.layer, extra.size) == (20, 2, 1, 30)


@pytest.mark.parametrize("method", ["fp16", "turboquant_rvq"])
def test_a_padded_batch_follows_each_sequence_alone(model, method):
    """Left padding: each sequence stores only its own tokens; the padded batch's logits at the
    real positions, prefill and decode, equal each sequence run alone (same codes: the cache
    never sees the padding), and greedy generation equals DynamicCache on the padded batch."""
    config = KVCacheConfig(method=method, bits=4, value_bits=4)
    lengths, steps = (30, 22), 6
    rows = [torch.randint(0, 512, (1, n + steps), generator=torch.Generator().manual_seed(8 + n))
            for n in lengths]
    width = max(lengths)
    prompt = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for b, n in enumerate(lengths):
        prompt[b, width - n:], mask[b, width - n:] = rows[b][0, :n], 1
    model.set_attn_implementation(ATTENTION_NAME)
    try:
        with torch.no_grad():
            cache = VeloxQuantCache.from_model(model, config, max_seq_len=256)
            # positions as generate gives them: counted over each sequence's own tokens
            batched = [model(prompt, attention_mask=mask, past_key_values=cache, use_cache=True,
                             position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits]
            for i in range(steps):
                mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
                step = torch.stack([rows[b][0, n + i] for b, n in enumerate(lengths)])[:, None]
                batched.append(model(step, attention_mask=mask, past_key_values=cache,
                                     use_cache=True,
                                     position_ids=torch.tensor([[n + i] for n in lengths])).logits)
            batched = torch.cat(batched, dim=1)
            for b, n in enumerate(lengths):
                alone = run_alone(model, config, rows[b], n)
                got = torch.cat([batched[b, width - n:width], batched[b, width:]])
                error = ((got - alone).abs().max() / alone.abs().max()).item()
                assert error < 1e-4, (b, error)
                assert cache.layers[0].rows[b].size == n + steps
            assert cache.get_seq_length() == width + steps
            assert cache.layers[0].pads == [width - n for n in lengths]
            generated = model.generate(prompt, attention_mask=mask[:, :width], do_sample=False,
                                       max_new_tokens=6,
                                       past_key_values=VeloxQuantCache.from_model(model, config))
        model.set_attn_implementation("sdpa")
        with torch.no_grad():
            expected = model.generate(prompt, attention_mask=mask[:, :width], do_sample=False,
                                      max_new_tokens=6)
    finally:
        model.set_attn_implementation("sdpa")
    if method == "fp16":
        assert torch.equal(generated, expected)
    else:
        assert generated.shape == expected.shape


def run_alone(model, config, tokens, prompt):
    """Logits of one sequence (no padding): a prefill of `prompt` tokens, then one per step."""
    cache = VeloxQuantCache.from_model(model, config, max_seq_len=256)
    logits = [model(tokens[:, :prompt], past_key_values=cache, use_cache=True).logits[0]]
    for i in range(prompt, tokens.shape[1]):
        logits.append(model(tokens[:, i:i + 1], past_key_values=cache, use_cache=True).logits[0])
    return torch.cat(logits)


def test_reordering_is_refused(model):
    cache = VeloxQuantCache.from_model(model, KVCacheConfig(method="turboquant_rvq", bits=4))
    prefill(model, cache, torch.randint(0, 512, (2, 6), generator=torch.Generator().manual_seed(6)))
    assert cache.get_seq_length() == 6
    with pytest.raises(NotImplementedError, match="beam search"):
        cache.reorder_cache(torch.tensor([1, 1]))
    cache.reorder_cache(torch.tensor([0, 1]))  # the identity
    with pytest.raises(NotImplementedError, match="expand the inputs"):
        cache.batch_repeat_interleave(2)
    first, second = cache.layers[0].rows
    cache.batch_select_indices(torch.tensor([1]))
    assert cache.layers[0].rows == [second] and cache.layers[0].cache is second
    with pytest.raises(NotImplementedError, match="distinct sequences"):
        cache.batch_select_indices(torch.tensor([0, 0]))
