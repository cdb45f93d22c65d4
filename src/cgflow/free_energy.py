"""Free-energy (PMF) labels from importance weights, and an ensemble of MLPs fitted to them.

Labels (method-spec §4.1, with flaws 3 and 11 of §8 fixed). For one CG point ``s`` and ``D``
draws ``x_i ~ q(x | s)`` of the conditional flow, with log importance weights
``log w_i = log p~(x_i, s) - log q(x_i | s)``,

    F(s) = -log( (1/D) sum_i w_i )        (kT, up to one global constant),

where a draw that was rejected (wrong chirality, non-finite energy) has ``w_i = 0`` but still counts
in ``D``. This is an unbiased estimate of ``exp(-F)`` for the target restricted to accepted
configurations (the original code summed the weights of a varying number of valid draws instead).
It is evaluated in float64 with log-sum-exp, so log weights of any magnitude neither overflow nor
underflow.

Ensemble (method-spec §4.2). :class:`FreeEnergyEnsemble` trains ``M`` small MLPs together in one
vectorised computation (the members' weights stacked, each layer one batched matrix product),
each member on its own random split of the labelled CG points. Its mean is the free-energy estimate
``F̄(s)`` and the unbiased standard deviation over the members is the disagreement ``σ(s)`` that
the active-learning sampler chases (both in kT).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import stack_module_state

__all__ = [
    "ALLOCATION_RULES",
    "FreeEnergyEnsemble",
    "LabelResult",
    "WeightSums",
    "allocate_draws",
    "cap_labels",
    "debiased_labels",
    "fit_ensemble",
    "label_weights",
    "pmf_labels",
    "populated",
]


# ------------------------------------------------------------------------------------------ labels
@dataclass(frozen=True)
class LabelResult:
    """PMF labels of ``P`` CG points (all float64 except ``n_valid``)."""

    #: F(s) in kT; ``+inf`` where every draw was rejected
    F_kT: torch.Tensor
    #: Kish effective sample size ``(Σw)² / Σw²`` of the (clipped) weights; 0 where all rejected
    ess: torch.Tensor
    #: number of accepted (finite-weight) draws per point, int64
    n_valid: torch.Tensor
    #: standard error of F (kT, delta method: ``sqrt((D/ESS − 1)/(D − 1))``); inf where all
    #: draws were rejected, NaN with a single draw
    se_kT: torch.Tensor

    @property
    def finite(self) -> torch.Tensor:
        """Boolean mask of the points with a usable (finite) label."""
        return torch.isfinite(self.F_kT)


def pmf_labels(log_w: torch.Tensor, clip_top_k: int = 0) -> LabelResult:
    """PMF labels ``F = -log mean_i w_i`` (kT) from log importance weights ``[P, D]``.

    ``D`` is the fixed number of draws per CG point. Rejected draws are passed as ``-inf``; any
    non-finite entry (NaN, ``±inf``) counts as a rejected draw with weight 0 and stays in the
    denominator ``D``.

    ``clip_top_k = k > 0`` sets, per point, the ``k`` largest weights to the ``k``-th largest
    accepted one (the largest ``k - 1`` are clipped down). This trades variance for a *bias*:
    clipped labels are too high (F overestimated) wherever the top weights differ. With fewer than
    ``k`` accepted draws the clip level is the smallest accepted weight.
    """
    lw = torch.as_tensor(log_w)
    if lw.ndim != 2 or lw.shape[1] == 0:
        raise ValueError(f"log_w must have shape [P, D] with D >= 1; got {tuple(lw.shape)}")
    if clip_top_k < 0:
        raise ValueError(f"clip_top_k must be >= 0; got {clip_top_k}")
    lw = lw.to(torch.float64)
    valid = torch.isfinite(lw)
    lw = torch.where(valid, lw, torch.full_like(lw, -math.inf))
    n_valid = valid.sum(dim=1)
    if clip_top_k > 0:
        top = lw.sort(dim=1, descending=True).values
        k = n_valid.clamp(max=clip_top_k).clamp(min=1) - 1  # index of the clip level
        level = top.gather(1, k[:, None])  # -inf for points without an accepted draw
        lw = torch.minimum(lw, level)
    return WeightSums.from_log_weights(lw).labels()


@dataclass(frozen=True)
class WeightSums:
    """Running sums of the importance weights of each CG point, in log space.

    ``Σ w`` over all draws made for a point — by any number of flows, in any number of
    iterations — divided by the total number of draws ``D`` is an unbiased estimate of
    exp(−F): each draw's weight is, whatever flow drew it, and the combination weights
    (draw counts) do not depend on the draws' values. ``Σ w²`` gives the ESS and the standard
    error. The cost of keeping them does not grow with the history.
    """

    log_sum_w: torch.Tensor  #: log Σ w per point (−inf: no accepted draw), float64
    log_sum_w2: torch.Tensor  #: log Σ w² per point, float64
    n_draws: torch.Tensor  #: draws D per point, rejected ones included, int64
    n_valid: torch.Tensor  #: accepted draws per point, int64

    @classmethod
    def from_log_weights(cls, log_w: torch.Tensor) -> WeightSums:
        """Sums of ``[P, D]`` log-weights (non-finite entries are rejected draws, weight 0)."""
        lw = torch.as_tensor(log_w).to(torch.float64)
        if lw.ndim != 2:
            raise ValueError(f"log_w must have shape [P, D]; got {tuple(lw.shape)}")
        point = torch.arange(lw.shape[0]).repeat_interleave(lw.shape[1])
        return cls.from_draws(point, lw.reshape(-1), lw.shape[0])

    @classmethod
    def from_draws(cls, point: torch.Tensor, log_w: torch.Tensor, n_points: int) -> WeightSums:
        """Sums of log-weights ``log_w [N]`` of draws made for points ``point [N]`` (in
        ``[0, n_points)``; any number of draws per point, none included)."""
        point = torch.as_tensor(point).to(torch.int64)
        lw = torch.as_tensor(log_w).to(torch.float64)
        if point.shape != lw.shape or lw.ndim != 1:
            raise ValueError(
                f"need point [N] and log_w [N]; got {tuple(point.shape)}, {tuple(lw.shape)}"
            )
        if len(point) and not (0 <= int(point.min()) and int(point.max()) < n_points):
            raise ValueError(f"draw point indices must lie in [0, {n_points})")
        valid = torch.isfinite(lw)
        lw = torch.where(valid, lw, torch.full_like(lw, -math.inf))

        def log_sum(values: torch.Tensor) -> torch.Tensor:
            top = torch.full((n_points,), -math.inf, dtype=torch.float64)
            top = top.scatter_reduce(0, point, values, "amax")
            top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
            total = torch.zeros(n_points, dtype=torch.float64)
            total = total.index_add(0, point, torch.exp(values - top[point]))
            return torch.log(total) + top

        return cls(
            log_sum(lw),
            log_sum(2.0 * lw),
            torch.bincount(point, minlength=n_points),
            torch.bincount(point[valid], minlength=n_points),
        )

    def __add__(self, other: WeightSums) -> WeightSums:
        """The sums of both sets of draws (point by point)."""
        return WeightSums(
            torch.logaddexp(self.log_sum_w, other.log_sum_w),
            torch.logaddexp(self.log_sum_w2, other.log_sum_w2),
            self.n_draws + other.n_draws,
            self.n_valid + other.n_valid,
        )

    def labels(self) -> LabelResult:
        """``F = log D − log Σ w`` (kT), ESS ``(Σw)²/Σw²`` and the standard error of F."""
        D = self.n_draws.to(torch.float64)
        F = torch.log(D) - self.log_sum_w
        accepted = torch.isfinite(self.log_sum_w)
        ess = torch.exp(2.0 * self.log_sum_w - self.log_sum_w2)
        ess = torch.where(accepted, ess, torch.zeros_like(ess))
        rel_var = torch.clamp(D / ess - 1.0, min=0.0) / (D - 1.0)
        se = torch.where(accepted, torch.sqrt(rel_var), torch.full_like(D, math.inf))
        return LabelResult(F_kT=F, ess=ess, n_valid=self.n_valid, se_kT=se)


def log_weight_gap(point: torch.Tensor, log_w: torch.Tensor, n_points: int) -> torch.Tensor:
    """Per point, ``log mean w − median log w`` (nats) of its draws ``log_w [N]`` (rejected
    draws: −inf, weight 0): how far a typical draw's weight lies below the mean, a robust
    version of the flow's reverse KL at that point (0 for a perfect flow; grows where the flow
    misses the target). inf where half or more of the draws are rejected, NaN without draws."""
    point = torch.as_tensor(point).to(torch.int64)
    lw = torch.as_tensor(log_w).to(torch.float64)
    lw = torch.where(torch.isfinite(lw), lw, torch.full_like(lw, -math.inf))
    sums = WeightSums.from_draws(point, lw, n_points)
    n = sums.n_draws
    log_mean = sums.log_sum_w - torch.log(n.clamp(min=1).to(torch.float64))
    # lower median of each point's draws: sort by (point, log w)
    order = torch.argsort(lw, stable=True)
    order = order[torch.argsort(point[order], stable=True)]
    first = torch.cumsum(n, 0) - n
    median = torch.full((n_points,), math.nan, dtype=torch.float64)
    has = n > 0
    median[has] = lw[order[first[has] + (n[has] - 1) // 2]]
    gap = log_mean - median
    gap[has & torch.isinf(median)] = math.inf
    gap[~has] = math.nan
    return gap


def populated(F_kT: torch.Tensor, populated_kT: float) -> torch.Tensor:
    """Which free energies lie within ``populated_kT`` of the lowest finite one (a non-finite
    value counts as populated: nothing is known against it)."""
    F = torch.as_tensor(F_kT).to(torch.float64)
    finite = torch.isfinite(F)
    low = float(F[finite].min()) if bool(finite.any()) else 0.0
    return ~finite | (F - low < populated_kT)


ALLOCATION_RULES = ("proportional", "new_first", "equal_error")


def allocate_draws(
    F_pred_kT: torch.Tensor,
    se_kT: torch.Tensor,
    n_drawn: torch.Tensor,
    budget: int,
    draws: int,
    target_se_kT: float,
    min_draws: int,
    max_draws: int,
    populated_kT: float,
    rule: str,
) -> torch.Tensor:
    """Draws per point for the next labels, decided before drawing (so the labels stay unbiased).

    ``F_pred_kT``: predicted F of each point (previous ensemble); ``se_kT``, ``n_drawn``: the
    standard error of its pooled label and the draws behind it (``n_drawn = 0``: no label yet).
    A populated point (prediction within ``populated_kT`` of the lowest) asks for the draws that
    bring its error to ``target_se_kT`` (the error falls as 1/√draws), or ``draws`` if it has no
    finite error yet; every other point, and a populated one already on target, gets
    ``min_draws``. Requests are capped at ``max_draws``. If they add up to more than ``budget``:

    * ``rule="proportional"``: the part above ``min_draws`` is scaled down to fit;
    * ``rule="new_first"``: new populated points get their ``draws`` first (scaled down only if
      they alone exceed the budget); the labelled ones share the rest in proportion to their
      requests, as with ``"proportional"``;
    * ``rule="equal_error"``: new populated points get their ``draws`` first, as with
      ``"new_first"``; the labelled ones then get the draws that bring their
      error to a common level ``t >= target_se_kT``, the lowest that fits, so the largest
      errors are served first and no point ends above ``t`` unless ``max_draws`` stops it.
    """
    if rule not in ALLOCATION_RULES:
        raise ValueError(f"unknown allocation rule {rule!r}; choose one of {ALLOCATION_RULES}")
    F = torch.as_tensor(F_pred_kT).to(torch.float64)
    se = torch.as_tensor(se_kT).to(torch.float64)
    n = torch.as_tensor(n_drawn).to(torch.float64)
    P = len(F)
    if not 1 <= min_draws <= draws <= max_draws:
        raise ValueError(
            f"need 1 <= min_draws <= draws <= max_draws; got {min_draws}, {draws}, {max_draws}"
        )
    if budget < min_draws * P:
        raise ValueError(f"a budget of {budget} draws cannot give {P} points min_draws {min_draws}")
    mass = populated(F, populated_kT)
    known = (n > 0) & torch.isfinite(se)

    def extra_for(level: float) -> torch.Tensor:
        """Draws above ``min_draws`` that bring each labelled populated point to ``level``."""
        need = torch.ceil(n * ((se / level) ** 2 - 1.0)).clamp(min=min_draws, max=max_draws)
        return torch.where(mass & known, need - min_draws, torch.zeros_like(need))

    def shrink(extra: torch.Tensor, room: float) -> torch.Tensor:
        """``extra`` scaled down by one factor (rounded down) if it adds up to more than ``room``."""
        total = float(extra.sum())
        return torch.floor(extra * (room / total)) if total > room else extra

    new = torch.where(mass & ~known, float(draws - min_draws), 0.0)
    room = float(budget - min_draws * P)
    if rule == "proportional":
        return (min_draws + shrink(extra_for(target_se_kT) + new, room)).to(torch.int64)
    if float(new.sum()) >= room:
        return (min_draws + shrink(new, room)).to(torch.int64)
    room -= float(new.sum())
    if rule == "new_first":
        return (min_draws + new + shrink(extra_for(target_se_kT), room)).to(torch.int64)
    lo = target_se_kT
    if float(extra_for(lo).sum()) > room:
        # the lowest common level whose draws fit: bisection on log t (the sum falls as t grows)
        hi = lo
        while float(extra_for(hi).sum()) > room:
            hi *= 2.0
        for _ in range(60):
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if float(extra_for(mid).sum()) > room else (lo, mid)
        lo = hi
    return (min_draws + new + extra_for(lo)).to(torch.int64)


# ---------------------------------------------------------------------------------------- ensemble
_ACTIVATIONS: dict[str, type[nn.Module]] = {"sigmoid": nn.Sigmoid, "silu": nn.SiLU, "tanh": nn.Tanh}
_INITS = ("xavier", "gaussian_uniform")
_SPLITS = ("fraction", "bagging")
_FORMAT = "cgflow.FreeEnergyEnsemble/1"
#: range of the per-member, per-layer standard deviations of the "gaussian_uniform" init
GAUSSIAN_UNIFORM_SIGMA = (0.1, 3.0)


def _mlp(n_in: int, hidden: Sequence[int], activation: str, dtype: torch.dtype) -> nn.Sequential:
    """An uninitialised MLP ``n_in -> hidden... -> 1`` (``skip_init``: no global RNG is used)."""
    layers: list[nn.Module] = []
    sizes = [n_in, *hidden, 1]
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.utils.skip_init(nn.Linear, a, b, dtype=dtype))
        if i < len(sizes) - 2:
            layers.append(_ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class FreeEnergyEnsemble:
    """``M`` MLPs ``s -> F(s)`` (kT) trained together: every layer is one batched matrix product.

    Inputs: a periodic CG coordinate (radians) enters as ``(cos s, sin s)``; a non-periodic one
    is standardised with the mean and population std of the labelled points of the last
    :meth:`fit` (recorded and saved). With ``input_bounds`` (one ``(lo, hi)`` per CG coordinate,
    used for the non-periodic ones) the standardisation is instead fixed to the mean and std of
    the uniform distribution on ``[lo, hi]``, so that clustered early data (the Müller–Brown start,
    std ≈ 0.08) do not blow up the inputs far from the data (method-spec §8, item 14).
    Every :meth:`fit` re-initialises all members from scratch.

    ``init="xavier"``: Xavier-uniform weights, zero biases. ``init="gaussian_uniform"``: for every
    member and layer, weights ~ N(0, σ_w²) and biases ~ N(0, σ_b²) with σ_w, σ_b ~ U(0.1, 3.0)
    (deliberate diversity between members).
    """

    def __init__(
        self,
        n_members: int,
        cg_periodic: Sequence[bool],
        hidden: Sequence[int] = (256, 128, 32),
        activation: str = "sigmoid",
        init: str = "xavier",
        dtype: torch.dtype = torch.float32,
        input_bounds: Sequence[tuple[float, float]] | None = None,
    ) -> None:
        if n_members < 2:
            raise ValueError(f"an ensemble needs n_members >= 2 (for its std); got {n_members}")
        if len(cg_periodic) == 0:
            raise ValueError("cg_periodic is empty: need at least one CG coordinate")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose from {list(_ACTIVATIONS)}")
        if init not in _INITS:
            raise ValueError(f"unknown init {init!r}; choose from {list(_INITS)}")
        if any(int(h) < 1 for h in hidden):
            raise ValueError(f"hidden sizes must be >= 1; got {tuple(hidden)}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64; got {dtype}")
        self.n_members = int(n_members)
        self.cg_periodic = tuple(bool(p) for p in cg_periodic)
        self.hidden = tuple(int(h) for h in hidden)
        self.activation = activation
        self.init = init
        self.dtype = dtype
        if input_bounds is not None:
            input_bounds = tuple((float(lo), float(hi)) for lo, hi in input_bounds)
            if len(input_bounds) != len(self.cg_periodic) or any(
                not hi > lo for lo, hi in input_bounds
            ):
                raise ValueError(
                    f"input_bounds needs one (lo, hi) with hi > lo per CG coordinate; got "
                    f"{input_bounds}"
                )
        self.input_bounds = input_bounds
        self.n_in = sum(2 if p else 1 for p in self.cg_periodic)
        self._act = _ACTIVATIONS[activation]()
        self._params: dict[str, torch.Tensor] | None = None
        n_cg = len(self.cg_periodic)
        #: standardisation of non-periodic inputs (entries of periodic coordinates unused)
        self.input_mean = torch.zeros(n_cg, dtype=torch.float64)
        self.input_std = torch.ones(n_cg, dtype=torch.float64)
        #: the label shift (median of the training labels, kT) added back to predictions
        self.shift_kT = 0.0

    # ------------------------------------------------------------------------------- internals
    @property
    def n_cg(self) -> int:
        return len(self.cg_periodic)

    @property
    def fitted(self) -> bool:
        return self._params is not None

    @property
    def params(self) -> dict[str, torch.Tensor]:
        """Stacked member parameters ``{name: [M, ...]}`` (read-only use)."""
        if self._params is None:
            raise RuntimeError("the ensemble has not been fitted (or loaded) yet")
        return self._params

    def _forward(
        self,
        params: dict[str, torch.Tensor],
        x: torch.Tensor,
        trace: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """Every member's output ``[M, B]`` for inputs ``x``: ``[M, B, n_in]`` (one batch per
        member) or ``[B, n_in]`` (shared). The stacked parameters are named as in :func:`_mlp`
        (``"0.weight"``, ``"0.bias"``, ``"2.weight"``, ...). ``trace`` (optional) receives each
        hidden layer's pre-activation and activation, for :meth:`_loss_and_grad`."""
        h = x if x.ndim == 3 else x.expand(self.n_members, -1, -1)
        n_layers = len(self.hidden) + 1
        for i in range(n_layers):
            w, b = params[f"{2 * i}.weight"], params[f"{2 * i}.bias"]
            h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
            if i < n_layers - 1:
                z, h = h, self._act(h)
                if trace is not None:
                    trace.append((z, h))
        return h.squeeze(-1)

    def _loss_and_grad(
        self,
        params: dict[str, torch.Tensor],
        x: torch.Tensor,
        y: torch.Tensor,
        w: torch.Tensor,
        huber_kT: float | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every member's weighted loss on its batch and the gradient of their sum.

        ``x [M, B, n_in]``, labels ``y [M, B]``, weights ``w [M, B]``; returns the loss ``[M]``
        (``sum(w · penalty(pred − y)) / sum(w)``, penalty r² or Huber) and the gradient
        ``[M, n_params]`` in the order of :attr:`params`. Written out by hand (batched matrix
        products through the layers): on these small networks autograd's bookkeeping costs more
        than the arithmetic (a test checks it against autograd).
        """
        trace: list[tuple[torch.Tensor, torch.Tensor]] = []
        r = self._forward(params, x, trace) - y
        w_sum = w.sum(dim=1, keepdim=True)
        loss = (w * _penalty(r, huber_kT)).sum(dim=1) / w_sum.squeeze(1)
        slope = r if huber_kT is None else torch.where(r.abs() < huber_kT, r, huber_kT * r.sign())
        g = ((2.0 * w / w_sum) * slope).unsqueeze(-1)  # [M, B, 1]: d(sum of losses)/d(output)
        inputs = [x] + [h for _, h in trace]  # each layer's input
        grads: list[torch.Tensor] = []
        for i in reversed(range(len(inputs))):
            grads.append(g.sum(dim=1))  # bias [M, out]
            grads.append(torch.bmm(g.mT, inputs[i]).flatten(1))  # weight [M, out, in]
            if i > 0:
                z, h = trace[i - 1]
                g = torch.bmm(g, params[f"{2 * i}.weight"]) * self._act_derivative(z, h)
        return loss, torch.cat(grads[::-1], dim=1)

    def _act_derivative(self, z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The activation's derivative at pre-activation ``z`` (``h``: its value there)."""
        if self.activation == "sigmoid":
            return h * (1.0 - h)
        if self.activation == "tanh":
            return 1.0 - h * h
        sig = torch.sigmoid(z)  # silu: h = z·σ(z)
        return sig * (1.0 + z * (1.0 - sig))

    def _check_s(self, s: torch.Tensor) -> torch.Tensor:
        s = torch.as_tensor(s)
        if s.ndim != 2 or s.shape[1] != self.n_cg:
            raise ValueError(
                f"s must have shape [P, {self.n_cg}] (one column per CG coordinate); "
                f"got {tuple(s.shape)}"
            )
        s = s.to(torch.float64)
        if not torch.isfinite(s).all():
            raise ValueError("s contains non-finite CG coordinates")
        return s

    def _features(self, s: torch.Tensor) -> torch.Tensor:
        """Network inputs ``[P, n_in]``: (cos, sin) of periodic, standardised non-periodic."""
        if not any(self.cg_periodic):  # one whole-tensor standardisation
            return ((s - self.input_mean) / self.input_std).to(self.dtype)
        cols = []
        for j, periodic in enumerate(self.cg_periodic):
            if periodic:
                cols += [torch.cos(s[:, j]), torch.sin(s[:, j])]
            else:
                cols.append((s[:, j] - self.input_mean[j]) / self.input_std[j])
        return torch.stack(cols, dim=1).to(self.dtype)

    def _initial_params(self, gen: torch.Generator) -> dict[str, torch.Tensor]:
        models = [
            _mlp(self.n_in, self.hidden, self.activation, self.dtype) for _ in range(self.n_members)
        ]
        lo, hi = GAUSSIAN_UNIFORM_SIGMA
        with torch.no_grad():
            for model in models:
                for layer in model:
                    if not isinstance(layer, nn.Linear):
                        continue
                    w, b = layer.weight, layer.bias
                    if self.init == "xavier":
                        bound = math.sqrt(6.0 / (w.shape[0] + w.shape[1]))
                        w.copy_((2.0 * torch.rand(w.shape, generator=gen) - 1.0) * bound)
                        b.zero_()
                    else:
                        sw, sb = (lo + (hi - lo) * torch.rand(2, generator=gen)).tolist()
                        w.copy_(sw * torch.randn(w.shape, generator=gen))
                        b.copy_(sb * torch.randn(b.shape, generator=gen))
        params, _ = stack_module_state(models)
        return {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}

    def _splits(
        self, n: int, split: str, train_fraction: float, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-member train and test indices ``[M, n_train]``, ``[M, n_test]``."""
        M = self.n_members
        n_train = min(n, max(1, round(train_fraction * n)))
        if split == "fraction":
            perm = torch.argsort(torch.rand(M, n, generator=gen), dim=1)
            return perm[:, :n_train], perm[:, n_train:]
        perm = torch.randperm(n, generator=gen)
        train, test = perm[:n_train], perm[n_train:]
        boot = torch.randint(n_train, (M, n_train), generator=gen)
        return train[boot], test.expand(M, -1)

    # ------------------------------------------------------------------------------------- API
    def fit(
        self,
        s: torch.Tensor,
        F: torch.Tensor,
        epochs: int,
        lr: float,
        batch_size: int,
        split: str = "fraction",
        train_fraction: float = 0.8,
        seed: int = 0,
        weights: torch.Tensor | None = None,
        patience: int | None = None,
        huber_kT: float | None = None,
    ) -> dict[str, Any]:
        """Re-initialise and train all members on labels ``F`` (kT) at CG points ``s [P, n_cg]``.

        ``split="fraction"``: every member its own random ``train_fraction`` / rest split;
        ``split="bagging"``: one shared split, every member a bootstrap resample of its train part.
        Non-finite labels are dropped (counted in ``n_dropped``). Adam (torch defaults besides
        ``lr``), MSE, shuffled batches of ``batch_size`` (``drop_last``; one batch of all
        training points if there are fewer). A member whose loss or gradient is non-finite on a
        batch (or whose gradient sum overflows) skips that batch (its parameters and Adam state
        stay unchanged).

        ``weights`` (one per label, > 0): the squared error of label i counts ``weights[i]`` times
        (normalised to mean 1 over the finite labels), in training and in the test loss.
        ``patience``: early stopping: every member keeps the parameters of its epoch with the
        lowest test loss (on its own held-out part of the labels) and stops once that has not
        improved for ``patience`` epochs; ``epochs`` is then the most it trains (``None``: every
        member trains ``epochs`` epochs and keeps its last parameters).
        ``huber_kT``: residuals beyond this many kT count linearly (Huber loss, scaled to equal
        the squared error below it), so a few far-off labels do not pull the fit; ``None``: MSE.

        Returns a history: ``train_loss`` / ``test_loss`` per epoch (mean over members of the
        epoch-mean batch MSE and of the test-set MSE, kT², NaN without test points),
        ``test_loss_members`` (per epoch, per member), ``n_dropped``, ``n_train``, ``n_test``,
        ``n_skipped`` (member-batches skipped), ``best_epoch`` (per member, 1-based, the epoch
        whose parameters it keeps), ``shift_kT`` and ``seconds``.
        """
        if split not in _SPLITS:
            raise ValueError(f"unknown split {split!r}; choose from {list(_SPLITS)}")
        if not 0.0 < train_fraction <= 1.0:
            raise ValueError(f"train_fraction must be in (0, 1]; got {train_fraction}")
        if epochs < 1 or batch_size < 1 or not lr > 0:
            raise ValueError(
                f"need epochs >= 1, batch_size >= 1, lr > 0; got {epochs}, {batch_size}, {lr}"
            )
        s = torch.as_tensor(s)
        F = torch.as_tensor(F).to(torch.float64)
        if F.ndim != 1 or s.ndim != 2 or s.shape[0] != F.shape[0]:
            raise ValueError(
                f"need s [P, n_cg] and F [P] with the same P; got {tuple(s.shape)} and "
                f"{tuple(F.shape)}"
            )
        s = self._check_s(s)
        if weights is None:
            weights = torch.ones_like(F)
        weights = torch.as_tensor(weights).to(torch.float64)
        if weights.shape != F.shape:
            raise ValueError(f"need one weight per label; got {tuple(weights.shape)} for {len(F)}")
        if huber_kT is not None and not huber_kT > 0:
            raise ValueError(f"huber_kT must be > 0 (or None); got {huber_kT}")
        if patience is not None and patience < 1:
            raise ValueError(f"patience must be >= 1 (or None); got {patience}")
        keep = torch.isfinite(F)
        n_dropped = int((~keep).sum())
        if not keep.any():
            raise ValueError(f"all {F.shape[0]} labels are non-finite: nothing to fit")
        s, F, weights = s[keep], F[keep], weights[keep]
        if not (torch.isfinite(weights).all() and (weights > 0).all()):
            raise ValueError("label weights must be finite and > 0")
        weights = weights / weights.mean()
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(int(seed))

        if self.input_bounds is None:
            self.input_mean = s.mean(dim=0)
            std = s.std(dim=0, correction=0)
        else:
            b = torch.tensor(self.input_bounds, dtype=torch.float64)
            self.input_mean = b.mean(dim=1)
            std = (b[:, 1] - b[:, 0]) / math.sqrt(12.0)
        self.input_std = torch.where(std > 0, std, torch.ones_like(std))
        self.shift_kT = float(F.median())
        x = self._features(s)
        y = (F - self.shift_kT).to(self.dtype)
        wt = weights.to(self.dtype)

        init = self._initial_params(gen)
        names = list(init)
        shapes = [v.shape[1:] for v in init.values()]
        sizes = [v[0].numel() for v in init.values()]
        M = self.n_members
        # one [M, n_params] tensor: gradient checks, Adam and early stopping are a few
        # whole-tensor operations per batch instead of a few per parameter (the members'
        # parameters are views of it)
        flat = torch.cat([v.detach().reshape(M, -1) for v in init.values()], dim=1)

        def unflatten(vector: torch.Tensor) -> dict[str, torch.Tensor]:
            parts = vector.split(sizes, dim=1)
            return {k: p.view(M, *shape) for k, p, shape in zip(names, parts, shapes, strict=True)}

        train_idx, test_idx = self._splits(s.shape[0], split, train_fraction, gen)
        n_train, n_test = train_idx.shape[1], test_idx.shape[1]
        bsz = min(batch_size, n_train)
        n_batches = n_train // bsz

        adam = _VectorAdam(flat, lr=lr)
        params = unflatten(flat)  # views: Adam's in-place steps show through
        history: dict[str, Any] = {
            "train_loss": [],
            "test_loss": [],
            "test_loss_members": [],
            "n_dropped": n_dropped,
            "n_train": n_train,
            "n_test": n_test,
            "n_skipped": 0,
            "shift_kT": self.shift_kT,
        }
        stopping = patience is not None and n_test > 0
        best_loss = torch.full((M,), math.inf, dtype=torch.float64)
        best_epoch = torch.full((M,), epochs, dtype=torch.int64)
        best = flat.detach().clone() if stopping else None
        x_test, y_test, w_test = x[test_idx], y[test_idx], wt[test_idx]
        for epoch in range(epochs):
            order = train_idx.gather(1, torch.argsort(torch.rand(M, n_train, generator=gen), dim=1))
            # the epoch's batches in order, gathered once (a batch is then a view)
            x_ep, y_ep, w_ep = x[order], y[order], wt[order]
            losses = torch.zeros(n_batches, M, dtype=self.dtype)
            oks = torch.zeros(n_batches, M, dtype=torch.bool)
            for b in range(n_batches):
                rows = slice(b * bsz, (b + 1) * bsz)
                loss, grad = self._loss_and_grad(
                    params, x_ep[:, rows], y_ep[:, rows], w_ep[:, rows], huber_kT
                )
                # non-finite if the loss or any gradient entry is (or if their sum overflows)
                ok = torch.isfinite(grad.sum(dim=1) + loss)
                adam.step(grad, ok)
                losses[b], oks[b] = loss, ok
            loss_sum = torch.where(oks, losses.to(torch.float64), 0.0).sum(dim=0)
            loss_count = oks.sum(dim=0).to(torch.float64)
            history["n_skipped"] += int(n_batches * M - loss_count.sum())
            history["train_loss"].append(float((loss_sum / loss_count).mean()))
            if n_test > 0:
                with torch.no_grad():
                    pred = self._forward(params, x_test)
                    test = (w_test * _penalty(pred - y_test, huber_kT)).sum(dim=1) / w_test.sum(
                        dim=1
                    )
                    test = test.to(torch.float64)
                history["test_loss_members"].append(test.tolist())
                history["test_loss"].append(float(test.mean()))
            else:
                history["test_loss_members"].append([math.nan] * M)
                history["test_loss"].append(math.nan)
            if stopping:
                better = test < best_loss
                best_loss = torch.where(better, test, best_loss)
                best_epoch = torch.where(better, epoch + 1, best_epoch)
                with torch.no_grad():
                    best = torch.where(better.unsqueeze(1), flat, best)
                if bool((epoch + 1 - best_epoch >= patience).all()):
                    break
        final = best if stopping else flat
        self._params = {k: v.clone().requires_grad_(True) for k, v in unflatten(final).items()}
        history["best_epoch"] = best_epoch.tolist()
        history["seconds"] = time.perf_counter() - t0
        return history

    @torch.no_grad()
    def predict_members(self, s: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
        """Every member's F (kT) at ``s [P, n_cg]``: ``[M, P]`` float64."""
        params = self.params
        s = self._check_s(s)
        if s.shape[0] <= chunk:
            out = self._forward(params, self._features(s))
        else:
            out = torch.cat([self._forward(params, self._features(p)) for p in s.split(chunk)], 1)
        return out.to(torch.float64) + self.shift_kT

    def predict(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Ensemble mean F̄ (kT) and unbiased std over members σ (kT) at ``s``; float64 ``[P]``."""
        members = self.predict_members(s)
        return members.mean(dim=0), members.std(dim=0, correction=1)

    __call__ = predict

    def save(self, path: str | Path) -> Path:
        """Write configuration, parameters, input standardisation and label shift (torch.save)."""
        path = Path(path)
        state = {
            "format": _FORMAT,
            "config": {
                "n_members": self.n_members,
                "cg_periodic": list(self.cg_periodic),
                "hidden": list(self.hidden),
                "activation": self.activation,
                "init": self.init,
                "dtype": str(self.dtype).removeprefix("torch."),
                "input_bounds": None
                if self.input_bounds is None
                else [list(b) for b in self.input_bounds],
            },
            "params": None
            if self._params is None
            else {k: v.detach() for k, v in self._params.items()},
            "input_mean": self.input_mean,
            "input_std": self.input_std,
            "shift_kT": self.shift_kT,
        }
        torch.save(state, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> FreeEnergyEnsemble:
        """Rebuild an ensemble written by :meth:`save`."""
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a saved FreeEnergyEnsemble ({_FORMAT})")
        cfg = dict(state["config"])
        cfg["dtype"] = getattr(torch, cfg["dtype"])
        ens = cls(**cfg)
        if state["params"] is not None:
            ens._params = {k: v.clone().requires_grad_(True) for k, v in state["params"].items()}
        ens.input_mean = state["input_mean"]
        ens.input_std = state["input_std"]
        ens.shift_kT = float(state["shift_kT"])
        return ens


def _penalty(r: torch.Tensor, huber_kT: float | None) -> torch.Tensor:
    """The regression penalty of residuals ``r``: r², or Huber (r² within ``huber_kT``, linear
    beyond, continuous with its slope)."""
    if huber_kT is None:
        return r**2
    a = r.abs()
    return torch.where(a < huber_kT, r**2, huber_kT * (2.0 * a - huber_kT))


class _VectorAdam:
    """Adam over the members' flattened parameters ``[M, n_params]`` with per-member steps, so a
    member can skip a batch.

    Same update as ``torch.optim.Adam`` (betas 0.9/0.999, eps 1e-8, no weight decay), applied only
    to the members flagged ``ok``; skipped members keep their parameters, moments and step count.
    """

    def __init__(
        self,
        param: torch.Tensor,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self.param = param
        self.lr, self.betas, self.eps = float(lr), betas, float(eps)
        #: the members' common step count, until a member skips a batch; then ``t`` per member
        self._steps: int | None = 0
        self.t = torch.zeros(param.shape[0], dtype=torch.float64)
        self.m = torch.zeros_like(param)
        self.v = torch.zeros_like(param)

    @torch.no_grad()
    def step(self, grad: torch.Tensor, ok: torch.Tensor) -> None:
        b1, b2 = self.betas
        p, m, v = self.param, self.m, self.v
        if bool(ok.all()) and self._steps is not None:
            # the usual case, every member at the same step count: in place, scalar corrections
            self._steps += 1
            m.mul_(b1).add_(grad, alpha=1.0 - b1)
            v.mul_(b2).addcmul_(grad, grad, value=1.0 - b2)
            denom = v.sqrt().div_(math.sqrt(1.0 - b2**self._steps)).add_(self.eps)
            p.addcdiv_(m, denom, value=-self.lr / (1.0 - b1**self._steps))
            return
        if self._steps is not None:  # step counts differ from now on
            self.t.fill_(self._steps)
            self._steps = None
        self.t += ok.to(self.t.dtype)
        c1 = (1.0 - b1**self.t).to(p.dtype).unsqueeze(1)
        c2 = (1.0 - b2**self.t).to(p.dtype).unsqueeze(1)
        okb = ok.unsqueeze(1)
        g = torch.where(okb, grad, torch.zeros_like(p))
        m.copy_(torch.where(okb, b1 * m + (1.0 - b1) * g, m))
        v.copy_(torch.where(okb, b2 * v + (1.0 - b2) * g * g, v))
        denom = (v / c2).sqrt_().add_(self.eps)
        p.sub_(torch.where(okb, (m / c1).div_(denom).mul_(self.lr), torch.zeros_like(p)))


# ------------------------------------------------------------------------------ fitting a campaign
def cap_labels(f_kT: torch.Tensor, cap_kT: float | None) -> torch.Tensor:
    """Labels above ``min + cap_kT`` set to ``min + cap_kT`` (unchanged with ``cap_kT=None``)."""
    if cap_kT is None or f_kT.numel() == 0:
        return f_kT
    if not cap_kT > 0:
        raise ValueError(f"label_cap_kT must be > 0, got {cap_kT}")
    return torch.minimum(f_kT, f_kT.min() + cap_kT)


def debiased_labels(f_kT: torch.Tensor, se_kT: torch.Tensor) -> torch.Tensor:
    """Labels ``F − se²/2`` (kT): ``−log`` of a mean of importance weights overestimates F by
    about half the mean's relative variance, which ``se²`` estimates (delta method, second
    order); labels without a finite error stay as they are."""
    f = torch.as_tensor(f_kT).to(torch.float64)
    se = torch.as_tensor(se_kT).to(torch.float64)
    return f - torch.where(torch.isfinite(se), 0.5 * se**2, torch.zeros_like(se))


def label_weights(se_kT: torch.Tensor, weighting: str, se_floor_kT: float) -> torch.Tensor:
    """Per-label loss weights: ones (``"uniform"``), or ``1 / (se² + se_floor²)``
    (``"inverse_variance"``; a label without a finite standard error gets the weight of an
    error of 1 kT)."""
    se = torch.as_tensor(se_kT).to(torch.float64)
    if weighting == "uniform":
        return torch.ones_like(se)
    if weighting != "inverse_variance":
        raise ValueError(f"unknown weighting {weighting!r}; choose uniform or inverse_variance")
    if not se_floor_kT > 0:
        raise ValueError(f"se_floor_kT must be > 0, got {se_floor_kT}")
    se = torch.where(torch.isfinite(se), se, torch.ones_like(se))
    return 1.0 / (se**2 + se_floor_kT**2)


def fit_ensemble(
    settings: dict[str, Any],
    periodic: list[bool],
    s: torch.Tensor,
    f_kT: torch.Tensor,
    seed: int,
    se_kT: torch.Tensor | None = None,
) -> FreeEnergyEnsemble:
    """A new ensemble fitted to labels ``f_kT`` (standard errors ``se_kT``) at CG points ``s``;
    ``settings`` is the schema's ``ensemble`` section (every key given)."""
    e = settings
    ensemble = FreeEnergyEnsemble(
        e["n_members"],
        periodic,
        hidden=tuple(e["hidden"]),
        activation=e["activation"],
        init=e["init"],
    )
    f_kT = torch.as_tensor(f_kT)
    if se_kT is None:
        for key, plain in (("weighting", "uniform"), ("debias", False)):
            if e[key] != plain:
                raise ValueError(f"ensemble.{key} {e[key]!r} needs the labels' se_kT")
        se_kT = torch.zeros_like(f_kT)
    if e["debias"]:
        f_kT = debiased_labels(f_kT, se_kT)
    ensemble.fit(
        s,
        cap_labels(f_kT, e["label_cap_kT"]),
        epochs=e["epochs"],
        lr=e["lr"],
        batch_size=e["batch_size"],
        split=e["split"],
        train_fraction=e["train_fraction"],
        seed=seed,
        weights=label_weights(se_kT, e["weighting"], e["se_floor_kT"]),
        patience=e["patience"],
        huber_kT=e["huber_kT"],
    )
    return ensemble
