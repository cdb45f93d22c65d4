"""Training the conditional flow: by example (maximum likelihood) and by energy (reverse KL).

Reverse KL at fixed CG points s: draw x_FG ~ q(.|s), assemble the internal vector, drop draws
that fail the chirality filter (they are **not** energy-evaluated), evaluate the reduced energy
and forces with any backend (an autograd function feeds the forces back), and minimise the
robust per-sample loss ``log q(x_FG|s) − log p̃(x)`` (the k largest and the non-finite losses of
each batch are dropped and counted), with gradient-norm clipping and a linear warm-up.

Counting: every backend passes through :func:`cgflow.energy.counting.counted`, so each energy
evaluation is counted (``training`` after the chirality filter, ``labels`` for PMF labels);
``training_draws`` records the draws before the filter (not part of N).

The settings dataclasses have no defaults: the campaign's schema (``cgflow/config.schema.yaml``)
is the one source of them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from .energy.base import EnergyBackend
from .energy.counting import EvaluationCounter, counted
from .flows import assemble
from .systems import System


class BackendEnergy(torch.autograd.Function):
    """U(x) from any backend, with ``dU/dx = −F`` in the backward pass."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, backend: EnergyBackend) -> torch.Tensor:  # type: ignore[override]
        u, f = backend.energies_and_forces(x.detach())
        u = torch.as_tensor(u).to(device=x.device, dtype=x.dtype)
        f = torch.as_tensor(f).to(device=x.device, dtype=x.dtype).reshape(x.shape)
        ctx.save_for_backward(f)
        return u

    @staticmethod
    def backward(ctx: Any, grad_u: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (f,) = ctx.saved_tensors
        grad = -f * grad_u.reshape(-1, *([1] * (f.ndim - 1)))
        # rows with non-finite energies carry no loss; keep their NaN forces out of the sum
        return torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0), None


def soft_cut(u_kT: torch.Tensor, cut_kT: float | None) -> torch.Tensor:
    """Reduced energies continued logarithmically above ``cut_kT``: ``cut + log(1 + u − cut)``.

    Identity below the cut (and with ``cut_kT=None``); above it the gradient is ``1/(1 + u − cut)``,
    so a few clashing draws (``u`` of 1e6 kT) cannot dominate a training batch.
    """
    if cut_kT is None:
        return u_kT
    excess = torch.clamp(u_kT - cut_kT, min=0.0)
    return u_kT - excess + torch.log1p(excess)


def log_target_from_internal(
    system: System, z: torch.Tensor, backend: EnergyBackend, energy_cut_kT: float | None = None
) -> torch.Tensor:
    """``log p̃(z) = −beta U(x(z)) + log|det dx/dz|`` with energies from ``backend``.

    With ``energy_cut_kT`` the reduced energy passes through :func:`soft_cut` (training only;
    PMF labels always use the exact energies).
    """
    x, log_det = system.to_cartesian(z)
    u = BackendEnergy.apply(x, backend)
    return -soft_cut(system.beta * u, energy_cut_kT) + log_det


@dataclass
class Draws:
    """Flow draws at CG points: internal vectors, log q, and which were kept by the filter."""

    s: torch.Tensor  #: [n, n_cg]
    z: torch.Tensor  #: [n, n_internal]
    log_q: torch.Tensor  #: [n]
    kept: torch.Tensor  #: [n] bool (chirality filter and finite coordinates)


def draw(
    flow: torch.nn.Module, system: System, s: torch.Tensor, generator: torch.Generator | None = None
) -> Draws:
    """Sample ``x_FG ~ q(.|s)`` (differentiably) and apply the system's chirality filter."""
    x_fg, log_q = flow.sample(s, generator=generator)
    z = assemble(system, s, x_fg)
    with torch.no_grad():
        x, _ = system.to_cartesian(z.detach())
        finite = torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
        kept = finite & system.is_l(x)
    return Draws(s=s, z=z, log_q=log_q, kept=kept)


