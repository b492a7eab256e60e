"""A small random-weight Llama for the tests of the GPU layers (test_cuda_transformers.py,
test_gpu_layer_logic.py): 2 layers, 4 query heads over 2 KV heads of the given head_dim."""


def tiny_llama(head_dim, layers=2):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=4 * head_dim, intermediate_size=256,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=head_dim, max_position_embeddings=1024, initializer_range=0.1,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()
