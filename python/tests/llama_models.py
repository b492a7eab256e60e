"""Small random-weight models for the tests of the GPU layers (test_cuda_transformers.py,
test_gpu_layer_logic.py): a Llama of 2 layers, 4 query heads over 2 KV heads of the given
head_dim, and a Qwen2 of that shape whose first layer is a sliding window."""


def tiny_llama(head_dim, layers=2):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=4 * head_dim, intermediate_size=256,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=head_dim, max_position_embeddings=1024, initializer_range=0.1,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def tiny_sliding_qwen2(window=24):
    """A Qwen2 of 2 layers (head_dim 64), the first a sliding window of `window` positions."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=512, hidden_size=256, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=64, max_position_embeddings=1024, initializer_range=0.1,
                         use_sliding_window=True, sliding_window=window,
                         layer_types=["sliding_attention", "full_attention"],
                         attn_implementation="sdpa")
    return Qwen2ForCausalLM(config).eval()
