"""Primitives of every prunable layer from calibration samples: X (input-activation l2
norm per input channel) and G (l2 norm over samples of the per-sample gradient), cached
on disk so a second run skips the work."""
from __future__ import annotations

import hashlib
import os
import json
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from .. import progress
from ..progress import bar

from .layers import as_matrix, in_features, matrix
from .models import ModelError, all_prunable, cache_dir, copy_fits, grads_only_for
from .reconstruct import inverse_factor


class Recorder:
    """Forward pre-hooks on a set of Linears that accumulate a statistic of their inputs;
    a context manager that removes its hooks on exit. Pre-hooks, so a recording pass may stop
    at the last layer before computing it (passes.stopping_at)."""

    def __init__(self, linears: dict):
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in linears.items()]

    def _hook(self, name):
        def hook(module, inputs):
            self.record(name, inputs[0])
        return hook

    def record(self, name: str, x: torch.Tensor):
        """What the hook of layer `name` does with its input x; also called by hand to replay
        stored inputs, or to feed a recorder whose hooks were removed, in the order they ran."""
        self.add(name, x.detach().reshape(-1, x.shape[-1]))

    def add(self, name: str, x: torch.Tensor):
        raise NotImplementedError

    def remove(self):
        for h in self.handles:
            h.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


class InputNorms(Recorder):
    """sum_t x_tj^2 over tokens for each hooked Linear; X = its square root."""

    def __init__(self, linears: dict):
        self.sq = {name: torch.zeros(in_features(m), dtype=torch.float32, device=m.weight.device)
                   for name, m in linears.items()}
        super().__init__(linears)

    def add(self, name, x):
        x = x.float()
        self.sq[name] += (x * x).sum(0)

    def norms(self) -> dict[str, torch.Tensor]:
        return {name: s.sqrt().reshape(1, -1) for name, s in self.sq.items()}