def robust_mean(losses: torch.Tensor, skip_top_k: int) -> tuple[torch.Tensor, int]:
    """Mean of the finite losses after dropping the ``skip_top_k`` largest; count dropped."""
    finite = torch.isfinite(losses)
    kept = losses[finite]
    dropped = int((~finite).sum())
    if skip_top_k > 0 and kept.numel() > skip_top_k:
        kept = torch.sort(kept).values[:-skip_top_k]
        dropped += skip_top_k
    if kept.numel() == 0:
        return losses.new_tensor(float("nan")), dropped
    return kept.mean(), dropped


# --------------------------------------------------------------------------------- by example
@dataclass
class ExampleConfig:
    """Training by example (schema section ``example``) and its seed."""

    epochs: int
    lr: float
    batch_size: int
    seed: int


def train_by_example(
    flow: torch.nn.Module,
    s: torch.Tensor,
    x_fg: torch.Tensor,
    config: ExampleConfig,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, list[float]]:
    """Maximum likelihood: minimise ``−mean log q(x_FG | s)`` over the frames (shuffled)."""
    if s.shape[0] != x_fg.shape[0]:
        raise ValueError(f"{s.shape[0]} CG values but {x_fg.shape[0]} fine-grained frames")
    opt = optimizer or torch.optim.Adam(flow.parameters(), lr=config.lr)
    gen = torch.Generator().manual_seed(config.seed)
    n = s.shape[0]
    bs = min(config.batch_size, n)
    losses = []
    for _ in range(config.epochs):
        perm = torch.randperm(n, generator=gen)
        total, batches = 0.0, 0
        for start in range(0, n - bs + 1, bs):
            idx = perm[start : start + bs]
            loss = -flow.log_prob(x_fg[idx], s[idx]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach())
            batches += 1
        losses.append(total / max(batches, 1))
    return {"nll": losses}


# ---------------------------------------------------------------------------------- by energy
@dataclass
class EnergyConfig:
    """Reverse-KL training (schema ``energy_training.first`` / ``.later``) and its seed."""

    epochs: int
    lr: float
    batch_size: int  #: rows per step; each row is one draw at one CG point
    rows_per_point: int  #: rows per CG point per epoch
    #: old-point rows per epoch, as a fraction of the new-point rows; ``"all"``: every old point
    #: ``rows_per_point`` times
    old_fraction: float | str
    warmup_epochs: int  #: linear ramp (e+1)/W of the lr in each call
    clip_early: float
    clip_late: float
    clip_switch_epoch: int
    skip_top_k: int
    energy_cut_kT: float | None  #: soft cut of reduced energies in the loss (None = off)
    seed: int

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or self.rows_per_point < 1:
            raise ValueError("epochs must be >= 0, batch_size and rows_per_point >= 1")
        if self.old_fraction != "all" and not (
            isinstance(self.old_fraction, int | float) and self.old_fraction >= 0
        ):
            raise ValueError(f"old_fraction must be >= 0 or 'all'; got {self.old_fraction!r}")

    def old_rows(self, n_new_rows: int, n_old_points: int) -> int:
        """Rows at old points per epoch, given the rows at new points and the old points."""
        every = n_old_points * self.rows_per_point
        return (
            every if self.old_fraction == "all" else min(int(self.old_fraction * n_new_rows), every)
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lr_factor(self, epoch: int) -> float:
        """Learning-rate factor of ``epoch`` (0-based): linear warm-up, then constant."""
        w = self.warmup_epochs
        return (epoch + 1) / w if w and epoch < w else 1.0


@dataclass
class EnergyHistory:
    loss: list[float] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    rejected_draws: list[int] = field(default_factory=list)
    skipped_batches: list[int] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)


