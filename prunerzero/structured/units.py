"""The structured units of a decoder block: attention heads (with grouped-query attention,
a key-value head lives only while one of its query heads does) and MLP channels, and the
parameter count of a block with a given set of them kept."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import PrunerZeroError
from ..engine.models import decoder_layers


class StructureError(PrunerZeroError, ValueError):
    """A model, target or setting that structured pruning cannot work with."""


@dataclass(frozen=True)
class Anatomy:
    """Shapes shared by every decoder block (LLaMA family: q/k/v/o and gate/up/down)."""
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    channels: int
    attn_bias: bool                  # q, k and v have biases
    mlp_bias: bool
    o_bias: bool | None = None       # o_proj has a bias (None: as q/k/v; Qwen2 has them on q/k/v only)

    def __post_init__(self):
        if self.o_bias is None:
            object.__setattr__(self, "o_bias", self.attn_bias)

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    def kv_of(self, head: int) -> int:
        return head // self.group

    def attn_params(self, kept_heads) -> int:
        """q and o for each kept query head, k and v for each key-value head still used."""
        q = len(kept_heads)
        kv = len({self.kv_of(h) for h in kept_heads})
        d, h = self.head_dim, self.hidden
        bias = (q * d + 2 * kv * d if self.attn_bias else 0) + (h * (q > 0) if self.o_bias else 0)
        return 2 * q * d * h + 2 * kv * d * h + bias

    def mlp_params(self, channels: int) -> int:
        bias = (2 * channels + self.hidden * (channels > 0)) if self.mlp_bias else 0
        return 3 * channels * self.hidden + bias

    def block_params(self) -> int:
        return self.attn_params(range(self.heads)) + self.mlp_params(self.channels)


ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def attention_of(block: nn.Module) -> nn.Module:
    return child_with(block, ATTN, "attention")[1]


def mlp_of(block: nn.Module) -> nn.Module:
    return child_with(block, MLP, "MLP")[1]


def child_with(block, names, what) -> tuple[str, nn.Module]:
    """(attribute name, module) of the child of `block` that holds Linears `names`."""
    for name, module in block.named_children():
        if all(isinstance(getattr(module, n, None), nn.Linear) for n in names):
            return name, module
    raise StructureError(f"{type(block).__name__} has no {what} module with Linear {', '.join(names)}: "
                         f"structured pruning supports {SUPPORTED_TEXT}")


# Families whose attention and MLP `shrink` rebuilds exactly (tested on tiny models of each):
# LLaMA-style q/k/v/o with rotary embeddings (optionally biased q/k/v, optionally Qwen3's
# per-head q/k RMSNorm, sliding windows given by the mask) and gated gate/up/down MLPs.
SUPPORTED = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
SUPPORTED_TEXT = ", ".join(SUPPORTED.values()) + " (and SmolLM, a Llama)"


def check_supported(model: nn.Module) -> Anatomy:
    """The model's anatomy if `darwin` can shrink it; a clear refusal, before any work, if not."""
    kind = getattr(model.config, "model_type", None)
    if kind not in SUPPORTED:
        raise StructureError(f"structured pruning (darwin) cannot shrink {type(model).__name__} (model_type "
                             f"{kind!r}) yet: its attention or MLP differs from the shapes it rebuilds. "
                             f"Supported: {SUPPORTED_TEXT}. Unstructured and N:M pruning (apply) work on it.")
    return anatomy(model)


def anatomy(model: nn.Module) -> Anatomy:
    cfg = model.config
    block = decoder_layers(model)[0]
    attn, mlp = attention_of(block), mlp_of(block)
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    if attn.q_proj.out_features != heads * head_dim or attn.k_proj.out_features != kv * head_dim or heads % kv:
        raise StructureError(f"attention shapes of {type(model).__name__} do not match its config "
                             f"({heads} heads, {kv} key-value heads, head_dim {head_dim})")
    return Anatomy(hidden=cfg.hidden_size, heads=heads, kv_heads=kv, head_dim=head_dim,
                   channels=mlp.down_proj.in_features, attn_bias=attn.q_proj.bias is not None,
                   mlp_bias=mlp.down_proj.bias is not None, o_bias=attn.o_proj.bias is not None)


def prunable_params(model: nn.Module) -> int:
    """Parameters of the attention and MLP projections of every decoder block."""
    return anatomy(model).block_params() * len(decoder_layers(model))
