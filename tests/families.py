"""Tiny randomly initialised models of every family prunerzero is checked on, built from
transformers configs in the test (no download). Sizes keep every projection's input width a
multiple of 8, so 2:4 and 4:8 apply everywhere."""
import torch
import transformers as tf

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              use_cache=False, tie_word_embeddings=False)

CONFIGS = {
    "llama": lambda: tf.LlamaConfig(**COMMON),
    "mistral": lambda: tf.MistralConfig(**COMMON, sliding_window=8),   # the window matters at seqlen 32
    "qwen2": lambda: tf.Qwen2Config(**COMMON),                         # biased q/k/v, unbiased o
    "qwen3": lambda: tf.Qwen3Config(**COMMON, head_dim=16),            # per-head q/k RMSNorm
    "gemma2": lambda: tf.Gemma2Config(**COMMON, head_dim=16, sliding_window=8, query_pre_attn_scalar=16),
    "gemma3": lambda: tf.Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                                          rope_local_base_freq=100.0,  # local and global RoPE differ
                                          layer_types=["sliding_attention", "full_attention"] * 2),
    "phi3": lambda: tf.Phi3Config(**COMMON, pad_token_id=0),           # fused qkv_proj and gate_up_proj
    "opt": lambda: tf.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=4,
                                num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=64,
                                use_cache=False, pad_token_id=1, enable_bias=True),
    "gpt2": lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=4, n_head=4, n_positions=128,
                                  use_cache=False),                     # Conv1D projections
    "mixtral": lambda: tf.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": lambda: tf.Qwen2MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2,
                                           moe_intermediate_size=64, shared_expert_intermediate_size=96),
}
FAMILIES = list(CONFIGS)
DARWIN_FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]


def tiny(family: str, seed: int = 0, dtype=torch.float32):
    """A tiny random model of `family` in eval mode; biases and norm weights are randomised too,
    so a layer that is not carried over (a bias, a q/k norm) changes the outputs."""
    torch.manual_seed(seed)
    cfg = CONFIGS[family]()
    cfg._attn_implementation = "eager" if family == "gemma2" else "sdpa"  # Gemma-2 soft-caps: no SDPA
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
            elif p.dim() == 3:   # fused MoE experts are left at zero by some initialisers
                p.normal_(0, 0.05)
    return model
