"""Which weights pruning touches, in every model family, and one (out, in) view of each.

Pruned: the projections inside the decoder blocks, whatever holds them:
- `nn.Linear` (weight stored (out, in));
- GPT-2's `Conv1D` (weight stored transposed, (in, out)): `matrix()` gives the (out, in) view,
  so masks, metrics and SparseGPT see the same layout for both;
- mixture-of-experts layers, each expert on its own. transformers 5 stores the experts of a
  layer as two 3D tensors (gate_up_proj (E, 2I, H), down_proj (E, H, I)); each expert gets
  Linear views that share that storage (pruning them prunes the model) and the experts'
  forward is re-pointed at those views, so hooks see exactly the tokens routed to each
  expert. The math is that of the model's own eager expert loop.

Never pruned: embeddings and the output head (outside the blocks), and the routers and gates
of MoE layers (a Linear beside the experts: its few outputs decide the routing). What is
skipped, and why, is listed by `skipped_layers` and written in every report.
"""
from __future__ import annotations

import types

import torch
from torch import nn


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
        return Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return ()


def is_conv1d(m: nn.Module) -> bool:
    return isinstance(m, _conv1d_type())


def is_projection(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or is_conv1d(m)


def matrix(m: nn.Module) -> torch.Tensor:
    """The weights of a Linear or Conv1D as an (out, in) view of their storage: writing into it
    writes the layer."""
    return m.weight.data.t() if is_conv1d(m) else m.weight.data


def set_matrix(m: nn.Module, W: torch.Tensor):
    """Point the layer at (out, in) weights W (no copy), e.g. a masked copy during a search."""
    m.weight.data = W.t() if is_conv1d(m) else W


def as_matrix(m: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """A tensor laid out like m.weight (its gradient, say) as (out, in)."""
    return t.t() if is_conv1d(m) else t


def in_features(m: nn.Module) -> int:
    return matrix(m).shape[1]


# ---- mixture of experts -------------------------------------------------------------------

def _is_fused_experts(m: nn.Module) -> bool:
    up, down = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
    return isinstance(up, nn.Parameter) and isinstance(down, nn.Parameter) and up.dim() == 3 and down.dim() == 3


def _supported_layout(m: nn.Module) -> bool:
    """Concatenated [gate; up] rows, (out, in) per expert, no biases, no extra norms: the layout
    of Mixtral, Qwen2-MoE, Qwen3-MoE and others (the flags transformers sets on the class)."""
    own = {n for n, _ in m.named_parameters(recurse=False)}
    return (own == {"gate_up_proj", "down_proj"} and getattr(m, "has_gate", True)
            and getattr(m, "is_concatenated", True) and not getattr(m, "is_transposed", False)
            and not getattr(m, "has_bias", False) and not getattr(m, "has_post_expert_norm", False)
            and hasattr(m, "act_fn"))


def _view_linear(weight: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=False)  # shares the 3D tensor's storage
    return lin


def _unfused_forward(self, hidden_states, top_k_index, top_k_weights):
    """The eager expert loop of transformers, through the per-expert Linear views."""
    views = expert_views(self)
    out = torch.zeros_like(hidden_states)
    for e, (gate_up, down) in enumerate(views):
        token, pos = torch.where(top_k_index == e)
        if token.numel() == 0:
            continue
        gate, up = gate_up(hidden_states[token]).chunk(2, dim=-1)
        y = down(self.act_fn(gate) * up) * top_k_weights[token, pos, None]
        out.index_add_(0, token, y.to(out.dtype))
    return out


def expert_views(m: nn.Module) -> list[tuple[nn.Linear, nn.Linear]]:
    """(gate_up, down) Linear views of each expert of a fused experts module, built once per
    storage (rebuilt if the model was moved or cast), with the module's forward re-pointed at
    them. They are not registered as submodules: state dicts and saving see the 3D tensors."""
    key = (m.gate_up_proj.data_ptr(), m.down_proj.data_ptr(), m.gate_up_proj.dtype)
    cached = m.__dict__.get("_prunerzero_views")
    if cached is None or cached[0] != key:
        views = [(_view_linear(m.gate_up_proj.data[e]), _view_linear(m.down_proj.data[e]))
                 for e in range(m.gate_up_proj.shape[0])]
        m.__dict__["_prunerzero_views"] = (key, views)
        m.forward = types.MethodType(_unfused_forward, m)
    return m.__dict__["_prunerzero_views"][1]


# ---- what a block holds ---------------------------------------------------------------------

def _is_router(m: nn.Module, parent: nn.Module) -> bool:
    """A 2D weight beside the experts of an MoE layer: a router or gate (a Linear, or a router
    class of its own as in transformers 5), whose few outputs decide the routing."""
    weight = getattr(m, "weight", None)
    return (isinstance(getattr(parent, "experts", None), nn.Module) and isinstance(weight, nn.Parameter)
            and weight.dim() == 2)


def block_layers(block: nn.Module) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """(prunable layers by name, skipped layers by name with the reason) of one decoder block."""
    prunable, skipped = {}, {}
    modules = dict(block.named_modules())
    for name, m in modules.items():
        if _is_router(m, modules[name.rpartition(".")[0]]):
            skipped[name] = "MoE router/gate"
        elif is_projection(m):
            prunable[name] = m
        elif _is_fused_experts(m):
            if not _supported_layout(m):
                skipped[name] = f"fused experts of an unsupported layout ({type(m).__name__})"
                continue
            for e, (gate_up, down) in enumerate(expert_views(m)):
                prunable[f"{name}.{e}.gate_up_proj"] = gate_up
                prunable[f"{name}.{e}.down_proj"] = down
    return prunable, skipped


def skipped_outside_blocks(model: nn.Module, blocks: nn.ModuleList) -> dict[str, str]:
    """Embeddings and projections outside the decoder blocks (the output head, say)."""
    inside = {id(m) for m in blocks.modules()}
    out = {}
    for name, m in model.named_modules():
        if id(m) in inside:
            continue
        if isinstance(m, nn.Embedding):
            out[name] = "embedding"
        elif is_projection(m):
            out[name] = "output head" if m is model.get_output_embeddings() else "outside the decoder blocks"
    return out

