"""Reconstruction: once a layer's mask is chosen, change its kept weights so that the layer's
output on the calibration inputs moves as little as possible,

    min over W'  || X W'^T - X W^T ||^2   with W' = 0 where the mask prunes,

from H = X^T X, which the sequential pass records anyway. Three solvers:

- `obs`: SparseGPT's sweep (Frantar & Alistarh, 2023): columns left to right, each pruned
  weight's error pushed onto the row's later weights through the Cholesky factor of H^-1,
  with the mask fixed beforehand by the metric;
- `obs-adaptive`: the same sweep, but the metric scores the weights as they stand when the sweep
  reaches each block (each N:M group): SparseGPT itself is this with the metric w^2/[H^-1]_jj^2;
- `admm`: ADMM on the masked least squares of all rows at once (Boza, 2024, "Fast and optimal
  weight update for pruned LLMs"): one inverse of H + rho I per layer, in coordinates where H
  has a unit diagonal; with `gradual` > 0 the metric chooses the mask again on the current
  iterate over the first `gradual` iterations, its sparsity rising cubically to the target.

Every solver keeps exactly the requested mask shape: unstructured (per row or per layer) or N:M.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import asdict, dataclass

import torch

from ..errors import PrunerZeroError
from .masks import lowest_k, lowest_per_row, make_mask, nm_fraction, nm_mask, parse_structure, row_counts

UPDATES = ("none", "obs", "obs-adaptive", "admm", "admm-pcg")
ADMM_KINDS = ("admm", "admm-pcg")
PCG_STEPS = 10   # admm-pcg's refinement steps unless given


class HessianError(PrunerZeroError, RuntimeError):
    """A layer-input Hessian that cannot be factorised even with heavy damping."""


def inverse_factor(H: torch.Tensor, percdamp: float = 0.01, retries: int = 4):
    """U with U^T U = (H + damp I)^-1, damp = percdamp * mean(diag H); channels that never
    fire (diag 0) get a unit diagonal and their weights are dropped. If H is numerically
    not positive definite, the damping grows tenfold per retry."""
    H = H.clone()
    dead = H.diagonal() == 0
    if dead.all():
        # a layer that saw no calibration token (an MoE expert no sample was routed to): no
        # curvature to go by, so prune by magnitude without an update rather than drop it all
        H, dead = torch.eye(len(H), dtype=H.dtype, device=H.device), torch.zeros_like(dead)
    H[dead, dead] = 1
    damp = percdamp * H.diagonal().mean()
    for _ in range(retries + 1):
        L, info = torch.linalg.cholesky_ex(H + damp * torch.eye(len(H), device=H.device))
        if info == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True), dead
        damp = damp * 10
    raise HessianError("the calibration Hessian is not positive definite even with heavy damping; "
                         "use more calibration samples")


@dataclass(frozen=True)
class Update:
    """Which reconstruction runs after the mask, and its parameters (all written to reports)."""
    kind: str = "none"
    percdamp: float | None = None   # damping, a fraction of mean diag H: 0.01 for OBS, 0.1 for ADMM
    blocksize: int = 128            # OBS: columns per lazy block (and per re-scoring, unstructured)
    rho: float = 1.0                # ADMM penalty, in unit-diagonal coordinates
    iters: int = 20                 # ADMM iterations
    gradual: int = 15               # ADMM: iterations that re-choose the mask (0: fixed mask)
    refine: int | None = None       # admm-pcg: conjugate-gradient steps on the final mask (None: PCG_STEPS)
    correct: float = 0.0            # sequential pruning: the share of the error the pruned earlier blocks
                                    # left that each layer's reconstruction makes up for (0: fit the layer's
                                    # own output on the inputs it now receives, as published; 1: fit the
                                    # dense model's output, which overfits the calibration text)
    staged: int = 0                 # sequential pruning: 1 prunes each block's layers in stages, in forward
                                    # order (q/k/v, o, gate/up, down), each stage's statistics taken with the
                                    # earlier stages pruned (SparseGPT's "true sequential"); 0: all from the
                                    # block's inputs at once, as Wanda does
    tune: int = 0                   # block tuning: epochs of Adam over the calibration windows on each pruned
                                    # block's kept weights, fitting the dense block's outputs (0: none)
    tune_lr: float = 1e-3           # its learning rate (the best of 1e-5 to 3e-3 on a SmolLM2 block, held out:
                                    # experiments/probe_tuning.py)
    dense_windows: int = 0          # correct= and tune=: carry the dense stream for the first K calibration
                                    # windows only (0: all): the correction's cross term is estimated from
                                    # them, and tuning fits them; a fraction of the dense stream's cost
    bf16: int = 0                   # ADMM: 1 multiplies in bfloat16 while the mask is still being chosen
                                    # (the first `gradual` iterations), in fp32 after it and in the refinement,
                                    # which mend what the coarser products leave: 4-6x faster products on CPUs
                                    # with bf16 units (AMX) and on GPUs' tensor cores, where large layers'
                                    # iterations are the prune's time (fp32 throughout where bf16 is not
                                    # fast: fast_bf16)

    def __post_init__(self):
        from .. import checks
        P = "--update"   # its parameters are named as typed there: "--update iters must be ..."
        checks.choice("update", self.kind, UPDATES)
        checks.number(f"{P} correct", self.correct, 0, 1)
        if self.correct and self.kind == "none":
            raise checks.SettingsError("correct= changes how kept weights are reconstructed: give an --update kind")
        checks.integer(f"{P} refine", self.refine, minimum=0, optional=True)
        checks.integer(f"{P} staged", self.staged, minimum=0, maximum=1)
        checks.integer(f"{P} tune", self.tune, minimum=0)
        checks.number(f"{P} tune_lr", self.tune_lr, low=0, low_open=True)
        # without correct= or tune= it has nothing to limit (prune warns), but it is kept, so that
        # a search that moves correct= to 0 and back keeps the user's setting
        checks.integer(f"{P} dense_windows", self.dense_windows, minimum=0)
        checks.integer(f"{P} bf16", self.bf16, minimum=0, maximum=1)
        checks.number(f"{P} percdamp", self.percdamp, low=0, low_open=True, optional=True)
        checks.integer(f"{P} blocksize", self.blocksize)
        checks.number(f"{P} rho", self.rho, low=0, low_open=True)
        checks.integer(f"{P} iters", self.iters)
        checks.integer(f"{P} gradual", self.gradual, minimum=0, maximum=self.iters)

    @classmethod
    def parse(cls, spec) -> "Update":
        """An Update from its spec: a kind alone ("admm"), or a kind and some of its parameters,
        "admm-pcg rho=0.5 iters=30 refine=20" (what spec() writes; catalog entries, --update and
        the searched recipes use it). An Update is returned as it is."""
        if isinstance(spec, Update):
            return spec
        if spec is None:
            return cls()
        from .. import checks
        kind, *pairs = str(spec).replace(",", " ").split()
        fields = {f.name: f for f in dataclasses.fields(cls)}
        args = {}
        for pair in pairs:
            name, sep, value = pair.partition("=")
            if not sep or name not in fields or name == "kind":
                raise checks.SettingsError(f"--update {spec!r}: '{pair}' is not a parameter=value of an update "
                                           f"(parameters: {', '.join(n for n in fields if n != 'kind')})")
            args[name] = _number(value, f"--update {spec!r}: {name}")
        return cls(kind, **args)

    def settled(self) -> "Update":
        """This update with equal settings spelled one way: a damping or refinement at its kind's
        default left out, admm-pcg with no refinement steps as admm. Two updates that prune alike
        settle to one, so a search caches them as one and apply reports them alike."""
        default = Update(self.kind)
        fields = dict(percdamp=None if self.damping == default.damping else self.damping)
        if self.is_admm:
            steps = self.refine_steps
            if self.kind == "admm-pcg" and not steps:
                fields["kind"] = "admm"
            fields["refine"] = None if not steps or steps == default.refine_steps else steps
        return dataclasses.replace(self, **fields)

    def spec(self) -> str:
        """The settled kind and every parameter that differs from its defaults, as parse() reads
        it: equal settings give one spec everywhere (apply's report, the catalog, a search)."""
        settled = self.settled()
        base = Update(settled.kind)
        extra = [f"{f.name}={getattr(settled, f.name)}" for f in dataclasses.fields(settled)
                 if f.name != "kind" and getattr(settled, f.name) != getattr(base, f.name)]
        return " ".join([settled.kind, *extra])

    @property
    def is_admm(self) -> bool:
        return self.kind in ADMM_KINDS

    @property
    def refine_steps(self) -> int:
        """Conjugate-gradient steps on the final mask: admm-pcg's (PCG_STEPS unless given), else none."""
        if self.kind != "admm-pcg":
            return 0
        return PCG_STEPS if self.refine is None else self.refine

    @property
    def damping(self) -> float:
        return self.percdamp if self.percdamp is not None else (0.1 if self.is_admm else 0.01)

    def describe(self) -> dict:
        """The parameters that matter for this kind, for report.json."""
        tuning = {"tune": self.tune, "tune_lr": self.tune_lr} if self.tune else {}
        if self.dense_windows and (self.tune or self.correct):
            tuning["dense_windows"] = self.dense_windows
        if self.kind == "none":
            return {"kind": "none", **({"staged": self.staged} if self.staged else {}), **tuning}
        keep = ("blocksize",) if self.kind.startswith("obs") else ("rho", "iters", "gradual")
        out = {"kind": self.kind, "percdamp": self.damping, **{k: v for k, v in asdict(self).items() if k in keep}}
        if self.kind == "admm-pcg":
            out["refine"] = self.refine_steps
        if self.is_admm and self.bf16:
            out["bf16"] = self.bf16
        if self.correct:
            out["correct"] = self.correct
        if self.staged:
            out["staged"] = self.staged
        return {**out, **tuning}


def _number(text: str, what: str):
    from .. import checks
    try:
        return int(text) if text.lstrip("-").isdigit() else float(text)
    except ValueError:
        raise checks.SettingsError(f"{what} must be a number, got {text!r}") from None


def factorise(H: torch.Tensor, update: Update):
    """What `update` needs of a layer-input Hessian, computed once per Hessian: the layers that
    share one (q/k/v, gate/up), and every candidate of a search, reuse it. obs: (U, dead) of
    inverse_factor; admm: AdmmFactor."""
    return admm_factor(H, update) if update.is_admm else inverse_factor(H, update.damping)


def reconstruct(W: torch.Tensor, H: torch.Tensor | None, update: Update, score, sparsity: float,
                structure: str = "unstructured", group: str = "row", count: int | None = None,
                factor=None) -> torch.Tensor:
    """The pruned, reconstructed weights (fp32) of one layer. W: (out, in); H: (in, in) = X^T X,
    or None when `factor` (factorise(H, update)) is given; score(W) -> the metric's scores of the
    weights W (the other primitives bound in); count: the exact number of weights to prune
    (unstructured; see make_mask)."""
    nm = parse_structure(structure, sparsity)
    factor = factorise(H, update) if factor is None else factor
    if update.is_admm:
        return admm_weights(W, factor, score, sparsity, structure, group, update, count)
    U, dead = factor
    if update.kind == "obs":
        fixed = make_mask(score(W.float()), sparsity, structure, group, count)
        return obs_sweep(W, U, dead, lambda cur, a, b, d: fixed[:, a:b], update.blocksize, group_only=True)
    chooser = adaptive_chooser(score, sparsity, nm, group, W.shape, count)
    return obs_sweep(W, U, dead, chooser, update.blocksize, nm and nm[1])


@torch.no_grad()
def dense_fitter(H: torch.Tensor, K: torch.Tensor, update: Update):
    """For update.correct = c > 0: a function taking a layer's dense weights W to the weights W*
    that best fit, from the inputs X the layer now receives, the target Y = (1 - c) X W^T + c Xd W^T
    (c = 1: the dense model's output),

        W* = argmin ||X W*^T - Y||^2 + (W* - W) D (W* - W)^T = (W Kc^T + W D) (H + D)^-1,

    with H = X^T X, K = X^T Xd recorded on the same tokens (Xd: the dense model's inputs),
    Kc = (1 - c) H + c K, and D the update's own damping (OBS: percdamp * mean diag H; ADMM: its
    damping in unit-diagonal coordinates, i.e. proportional to diag H). The masked problem
    around W* with H is the damped masked problem of fitting Y, up to a constant, so every
    solver runs unchanged from W*. With K = H (no earlier error), W* = W; W* moves linearly in c.
    Computed once per shared input (q/k/v, gate/up), applied to each layer that reads it."""
    K = torch.lerp(H.double(), K.double(), update.correct)
    H = H.double()
    diag = H.diagonal()
    dead = diag == 0
    damp = update.damping * (diag * (~dead).double().mean() if update.is_admm else diag.mean().expand_as(diag))
    damp = torch.where(dead, torch.ones_like(damp), damp)   # dead inputs: W* keeps W there (pruned later)
    A = H + torch.diag(damp)
    L, info = torch.linalg.cholesky_ex(A)
    if info:
        raise HessianError("the calibration Hessian is not positive definite; use more calibration samples")
    Kt, damp32 = K.T.float(), damp.float()

    def fit(W: torch.Tensor) -> torch.Tensor:
        W = W.float()
        B = torch.addcmul(W.mm(Kt), W, damp32)
        return torch.cholesky_solve(B.T.double(), L).T.float()
    return fit


@torch.no_grad()
def obs_sweep(W: torch.Tensor, U: torch.Tensor, dead: torch.Tensor, choose, blocksize: int = 128,
              step: int | None = None, group_only: bool = False, inner: int = 16) -> torch.Tensor:
    """The OBS sweep over the columns of W (an fp32 copy returned, fp64 for fp64 input). U: upper Cholesky factor of
    H^-1. `choose(current, a, b, d)` gives the mask (True = prune) of columns [a, b), called at
    the start of each block, or of each group of `step` columns when step is given; `current` is
    W as updated so far (later blocks not yet updated), d the diagonal of U over [a, b).
    group_only: choose reads only columns [a, b) of `current`, so only those are written back
    before each call (else the rest of the block too).

    Each column's error reaches the block's later columns in two levels: rank-1 updates within
    runs of `inner` columns, then one matrix product per run for the rest of the block (SparseGPT's
    lazy batching, applied once more inside its block). The arithmetic is the published sweep's,
    summed in another order; the per-column passes now touch `inner` columns, not the whole block,
    which made the sweep memory-bound on large layers. A run always ends where `choose` is called,
    so the chooser sees every earlier column's error."""
    W = W.to(torch.promote_types(W.dtype, torch.float32), copy=True)  # fp64 stays fp64 (tests)
    W[:, dead] = 0
    rows, cols = W.shape
    if step and blocksize % step:
        raise ValueError(f"blocksize {blocksize} must be a multiple of M = {step}")
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        n = i2 - i1
        # the block transposed, so that a column of W is a contiguous row here
        Bt, U1 = W[:, i1:i2].T.contiguous(), U[i1:i2, i1:i2]
        d = U1.diagonal()
        span = step or n
        cuts = sorted({*range(0, n, inner), *range(0, n, span)}) + [n]
        mask = torch.zeros(n, rows, dtype=torch.bool, device=W.device)
        err = torch.empty_like(Bt)
        for s, t in zip(cuts, cuts[1:]):
            for i in range(s, t):
                if i % span == 0:
                    j = min(i + span, n)
                    upto = j if group_only else n
                    W[:, i1 + i:i1 + upto] = Bt[i:upto].T
                    mask[i:j] = choose(W, i1 + i, i1 + j, d[i:j]).T
                e = torch.where(mask[i], Bt[i], 0).div_(d[i])
                Bt[i + 1:t].addr_(U1[i, i + 1:t], e, alpha=-1)
                Bt[i].masked_fill_(mask[i], 0)  # what the update would leave there, ~0, made exact
                err[i] = e
            if t < n:
                Bt[t:].addmm_(U1[s:t, t:].T, err[s:t], alpha=-1)
        W[:, i1:i2] = Bt.T
        if i2 < cols:
            W[:, i2:].addmm_(err.T, U[i1:i2, i2:], alpha=-1)
    return W


def adaptive_chooser(score, sparsity: float, nm, group: str, shape, count: int | None = None):
    """A chooser for obs_sweep that scores the current weights with the metric: N:M per group;
    unstructured per block, pruning floor(b*k/in) - floor(a*k/in) of columns [a, b) of a row
    that prunes k in all (of the whole block, for group="layer"), so every total is exact."""
    rows, cols = shape
    if group == "layer":
        total = int(rows * cols * sparsity) if count is None else count
    else:
        ks = torch.full((rows,), int(cols * sparsity), dtype=torch.long) if count is None else row_counts(rows, count)

    def choose(current, a, b, d):
        s = score(current)[:, a:b]
        if nm is not None:
            return nm_mask(s, *nm)
        if group == "layer":  # columns are whole here: rank the block's weights column-major
            k = total * b // cols - total * a // cols
            return lowest_k(s.T.reshape(1, -1), k).reshape(b - a, rows).T
        return lowest_per_row(s, ks * b // cols - ks * a // cols)
    return choose


@dataclass(frozen=True)
class AdmmFactor:
    """A Hessian in unit-diagonal coordinates, Hn = H / (norm norm^T) + damping: `inv` is the
    inverse of Hn + rho I that every ADMM iteration applies (Hn itself is not needed: see
    admm_weights); `dead` inputs never fire; `plain`, for admm-pcg only, is Hn itself (damped,
    without rho), whose masked least squares the refinement solves."""
    inv: torch.Tensor
    norm: torch.Tensor
    dead: torch.Tensor
    plain: torch.Tensor | None = None


@torch.no_grad()
def admm_factor(H: torch.Tensor, update: Update) -> AdmmFactor:
    # the normalisation and the inverse in fp64 (cheap next to the iterations); they run in fp32
    H = H.double()
    norm = H.diagonal().sqrt()
    dead = norm == 0
    norm = torch.where(dead, torch.ones_like(norm), norm)
    Hn = H / norm / norm[:, None]
    Hn.diagonal().add_(update.damping * Hn.diagonal().mean())
    # the damped problem ADMM solves, for the refinement (undamped, it fits the calibration
    # tokens closer and measured worse held out: see docs/benchmarks.md)
    plain = Hn.float() if update.refine_steps else None
    Hn.diagonal().add_(update.rho)
    L, info = torch.linalg.cholesky_ex(Hn)
    if info:
        raise HessianError("the calibration Hessian is not positive semi-definite; use more calibration samples")
    return AdmmFactor(torch.cholesky_inverse(L).float(), norm.float(), dead, plain)


@torch.no_grad()
def admm_weights(W: torch.Tensor, factor: AdmmFactor, score, sparsity: float, structure: str, group: str,
                 update: Update, count: int | None = None) -> torch.Tensor:
    """ADMM on min ||X(W' - W)^T||^2 subject to the mask, in coordinates where H has a unit
    diagonal (W scaled by the input norms, so that the solver's rho means the same on every
    layer). Returns the final iterate projected on its mask (fp32).

    The textbook iteration, with A = (Hn + rho I)^-1 and W0 the dense weights,
        Z = (W + U) off the mask,  U += W - Z,  W = (W0 Hn + rho (Z - U)) A,
    is run as: V = W + U; U = V on the mask, 0 elsewhere; Z - U = V - 2U (V with its masked
    entries negated); W = T + rho (Z - U) A with T = W0 Hn A = W0 - rho W0 A (as Hn A = I - rho A). The
    same iterates, in one fused product and three elementwise passes per iteration."""
    inv, norm, rho = factor.inv, factor.norm, update.rho
    W0 = W.float().clone()
    W0[:, factor.dead] = 0
    Wn = W0.mul_(norm)
    target = Wn.clone() if update.refine_steps else None  # the dense weights the refinement fits
    T = torch.addmm(Wn, Wn, inv, alpha=-rho)
    nm = parse_structure(structure, sparsity)

    unchecked = getattr(score, "unchecked", score)

    def mask_of(current, fraction=1.0, check=True):
        s = (score if check else unchecked)(current / norm)
        if nm is None and fraction < 1:
            return make_mask(s, sparsity * fraction, structure, group, None if count is None else int(count * fraction))
        if fraction >= 1:
            return make_mask(s, sparsity, structure, group, count)
        # N:M on the way: of the weights the pattern prunes, the lowest-scoring fraction so far
        return nm_fraction(s, *nm, fraction)

    # the mask as 1.0 (pruned) / 0.0: products are several times faster than boolean selects
    pruned = mask_of(Wn).float() if update.gradual == 0 else None
    coarse = inv.bfloat16() if update.bf16 and update.gradual and fast_bf16(inv.device) else None
    Udual = torch.zeros_like(Wn)
    for t in range(update.iters):
        V = Wn.add_(Udual)                       # Wn is not needed past this point
        if t < update.gradual:
            # the scores checked where the mask starts (the dense weights) and where it ends
            pruned = mask_of(V, 1 - (1 - (t + 1) / update.gradual) ** 3, t in (0, update.gradual - 1)).float()
        Udual = V * pruned
        step = V.sub_(Udual, alpha=2)
        if coarse is not None and t < update.gradual:
            Wn = torch.mm(step.bfloat16(), coarse).float().mul_(rho).add_(T)
        else:
            Wn = torch.addmm(T, step, inv, alpha=rho)
    kept = 1 - pruned
    out = Wn.add_(Udual).mul_(kept)
    if update.refine_steps:
        out = refine_on_mask(out, target, factor.plain, kept, update.refine_steps)
    return out.div_(norm)


@functools.lru_cache(maxsize=None)
def fast_bf16(device: torch.device) -> bool:
    """Whether bfloat16 products are fast on `device`: a GPU that supports bf16 natively, or a
    CPU with bf16 units (AVX-512 BF16 or AMX). Elsewhere (a CPU with AVX2 only) bf16 is
    emulated and slower than fp32, so bf16=1 keeps fp32 products there."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    return False


@torch.no_grad()
def refine_on_mask(Wn: torch.Tensor, target: torch.Tensor, Hn: torch.Tensor, kept: torch.Tensor,
                   steps: int) -> torch.Tensor:
    """`steps` conjugate-gradient steps on every row's masked least squares at once (ALPS's
    refinement after ADMM, Meng et al. 2024): min over W' of tr((W' - target) Hn (W' - target)^T)
    with W' zero where `kept` is 0 (Hn damped as ADMM's, so both solve one problem). In Hn's unit-diagonal coordinates this is CG with the Jacobi
    preconditioner. Each step costs one product with Hn and lowers (never raises) each row's
    error; run to convergence it reaches the direct solve of each row on its kept inputs."""
    X = Wn.clone()
    R = (target - X).mm(Hn).mul_(kept)          # minus half the gradient, on the kept entries
    P = R.clone()
    rr = (R * R).sum(1, keepdim=True)
    tiny = torch.finfo(X.dtype).tiny
    for _ in range(steps):
        HP = P.mm(Hn).mul_(kept)
        curv = (P * HP).sum(1, keepdim=True)
        alpha = torch.where(curv > tiny, rr / curv.clamp_min(tiny), torch.zeros_like(rr))
        X.addcmul_(alpha, P)
        R.addcmul_(alpha, HP, value=-1)
        new = (R * R).sum(1, keepdim=True)
        beta = torch.where(rr > tiny, new / rr.clamp_min(tiny), torch.zeros_like(rr))
        P = P.mul_(beta).add_(R)                 # R + beta P, in place
        rr = new
    return X
