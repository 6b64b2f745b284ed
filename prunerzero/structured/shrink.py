"""Turning a level genome into a model: *masked* (full-size matrices with removed units set
to zero, for checks) or *materialised* (physically smaller matrices, modules at 100%
replaced by parameter-free stand-ins), plus saving and reloading materialised models."""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
from torch import nn

from ..engine.models import decoder_layers, finish_saved_config
from .database import Database
from .remote_code import NoMLP, pruned_attention, shrink_to
from .units import ATTN, MLP, StructureError, attention_of, child_with

STRUCTURE_FILE = "prunerzero_structure.json"


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


def _rotary_of(attn):
    """The family's rotary-embedding function (the module of its attention class has one)."""
    return sys.modules[type(attn).__module__].apply_rotary_pos_emb


def _shrink_attention(block, i, spec, db, level, config):
    an = db.anatomy
    name, attn = child_with(block, ATTN, "attention")
    new = pruned_attention(attn, spec, config, _rotary_of(attn), i)
    if not spec["heads"]:
        setattr(block, name, new)
        return
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
        _shrink_attention(block, i, spec, db, genome[i], model.config)
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
    (path / f"{REMOTE_MODULE}.py").write_text(modeling_source(model))
    finish_saved_config(path, prunerzero_structure=structure, architectures=[REMOTE_CLASS],
                        auto_map={"AutoModelForCausalLM": f"{REMOTE_MODULE}.{REMOTE_CLASS}"})


REMOTE_MODULE, REMOTE_CLASS = "modeling_prunerzero", "PrunerZeroForCausalLM"


def modeling_source(model) -> str:
    """The modeling file saved beside a materialised model: remote_code.py (torch and
    transformers only) and a subclass of the model's own architecture that shrinks itself to
    config.prunerzero_structure before transformers loads the weights."""
    from . import remote_code
    base = type(model)   # a materialised model keeps its family's class (LlamaForCausalLM, ...)
    return Path(remote_code.__file__).read_text() + f'''

# --- written by prunerzero for this model's architecture ---
from transformers import {base.__name__} as _Base  # noqa: E402
from {base.__module__} import apply_rotary_pos_emb as _rotary  # noqa: E402


class {REMOTE_CLASS}(_Base):
    """{base.__name__} with the attention heads and MLP channels that prunerzero kept
    (config.prunerzero_structure: one entry per decoder block)."""

    def __init__(self, config):
        super().__init__(config)
        shrink_to(self, config.prunerzero_structure, _rotary)
'''


def load_structured(path, dtype=None, device: str | None = "cpu"):
    """Reload a model saved by `save_structured` (or `prunerzero darwin`): the original
    architecture is built from config.json, shrunk to the saved structure, then loaded."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM
    path = Path(path)
    spec_file = path / STRUCTURE_FILE
    if not spec_file.is_file():
        raise StructureError(f"{path} holds no {STRUCTURE_FILE}: not a structurally pruned model")
    try:
        layers = json.loads(spec_file.read_text())["layers"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise StructureError(f"{spec_file} is damaged ({type(e).__name__}); the model cannot be rebuilt") from None
    config = AutoConfig.from_pretrained(path)
    check_structure(layers, config, spec_file)
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


def check_structure(layers, config, where) -> None:
    """A saved structure that names only units the architecture has, one entry per block, each
    list ascending without repeats, the key-value heads those of the kept query heads."""
    heads = config.num_attention_heads
    group = heads // (getattr(config, "num_key_value_heads", None) or heads)
    units = dict(heads=heads, kv_heads=heads // group, channels=config.intermediate_size)

    def bad(why):
        return StructureError(f"{where} is damaged: {why}; the model cannot be rebuilt")
    if not isinstance(layers, list) or len(layers) != config.num_hidden_layers:
        raise bad(f"it must list {config.num_hidden_layers} blocks")
    for i, spec in enumerate(layers):
        if not isinstance(spec, dict) or set(spec) < set(units):
            raise bad(f"block {i} must give heads, kv_heads and channels")
        for key, count in units.items():
            v = spec[key]
            if not isinstance(v, list) or not all(type(u) is int for u in v) or v != sorted(set(v)):
                raise bad(f"block {i}: {key} must be ascending whole numbers without repeats")
            if v and not 0 <= v[0] <= v[-1] < count:
                raise bad(f"block {i} names {key} {v[-1] if v[-1] >= count else v[0]}, the model has {count}")
        if spec["kv_heads"] != sorted({h // group for h in spec["heads"]}):
            raise bad(f"block {i}: kv_heads are not those of its query heads")


def _reshape(model, layers):
    """Give a freshly built model the saved shapes (values come from the state dict)."""
    shrink_to(model, layers, _rotary_of(attention_of(decoder_layers(model)[0])))