def _rows(
    points: torch.Tensor,
    n_rows: int,
    gen: torch.Generator,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """``n_rows`` CG rows drawn from ``points``: each point in turn (shuffled), or with
    ``weights`` drawn with replacement with probability proportional to them."""
    if n_rows <= 0 or points.shape[0] == 0:
        return points[:0]
    if weights is not None:
        idx = torch.multinomial(weights.to(torch.float64), n_rows, replacement=True, generator=gen)
        return points[idx]
    idx = torch.randperm(points.shape[0], generator=gen).repeat(math.ceil(n_rows / points.shape[0]))
    return points[idx[:n_rows]]


def priority_weights(gap_nat: torch.Tensor, cap_nat: float, power: float) -> torch.Tensor:
    """Training weight of each point from its log-weight gap (:func:`cgflow.free_energy.log_weight_gap`,
    nats): ``min(gap, cap)^power``; a missing (NaN) gap counts as the median of the others, an
    infinite one as the cap. The gap is large where the flow is poor at that point (its draws'
    typical weight far below their mean), whatever the point's free energy."""
    g = torch.as_tensor(gap_nat, dtype=torch.float64).clone()
    if not cap_nat > 0 or not power >= 0:
        raise ValueError(f"need cap_nat > 0 and power >= 0; got {cap_nat}, {power}")
    known = ~torch.isnan(g)
    g[~known] = float(g[known].median()) if bool(known.any()) else 1.0
    return g.clamp(min=0.0, max=cap_nat) ** power


def reverse_kl_losses(
    flow: torch.nn.Module,
    system: System,
    backend: EnergyBackend,
    s: torch.Tensor,
    counter: EvaluationCounter,
    generator: torch.Generator | None = None,
    energy_cut_kT: float | None = None,
) -> tuple[torch.Tensor, int]:
    """Per-row losses ``log q − log p̃`` (NaN for rejected draws); energies counted as
    ``training``, draws before the filter as ``training_draws``."""
    backend = counted(backend, counter, "training")
    d = draw(flow, system, s, generator)
    losses = torch.full_like(d.log_q, float("nan"))
    n_kept = int(d.kept.sum())
    counter.add("training_draws", s.shape[0])
    if n_kept:
        log_p = log_target_from_internal(system, d.z[d.kept], backend, energy_cut_kT)
        losses = losses.index_put((d.kept,), d.log_q[d.kept] - log_p.to(d.log_q.dtype))
    return losses, s.shape[0] - n_kept


def train_by_energy(
    flow: torch.nn.Module,
    system: System,
    backend: EnergyBackend,
    new_points: torch.Tensor,
    config: EnergyConfig,
    counter: EvaluationCounter,
    old_points: torch.Tensor | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    old_weights: torch.Tensor | None = None,
) -> EnergyHistory:
    """Reverse-KL epochs on ``new_points`` plus a fraction of ``old_points`` per epoch.

    Every epoch draws ``rows_per_point`` rows per new point and ``old_fraction`` times as many
    rows from the old points (``"all"``: ``rows_per_point`` rows per old point); with
    ``old_weights`` (one per old point, >= 0, see :func:`priority_weights`) the old rows are
    drawn with probability proportional to them. Batches whose robust loss is non-finite are
    skipped (counted).
    """
    dtype = next(flow.parameters()).dtype
    new_points = torch.as_tensor(new_points, dtype=dtype)
    old_points = (
        torch.as_tensor(old_points, dtype=dtype) if old_points is not None else new_points[:0]
    )
    opt = optimizer or torch.optim.Adam(flow.parameters(), lr=config.lr)
    params = list(flow.parameters())
    gen = torch.Generator().manual_seed(config.seed)
    hist = EnergyHistory()
    n_new = new_points.shape[0] * config.rows_per_point
    n_old = config.old_rows(n_new, old_points.shape[0])
    if old_weights is not None:
        old_weights = torch.as_tensor(old_weights, dtype=torch.float64)
        if old_weights.shape != (old_points.shape[0],):
            raise ValueError(
                f"old_weights has shape {tuple(old_weights.shape)}; need one per old point "
                f"({old_points.shape[0]})"
            )
        if not bool(torch.isfinite(old_weights).all() and (old_weights >= 0).all()):
            raise ValueError("old_weights must be finite and >= 0")
        if old_points.shape[0] and not float(old_weights.sum()) > 0:
            old_weights = None  # nothing to prefer: every old point alike
    for epoch in range(config.epochs):
        factor = config.lr_factor(epoch)
        for group in opt.param_groups:
            group["lr"] = config.lr * factor
        clip = config.clip_early if epoch < config.clip_switch_epoch else config.clip_late
        rows = torch.cat(
            [_rows(new_points, n_new, gen), _rows(old_points, n_old, gen, old_weights)]
        )
        rows = rows[torch.randperm(rows.shape[0], generator=gen)]
        bs = min(config.batch_size, rows.shape[0])
        total, n_batches, dropped, rejected, skipped = 0.0, 0, 0, 0, 0
        for start in range(0, rows.shape[0] - bs + 1, bs):
            losses, n_rej = reverse_kl_losses(
                flow,
                system,
                backend,
                rows[start : start + bs],
                counter,
                generator=gen,
                energy_cut_kT=config.energy_cut_kT,
            )
            loss, n_drop = robust_mean(losses, config.skip_top_k)
            dropped += n_drop
            rejected += n_rej
            if not torch.isfinite(loss):
                skipped += 1
                continue
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
            opt.step()
            total += float(loss.detach())
            n_batches += 1
        hist.loss.append(total / max(n_batches, 1))
        hist.dropped.append(dropped)
        hist.rejected_draws.append(rejected)
        hist.skipped_batches.append(skipped)
        hist.lr.append(config.lr * factor)
    return hist


# ------------------------------------------------------------------------------ label draws
def label_draws(
    flow: torch.nn.Module,
    system: System,
    points: torch.Tensor,
    draws: int,
    generator: torch.Generator,
    chunk: int = 4096,
) -> Draws:
    """``draws`` flow draws per point (rows point-major), without gradients; ``z`` and
    ``log_q`` in float64 (the sample stage's content)."""
    dtype = next(flow.parameters()).dtype
    s = torch.as_tensor(points, dtype=dtype).repeat_interleave(draws, dim=0)
    z, log_q, kept = [], [], []
    with torch.no_grad():
        for start in range(0, len(s), chunk):
            d = draw(flow, system, s[start : start + chunk], generator)
            z.append(d.z.to(torch.float64))
            log_q.append(d.log_q.to(torch.float64))
            kept.append(d.kept)
    if not z:
        empty = torch.zeros(0, dtype=torch.float64)
        return Draws(s, torch.zeros(0, system.n_internal, dtype=torch.float64), empty, empty.bool())
    return Draws(s, torch.cat(z), torch.cat(log_q), torch.cat(kept))


def label_log_target(
    system: System, z: torch.Tensor, kept: torch.Tensor, backend: EnergyBackend
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p̃, u_kT)`` of the kept draws ``z`` (NaN elsewhere), exact energies from
    ``backend`` (counted as ``labels``) — the energy stage's content."""
    log_p = torch.full((len(z),), float("nan"), dtype=torch.float64)
    u_kT = torch.full((len(z),), float("nan"), dtype=torch.float64)
    if int(kept.sum()):
        x, log_det = system.to_cartesian(z[kept])
        u = backend.energies(x)
        u = u.detach().cpu() if hasattr(u, "detach") else np.asarray(u)
        u = torch.as_tensor(np.asarray(u), dtype=torch.float64)
        u_kT[kept] = system.beta * u
        log_p[kept] = -system.beta * u + log_det.to(torch.float64)
    return log_p, u_kT


def log_weights(log_p: torch.Tensor, log_q: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Importance log-weights ``log p̃ − log q``; rejected or non-finite draws get ``−inf``."""
    lw = torch.as_tensor(log_p) - torch.as_tensor(log_q)
    return torch.where(
        torch.as_tensor(kept) & torch.isfinite(lw), lw, torch.full_like(lw, -math.inf)
    )


def label_log_weights(
    flow: torch.nn.Module,
    system: System,
    backend: EnergyBackend,
    points: torch.Tensor,
    draws: int,
    counter: EvaluationCounter,
    seed: int = 0,
) -> torch.Tensor:
    """``log w`` ``[P, draws]`` for PMF labels in one process: the sample and energy stages'
    functions (:func:`label_draws`, :func:`label_log_target`, :func:`log_weights`) in a row."""
    d = label_draws(flow, system, points, draws, torch.Generator().manual_seed(seed))
    log_p, _ = label_log_target(system, d.z, d.kept, counted(backend, counter, "labels"))
    return log_weights(log_p, d.log_q, d.kept).reshape(-1, draws)


def cg_values(
    system: System, frames: np.ndarray | torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split frames into CG values and fine-grained internal coordinates (for by-example)."""
    z = system.to_internal(torch.as_tensor(np.asarray(frames), dtype=dtype))
    cg = list(system.cg_indices)
    fg = list(system.fg_indices)
    return z[:, cg], z[:, fg]
