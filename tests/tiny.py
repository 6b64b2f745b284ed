"""A tiny randomly initialised Llama with grouped-query attention, built in the test."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(seed=0, layers=2):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      attn_implementation="sdpa", use_cache=False)
    return LlamaForCausalLM(cfg).eval()


def token_samples(n=4, seqlen=32, seed=0, vocab=128):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seqlen), generator=g)