class Hessians(Recorder):
    """H = sum over calibration tokens of x x^T (fp32) per hooked Linear. Linears that read the
    same input tensor (q/k/v, gate/up) share one H: a third of the work and memory."""

    def __init__(self, linears: dict):
        self.H: dict[str, torch.Tensor] = {}
        self.owner: dict[str, str] = {}
        self._last = (None, None)
        super().__init__(linears)

    def record(self, name, x):
        """Recorder.record: layers fed the very tensor the previous one was share its H."""
        if name not in self.owner:
            prev, prev_name = self._last
            self.owner[name] = self.owner[prev_name] if x is prev else name
        self._last = (x, name)
        if self.owner[name] == name:
            self.add(name, x.detach().reshape(-1, x.shape[-1]))

    def add(self, name, x):
        x = x.float()
        if name not in self.H:
            self.H[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
        self.H[name].addmm_(x.T, x)

    def remove(self):
        super().remove()
        self._last = (None, None)

    def per_layer(self, fn) -> dict:
        """fn(H) for every recorded Linear, computed once per shared Hessian."""
        done = {name: fn(H) for name, H in self.H.items()}
        return {name: done[owner] for name, owner in self.owner.items()}

    def x_norms(self) -> dict[str, torch.Tensor]:
        """X (input l2 norm per channel) = sqrt(diag H): one recorder serves both."""
        return self.per_layer(lambda H: H.diagonal().sqrt().reshape(1, -1))

    def curvature(self, percdamp: float = 0.01) -> dict[str, torch.Tensor]:
        """The H terminal of every recorded Linear (see obs_curvature)."""
        return self.per_layer(lambda H: obs_curvature(H, percdamp))

    def factors(self, percdamp: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(upper Cholesky factor of H^-1, dead input channels) for every recorded Linear."""
        return self.per_layer(lambda H: inverse_factor(H, percdamp))


class PairedHessians(Hessians):
    """Hessians, plus K = X^T Xd per shared input: X the inputs a layer receives in the model
    pruned so far, Xd those the dense model gives it on the same tokens (see
    reconstruct.dense_fitter). blocks.blockwise runs each batch twice: first the dense stream
    with `capturing` set (its inputs are kept, one batch at a time), then the pruned stream, whose
    inputs meet them here. A layer whose two inputs differ in shape (an MoE expert that the two
    streams route different tokens to), or that one stream reached in a batch and the other did
    not, has no pairing: it is listed in `unpaired`, has no K, and is fitted to its own output.

    When the dense stream covers only the first batches (Update.dense_windows), the later ones
    start with alone(): their inputs add to H only, and cross() scales the paired batches'
    share of the error up to every token (see cross)."""

    def __init__(self, linears: dict):
        self.K: dict[str, torch.Tensor] = {}
        self.unpaired: set[str] = set()
        self.capturing = False
        self.solo = False
        self._dense: dict[str, torch.Tensor] = {}
        self._paired_h: dict[str, torch.Tensor] = {}    # H over the paired tokens, once a batch was alone
        self._rows: dict[str, list[int]] = {}           # [tokens, paired tokens] per shared input
        super().__init__(linears)

    def capture(self):
        """Start a batch's dense half (then set `capturing` False for its pruned half). A dense
        input the previous batch's pruned half never met is dropped, its layer unpaired: met by a
        later batch's input, it would pair other tokens."""
        self.settle()
        self.capturing = True

    def alone(self):
        """Start a batch that has no dense half: its pruned inputs add to H alone."""
        self.settle()
        self.solo = True

    def settle(self):
        """End the paired batches: layers the dense stream reached and the pruned one did not are unpaired."""
        self.unpaired.update(self._dense)
        self._dense.clear()
        self.capturing = self.solo = False

    def add(self, name, x):
        if self.capturing:
            self._dense[name] = x
            return
        rows = self._rows.setdefault(name, [0, 0])
        rows[0] += len(x)
        if self.solo:   # the first such batch: H so far is the paired tokens' alone
            if name not in self._paired_h:
                self._paired_h[name] = self.H[name].clone() if name in self.H else \
                    torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
            super().add(name, x)
            return
        super().add(name, x)
        xd = self._dense.pop(name, None)
        if xd is None or xd.shape != x.shape:
            self.unpaired.add(name)
            return
        if name not in self.K:
            self.K[name] = torch.zeros_like(self.H[name])
        self.K[name].addmm_(x.float().T, xd.float())
        rows[1] += len(x)
        if name in self._paired_h:
            self._paired_h[name].addmm_(x.float().T, x.float())

    def cross(self, owner: str) -> torch.Tensor | None:
        """K of a shared input, or None when it could not be paired. When some batches had no
        dense half, the K that all tokens would give is estimated from the paired ones, where
        the error is known: H + (tokens / paired tokens) (K - Hp), Hp the paired tokens' H. The
        error term X^T (Xd - X) is scaled, not K itself, so the estimate is exact when nothing
        before the layer was pruned and its noise shrinks with the error."""
        if owner in self.unpaired or owner in self._dense or owner not in self.K:
            return None
        Hp = self._paired_h.get(owner)
        if Hp is None:
            return self.K[owner]
        tokens, paired = self._rows[owner]
        return self.H[owner] + (tokens / paired) * (self.K[owner] - Hp)


def obs_curvature(H: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """1 / [(H + damp I)^-1]_jj per input channel j, shaped (1, in), damp = percdamp * mean diag H.

    The curvature that Optimal Brain Surgeon charges for removing one weight of channel j
    (its saliency is w^2 times this); it equals X_j^2 when the channels are uncorrelated and
    is smaller for channels that others can stand in for."""
    H = H.double()
    damp = percdamp * H.diagonal().mean().clamp_min(1e-12)
    L, info = torch.linalg.cholesky_ex(H + damp * torch.eye(len(H), dtype=H.dtype, device=H.device))
    if info:
        raise ValueError("the calibration Hessian is not positive definite; use more calibration samples")
    return torch.cholesky_inverse(L).diagonal().reciprocal().float().reshape(1, -1)


@torch.no_grad()
def compute_h(model, samples: torch.Tensor, percdamp: float = 0.01) -> dict[str, torch.Tensor]:
    """H (OBS curvature) of every prunable layer of the dense model, one decoder block at a
    time, so only one block's Hessians are in memory."""
    from .blocks import blockwise
    out = {}

    def keep(i, linears, rec):
        out.update({f"layers.{i}.{k}": v for k, v in rec.curvature(percdamp).items()})
    blockwise(model, samples, Hessians, keep, progress=True, desc="curvature")
    return out


@torch.no_grad()
def record_dense(model, samples: torch.Tensor, recorder, batch_size: int = 1, desc: str = "activations",
                 progress: bool = True):
    """One pass of the dense model over the samples with `recorder` on every prunable layer."""
    device = next(model.parameters()).device
    with recorder(all_prunable(model)) as rec:
        for i in bar(range(0, len(samples), batch_size), desc=desc, enabled=progress):
            model(samples[i:i + batch_size].to(device))
    return rec


def compute_hessians(model, samples: torch.Tensor, progress: bool = True) -> dict[str, torch.Tensor]:
    """H = X^T X of the dense model's inputs to every prunable layer, one tensor per group of
    layers that read the same input (see shared_inputs), keyed by the group's first layer."""
    from .blocks import blockwise, by_block
    if not by_block(model):
        return record_dense(model, samples, Hessians, desc="hessians", progress=progress).H
    out = {}

    def keep(i, linears, rec):  # kept where the model's weights live, not on the execution device
        out.update({f"layers.{i}.{k}": v.to(next(model.parameters()).device) for k, v in rec.H.items()})
    blockwise(model, samples, Hessians, keep, progress=progress, desc="hessians", dense=True)
    return out


def shared_inputs(model, ids: torch.Tensor) -> dict[str, str]:
    """Layer -> the first layer reading the same input tensor (q/k/v, gate/up), found by one
    forward pass of a few tokens of `ids`."""
    return record_dense(model, ids[:1, :4], Hessians, progress=False).owner


def compute_x(model, samples: torch.Tensor, batch_size: int = 1) -> dict[str, torch.Tensor]:
    """X of every prunable layer of the dense model (one-shot: no pruning between layers); block
    by block when the model is onloaded or its blocks run in another dtype (see blocks.by_block)."""
    from .blocks import blockwise, by_block
    if not by_block(model):
        return record_dense(model, samples, InputNorms, batch_size).norms()
    out = {}

    def keep(i, linears, rec):
        out.update({f"layers.{i}.{k}": v.to(next(model.parameters()).device) for k, v in rec.norms().items()})
    blockwise(model, samples, InputNorms, keep, progress=True, desc="activations", dense=True)
    return out


def compute_g(model, samples: torch.Tensor, scale: float = 1.0, batch: int | None = None) -> dict[str, torch.Tensor]:
    """G = sqrt(sum over samples of (scale * dLoss/dW)^2), labels = inputs, accumulated in fp32.

    The accumulators live on the model's device when they fit in its free memory, else in host
    memory (7B: 26 GB of fp32 beside a 13 GB bf16 model). A half-precision model's G is returned
    (and cached) in its dtype; scores are computed in fp32 whatever the primitives' dtype.
    batch: samples per forward and backward (None: passes.samples_per_call, one on a CPU);
    see _g_per_sample and _g_batched.
    """
    from .blocks import onloading
    from .passes import samples_per_call
    if onloading(model):
        raise ModelError("G (gradients) needs the whole model on its device, and this one is onloaded one block "
                         "at a time because it does not fit: use a metric without G (wanda, or W and X terms), "
                         "or a device with room for the model")
    layers = all_prunable(model)
    device = next(model.parameters()).device
    batch = batch or samples_per_call(device, samples.shape[1])
    acc_device = device if copy_fits(layers.values(), bytes_per_weight=4) else torch.device("cpu")
    acc = {name: torch.zeros(matrix(m).shape, dtype=torch.float32, device=acc_device)
           for name, m in layers.items()}
    plain = all(type(m) is torch.nn.Linear for m in layers.values())  # per-expert views need the autograd path
    if batch > 1 and plain:
        _g_batched(model, samples, layers, acc, scale, batch)
    else:
        _g_per_sample(model, samples, layers, acc, scale)
    stored = next(model.parameters()).dtype
    keep = stored if stored in (torch.bfloat16, torch.float16) else torch.float32
    return {name: a.sqrt_().to(keep) for name, a in acc.items()}


def _g_per_sample(model, samples, layers, acc, scale):
    """One backward per sample; each weight's gradient is squared into its accumulator as soon
    as it is ready and then freed, so memory holds one extra copy of the prunable weights."""
    device = next(model.parameters()).device
    hooks = []
    # the hooks go on once gradients are on: per-expert views start without them
    with grads_only_for(model, [m.weight for m in layers.values()]):
        try:
            for name, m in layers.items():
                def hook(param, name=name, m=m):
                    acc[name].add_(as_matrix(m, param.grad).float().mul(scale).square_().to(acc[name].device))
                    param.grad = None
                hooks.append(m.weight.register_post_accumulate_grad_hook(hook))
            for i in bar(range(len(samples)), desc="gradients"):
                ids = samples[i:i + 1].to(device)
                model(input_ids=ids, labels=ids).loss.backward()
        finally:
            for h in hooks:
                h.remove()


def _g_batched(model, samples, layers, acc, scale, batch):
    """`batch` samples per forward and backward, with every sample's own weight gradient.

    For a Linear y = x W^T, one sample's gradient is gy_s^T x_s (its output gradient times its
    input, summed over its tokens), so a forward hook keeps each layer's input and a backward
    hook forms the per-sample products from the batch's output gradient: no weight gradient is
    ever summed over the batch, and the forward and activation backward run batched. The batch
    loss is the mean over the batch's tokens, i.e. the mean of the samples' own losses (equal
    lengths), so each sample's gradient is the batch size times its share."""
    device = next(model.parameters()).device
    inputs, hooks = {}, []

    def keep_input(name):
        def hook(module, args, output):
            inputs[name] = args[0].detach()
        return hook

    def per_sample(name):
        def hook(module, grad_input, grad_output):
            x, gy = inputs.pop(name), grad_output[0]
            for s in range(len(x)):
                g = gy[s].reshape(-1, gy.shape[-1]).float().T @ x[s].reshape(-1, x.shape[-1]).float()
                acc[name].add_(g.mul_(scale * len(x)).square_().to(acc[name].device))
        return hook

    embed = model.get_input_embeddings()
    with grads_only_for(model, []):
        try:
            for name, m in layers.items():
                hooks.append(m.register_forward_hook(keep_input(name)))
                hooks.append(m.register_full_backward_hook(per_sample(name)))
            for i in bar(range(0, len(samples), batch), desc="gradients"):
                ids = samples[i:i + batch].to(device)
                # the gradient flows from the loss to the embeddings' output; no weight needs one
                x = embed(ids).detach().requires_grad_(True)
                model(inputs_embeds=x, labels=ids).loss.backward()
                inputs.clear()
        finally:
            for h in hooks:
                h.remove()


def cache_key(**settings) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _unshared(tensors: dict) -> dict:
    """CPU tensors for safetensors, copying those that share storage (H of q/k/v)."""
    seen, out = set(), {}
    for k, v in tensors.items():
        v = v.detach().contiguous().cpu()
        out[k] = v.clone() if v.data_ptr() in seen else v
        seen.add(v.data_ptr())
    return out


def cache_path(kind: str, settings: dict):
    return cache_dir() / "primitives" / f"{kind}-{cache_key(kind=kind, **settings)}.safetensors"


class CacheDamaged(Exception):
    """A cache file that cannot be trusted; the caller discards it and computes afresh."""


def content_digest(tensors: dict) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def _read_checked(path, kind: str, settings: dict, names) -> dict[str, torch.Tensor]:
    """The tensors of a cache file whose kind, settings, layer names and content checksum all
    match what was written; CacheDamaged otherwise (truncated, garbage, edited or foreign)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for every kind of damage
        raise CacheDamaged(f"unreadable ({type(e).__name__}: {str(e).splitlines()[0][:80]})") from None
    if meta.get("kind", kind) != kind or meta.get("settings") != _settings_text(settings):
        raise CacheDamaged("written for other settings")
    if "sha256" not in meta:
        raise CacheDamaged("it has no checksum (written by an older prunerzero)")
    if names is not None and set(tensors) != set(names):
        raise CacheDamaged(f"it holds {len(tensors)} layers, the model has {len(names)}")
    if content_digest(tensors) != meta["sha256"]:
        raise CacheDamaged("its content does not match its checksum")
    return tensors


def _settings_text(settings: dict) -> str:
    return json.dumps(settings, sort_keys=True, default=str)


def cached(kind: str, settings: dict, compute, names=None) -> dict[str, torch.Tensor]:
    """`kind` primitives for `settings` from the cache, or computed and stored with their
    settings and a content checksum. A damaged entry is reported, discarded and recomputed;
    `names`, when given, are the layers the entry must hold."""
    path = cache_path(kind, settings)
    if path.is_file():
        try:
            return _read_checked(path, kind, settings, names)
        except CacheDamaged as e:
            progress.say(f"WARNING: the cached {kind} primitives at {path} are discarded ({e}); computing them again")
            path.unlink(missing_ok=True)
    out = compute()
    plain = _unshared(out)
    meta = {"kind": kind, "settings": _settings_text(settings), "sha256": content_digest(plain)}
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(plain, str(tmp), metadata=meta)
        tmp.rename(path)
    except OSError as e:  # a full or read-only cache costs the reuse, never the run
        tmp.unlink(missing_ok=True) if tmp.parent.is_dir() else None
        progress.say(f"WARNING: the {kind} primitives could not be cached at {path.parent} ({e.strerror}); "
                     "continuing without the cache (they are computed again next time)")
    return out
