"""Turning a level genome into a model: *masked* (full-size matrices with removed units set
to zero, for checks) or *materialised* (physically smaller matrices, modules at 100%
replaced by parameter-free stand-ins), plus saving and reloading materialised models."""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..models import decoder_layers
from .database import Database
from .units import ATTN, MLP, StructureError, child_with

STRUCTURE_FILE = "prunerzero_structure.json"


class PrunedAttention(nn.Module):
    """Attention over any subset of query heads: query head i reads key-value head
    kv_index[i], so groups of unequal size (what removing single query heads of a GQA
    model leaves) stay valid, unlike the uniform groups that HF attention assumes."""

    def __init__(self, hidden: int, head_dim: int, kv_index: list[int], bias: bool, scaling: float,
                 rotary, layer_idx: int, o_bias: bool | None = None, q_norm=None, k_norm=None):
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
        self.register_buffer("kv_index", torch.tensor(kv_index), persistent=False)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kw):
        b, t, _ = hidden_states.shape
        shape = (b, t, -1, self.head_dim)
        q = self.q_norm(self.q_proj(hidden_states).view(shape)).transpose(1, 2)
        k = self.k_norm(self.k_proj(hidden_states).view(shape)).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = self.rotary(q, k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        k, v = k.index_select(1, self.kv_index), v.index_select(1, self.kv_index)
        mask = None if attention_mask is None else attention_mask[..., :k.shape[-2]]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and t > 1,
                                             scale=self.scaling)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1)), None


class NoAttention(nn.Module):
    """An attention module at 100% sparsity: adds nothing to the residual stream."""

    def forward(self, hidden_states, *args, **kw):
        return torch.zeros_like(hidden_states), None


class NoMLP(nn.Module):
    """An MLP at 100% sparsity: adds nothing to the residual stream."""

    def forward(self, x):
        return torch.zeros_like(x)


def structure_of(db: Database, genome) -> list[dict]:
    """Per layer: kept query heads, their key-value heads and kept MLP channels."""
    n, an = db.n_layers, db.anatomy
    out = []
    for i in range(n):
        heads = list(db.levels["attn"][i][genome[i]].kept)
        out.append({"heads": heads, "kv_heads": sorted({an.kv_of(h) for h in heads}),
                    "channels": list(db.levels["mlp"][i][genome[n + i]].kept)})
    return out


def _rows(linear: nn.Linear, idx: torch.Tensor) -> nn.Linear:
    new = nn.Linear(linear.in_features, len(idx), bias=linear.bias is not None,
                    dtype=linear.weight.dtype, device=linear.weight.device)
    new.weight.data.copy_(linear.weight.data[idx])
    if linear.bias is not None:
        new.bias.data.copy_(linear.bias.data[idx])
    return new


def _cols(linear: nn.Linear, W: torch.Tensor) -> nn.Linear:
    new = nn.Linear(W.shape[1], linear.out_features, bias=linear.bias is not None,
                    dtype=linear.weight.dtype, device=linear.weight.device)
    new.weight.data.copy_(W)
    if linear.bias is not None:
        new.bias.data.copy_(linear.bias.data)
    return new


def _unit_rows(units, size: int) -> torch.Tensor:
    return torch.tensor([u * size + j for u in units for j in range(size)], dtype=torch.long)


def _out_weights(db: Database, kind, layer, level, linear, rows) -> torch.Tensor:
    W = db.weights(kind, layer, level)
    if W is None:  # dense level
        W = linear.weight.data[:, rows]
    return W.to(linear.weight.dtype)


def _new_attention(attn, spec, an, i) -> PrunedAttention:
    """An empty PrunedAttention in place of HF attention `attn`, for the heads in `spec`."""
    kv_pos = {kv: j for j, kv in enumerate(spec["kv_heads"])}
    rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    new = PrunedAttention(an.hidden, an.head_dim, [kv_pos[an.kv_of(h)] for h in spec["heads"]], an.attn_bias,
                          getattr(attn, "scaling", an.head_dim ** -0.5), rotary, getattr(attn, "layer_idx", i),
                          o_bias=an.o_bias, q_norm=getattr(attn, "q_norm", None), k_norm=getattr(attn, "k_norm", None))
    return new.to(attn.o_proj.weight.device, attn.o_proj.weight.dtype)


def _shrink_attention(block, i, spec, db, level):
    an = db.anatomy
    name, attn = child_with(block, ATTN, "attention")
    if not spec["heads"]:
        setattr(block, name, NoAttention())
        return
    new = _new_attention(attn, spec, an, i)
    q_rows, kv_rows = _unit_rows(spec["heads"], an.head_dim), _unit_rows(spec["kv_heads"], an.head_dim)
    new.q_proj = _rows(attn.q_proj, q_rows)
    new.k_proj = _rows(attn.k_proj, kv_rows)
    new.v_proj = _rows(attn.v_proj, kv_rows)
    new.o_proj = _cols(attn.o_proj, _out_weights(db, "attn", i, level, attn.o_proj, q_rows))
    setattr(block, name, new)


