"""The modules of a structurally pruned model, in a file that needs only torch and transformers.

prunerzero builds its smaller models from these classes, and `save_structured` copies this file
beside the weights as `modeling_prunerzero.py`, with a model class for the original
architecture appended (see `model_source`) and an `auto_map` entry in config.json. Stock
transformers then loads a `prunerzero darwin` model, and tools built on it (lm-eval, serving
stacks) run it: AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).
Nothing here may import prunerzero."""
import torch
import torch.nn.functional as F
from torch import nn


def kv_cache(past_key_values, kw: dict):
    """The KV cache a decoder layer hands its attention: `past_key_values` up to transformers
    5.24, `cache` from 5.25 on (the old name deprecated); whichever the installed version uses."""
    return past_key_values if past_key_values is not None else kw.get("cache")


class PrunedAttention(nn.Module):
    """Attention over any subset of query heads: query head i reads key-value head
    kv_index[i], so groups of unequal size (what removing single query heads of a GQA
    model leaves) stay valid, unlike the uniform groups that HF attention assumes."""

    def __init__(self, hidden: int, head_dim: int, kv_index: list, bias: bool, scaling: float,
                 rotary, layer_idx: int, o_bias=None, q_norm=None, k_norm=None):
        super().__init__()
        q, kv = len(kv_index), max(kv_index) + 1
        self.head_dim, self.scaling, self.layer_idx, self.rotary = head_dim, scaling, layer_idx, rotary
        self.q_proj = nn.Linear(hidden, q * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, kv * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, kv * head_dim, bias=bias)
        self.o_proj = nn.Linear(q * head_dim, hidden, bias=bias if o_bias is None else o_bias)
        # Qwen3 normalises each query and key head (weights over head_dim, shared by all heads),
        # so the norms carry over unchanged whatever heads are kept
        self.q_norm = q_norm if q_norm is not None else nn.Identity()
        self.k_norm = k_norm if k_norm is not None else nn.Identity()
        # a plain list, not a buffer: transformers builds models on the meta device and loads
        # only saved tensors, so a non-persistent buffer would never get its values
        self.kv_index = list(kv_index)
        self._index = None

    def _kv_index(self, device) -> torch.Tensor:
        if self._index is None or self._index.device != device:
            self._index = torch.tensor(self.kv_index, device=device)
        return self._index

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kw):
        past_key_values = kv_cache(past_key_values, kw)
        b, t, _ = hidden_states.shape
        shape = (b, t, -1, self.head_dim)
        q = self.q_norm(self.q_proj(hidden_states).view(shape)).transpose(1, 2)
        k = self.k_norm(self.k_proj(hidden_states).view(shape)).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = self.rotary(q, k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        index = self._kv_index(k.device)
        k, v = k.index_select(1, index), v.index_select(1, index)
        mask = None if attention_mask is None else attention_mask[..., :k.shape[-2]]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and t > 1,
                                             scale=self.scaling)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1)), None


class NoAttention(nn.Module):
    """An attention module at 100% sparsity: adds nothing to the residual stream. With a KV
    cache it still records its tokens (as zero heads): a cache's get_seq_length() reads layer 0
    unless told otherwise, and layer 0 may be this one."""

    def __init__(self, layer_idx: int = 0, head_dim: int = 1):
        super().__init__()
        self.layer_idx, self.head_dim = layer_idx, head_dim

    def forward(self, hidden_states, *args, past_key_values=None, **kw):
        past_key_values = kv_cache(past_key_values, kw)
        if past_key_values is not None:
            b, t = hidden_states.shape[:2]
            empty = hidden_states.new_zeros(b, 0, t, self.head_dim)
            past_key_values.update(empty, empty, self.layer_idx)
        return torch.zeros_like(hidden_states), None


class NoMLP(nn.Module):
    """An MLP at 100% sparsity: adds nothing to the residual stream."""

    def forward(self, x):
        return torch.zeros_like(x)


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def pruned_attention(attn, spec: dict, config, rotary, layer_idx: int) -> nn.Module:
    """An empty module in place of the family's attention `attn` for the query heads of `spec`
    (NoAttention when none is kept); its weights are filled by the caller or a state dict."""
    d = head_dim_of(config)
    if not spec["heads"]:
        return NoAttention(layer_idx, d)
    group = config.num_attention_heads // (getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    kv_pos = {kv: j for j, kv in enumerate(spec["kv_heads"])}
    new = PrunedAttention(config.hidden_size, d, [kv_pos[h // group] for h in spec["heads"]],
                          attn.q_proj.bias is not None, getattr(attn, "scaling", d ** -0.5), rotary,
                          getattr(attn, "layer_idx", layer_idx), o_bias=attn.o_proj.bias is not None,
                          q_norm=getattr(attn, "q_norm", None), k_norm=getattr(attn, "k_norm", None))
    return new.to(attn.o_proj.weight.device, attn.o_proj.weight.dtype)


def shrink_to(model, structure: list, rotary) -> None:
    """Give a freshly built LLaMA-family model (decoder blocks at model.model.layers, with
    self_attn q/k/v/o and mlp gate/up/down) the kept heads and channels of `structure`, one
    dict per block; the values come from the state dict loaded after."""
    config = model.config
    for i, (block, spec) in enumerate(zip(model.model.layers, structure)):
        block.self_attn = pruned_attention(block.self_attn, spec, config, rotary, i)
        c, mlp = len(spec["channels"]), block.mlp
        if not c:
            block.mlp = NoMLP()
            continue
        w = mlp.down_proj.weight
        bias = mlp.down_proj.bias is not None
        mlp.gate_proj = nn.Linear(config.hidden_size, c, bias=bias, dtype=w.dtype, device=w.device)
        mlp.up_proj = nn.Linear(config.hidden_size, c, bias=bias, dtype=w.dtype, device=w.device)
        mlp.down_proj = nn.Linear(c, config.hidden_size, bias=bias, dtype=w.dtype, device=w.device)