def _shrink_mlp(block, i, spec, db, level):
    name, mlp = child_with(block, MLP, "MLP")
    if not spec["channels"]:
        setattr(block, name, NoMLP())
        return
    rows = torch.tensor(spec["channels"], dtype=torch.long)
    mlp.gate_proj = _rows(mlp.gate_proj, rows)
    mlp.up_proj = _rows(mlp.up_proj, rows)
    mlp.down_proj = _cols(mlp.down_proj, _out_weights(db, "mlp", i, level, mlp.down_proj, rows))


@torch.no_grad()
def materialize(model, db: Database, genome):
    """A physically smaller copy of the dense `model` for `genome`."""
    # Every attention/MLP Linear is rebuilt below, so the copy shares the dense ones instead
    # of duplicating them first (this runs once per candidate in a search).
    memo = {id(p): p for block in decoder_layers(model) for name in (*ATTN, *MLP)
            for m in block.modules() if isinstance(getattr(m, name, None), nn.Linear)
            for p in getattr(m, name).parameters()}
    model = copy.deepcopy(model, memo)
    n, structure = db.n_layers, structure_of(db, genome)
    for i, (block, spec) in enumerate(zip(decoder_layers(model), structure)):
        _shrink_attention(block, i, spec, db, genome[i])
        _shrink_mlp(block, i, spec, db, genome[n + i])
    model.prunerzero_structure = structure
    return model


@torch.no_grad()
def apply_masked(model, db: Database, genome):
    """Zero the removed units of the full-size dense `model` in place and write the
    compensated output columns: the same function as the materialised model."""
    an, n = db.anatomy, db.n_layers
    d = an.head_dim
    for i, (block, spec) in enumerate(zip(decoder_layers(model), structure_of(db, genome))):
        _, attn = child_with(block, ATTN, "attention")
        _, mlp = child_with(block, MLP, "MLP")
        q_rows, kv_rows = _unit_rows(spec["heads"], d), _unit_rows(spec["kv_heads"], d)
        o = _out_weights(db, "attn", i, genome[i], attn.o_proj, q_rows)
        ch = torch.tensor(spec["channels"], dtype=torch.long)
        down = _out_weights(db, "mlp", i, genome[n + i], mlp.down_proj, ch)
        for lin, keep in ((attn.q_proj, q_rows), (attn.k_proj, kv_rows), (attn.v_proj, kv_rows),
                          (mlp.gate_proj, ch), (mlp.up_proj, ch)):
            _keep_rows(lin, keep)
        for lin, keep, W in ((attn.o_proj, q_rows, o), (mlp.down_proj, ch, down)):
            lin.weight.data.zero_()
            lin.weight.data[:, keep] = W
            if lin.bias is not None and not len(keep):
                lin.bias.data.zero_()
    return model


def _keep_rows(lin: nn.Linear, keep: torch.Tensor):
    drop = torch.ones(lin.out_features, dtype=torch.bool)
    drop[keep] = False
    lin.weight.data[drop] = 0
    if lin.bias is not None:
        lin.bias.data[drop] = 0


def save_structured(model, path, tokenizer=None, extra: dict | None = None):
    """Save a materialised model: weights and config with save_pretrained, the kept units
    in prunerzero_structure.json; reload with `load_structured(path)`."""
    structure = getattr(model, "prunerzero_structure", None)
    if structure is None:
        raise StructureError("this model was not materialised by prunerzero (no structure to save)")
    path = Path(path)
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    (path / STRUCTURE_FILE).write_text(json.dumps({"layers": structure, **(extra or {})}, indent=1))


def load_structured(path, dtype=None, device: str | None = "cpu"):
    """Reload a model saved by `save_structured` (or `prunerzero darwin`): the original
    architecture is built from config.json, shrunk to the saved structure, then loaded."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM
    path = Path(path)
    spec_file = path / STRUCTURE_FILE
    if not spec_file.is_file():
        raise StructureError(f"{path} holds no {STRUCTURE_FILE}: not a structurally pruned model")
    layers = json.loads(spec_file.read_text())["layers"]
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype or getattr(config, "dtype", None) or torch.float32,
                                             attn_implementation="sdpa")
    _reshape(model, layers)
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")}
    if unexpected or set(missing) - tied:
        raise StructureError(f"{path}: weights do not match the saved structure "
                             f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    model.config.use_cache = False
    model.prunerzero_structure = layers
    return model.to(device or "cpu").eval()


def _reshape(model, layers):
    """Give a freshly built model the saved shapes (values come from the state dict)."""
    from .units import anatomy
    an = anatomy(model)
    dtype = next(model.parameters()).dtype
    for i, (block, spec) in enumerate(zip(decoder_layers(model), layers)):
        name, attn = child_with(block, ATTN, "attention")
        setattr(block, name, _new_attention(attn, spec, an, i) if spec["heads"] else NoAttention())
        mname, mlp = child_with(block, MLP, "MLP")
        c = len(spec["channels"])
        if not c:
            setattr(block, mname, NoMLP())
            continue
        for proj, shape in (("gate_proj", (an.hidden, c)), ("up_proj", (an.hidden, c)), ("down_proj", (c, an.hidden))):
            setattr(mlp, proj, nn.Linear(*shape, bias=an.mlp_bias, dtype=dtype))
