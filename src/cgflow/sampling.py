"""Choosing new CG points: MC walkers on the ensemble, diversity selection, spreading, splits.

Method-spec §5.5 with flaws 7 and 8 of §8 fixed:

* :func:`cg_walkers` runs parallel Metropolis walkers on the ensemble mean ``F̄(s)`` (kT) and
  freezes each walker where the ensemble std ``σ(s)`` first exceeds a threshold; it returns the
  *earliest* stopped walkers (by step), and reports running out of steps as ``exhausted`` (a
  convergence signal) instead of failing;
* :func:`farthest_point_selection` is a greedy max-min selection with minimum-image distances for
  periodic coordinates, optionally staying away from points already in the dataset;
* :func:`spread` scatters new CG points around each selected centre;
* :func:`split_points` makes random train/held-out splits.

Coordinates: ``periodic[j]`` flags a periodic coordinate with period ``hi - lo`` of
``bounds[j] = (lo, hi)`` (radians for dihedrals), wrapped into ``[lo, hi)``. Without ``bounds``,
periodic coordinates use ``[-π, π)`` and non-periodic ones are unbounded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "WalkerResult",
    "cg_walkers",
    "farthest_point_selection",
    "periodic_difference",
    "split_points",
    "spread",
    "wrap",
]

Bounds = Sequence[tuple[float, float]] | None
Predictor = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
_SPREAD_KINDS = ("disk", "gaussian", "uniform")


# -------------------------------------------------------------------------------------- geometry
def _geometry(
    periodic: Sequence[bool], bounds: Bounds
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Periodic mask ``[d]`` and float64 lower/upper bounds ``[d]`` (±inf where unbounded)."""
    per = torch.tensor([bool(p) for p in periodic], dtype=torch.bool)
    d = per.shape[0]
    if d == 0:
        raise ValueError("periodic is empty: need at least one CG coordinate")
    if bounds is None:
        inf = torch.full((d,), math.inf, dtype=torch.float64)
        pi = torch.full((d,), math.pi, dtype=torch.float64)
        return per, torch.where(per, -pi, -inf), torch.where(per, pi, inf)
    if len(bounds) != d:
        raise ValueError(f"{d} periodic flags but {len(bounds)} bounds")
    b = torch.tensor([tuple(map(float, x)) for x in bounds], dtype=torch.float64).reshape(d, 2)
    lo, hi = b[:, 0], b[:, 1]
    if not (hi > lo).all():
        raise ValueError(f"every bound needs hi > lo; got {b.tolist()}")
    if not (torch.isfinite(lo[per]).all() and torch.isfinite(hi[per]).all()):
        raise ValueError("periodic coordinates need finite bounds (the period is hi - lo)")
    return per, lo, hi


def _check_points(x: torch.Tensor, d: int, what: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.ndim != 2 or x.shape[1] != d:
        raise ValueError(f"{what} must have shape [n, {d}]; got {tuple(x.shape)}")
    x = x.to(torch.float64, copy=True)  # a copy: callers' tensors are never modified
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} contains non-finite coordinates")
    return x


def wrap(x: torch.Tensor, periodic: Sequence[bool], bounds: Bounds = None) -> torch.Tensor:
    """Wrap the periodic columns of ``x [n, d]`` into ``[lo, hi)``; other columns unchanged."""
    per, lo, hi = _geometry(periodic, bounds)
    return _wrap(torch.as_tensor(x).to(torch.float64), per, lo, hi)


def _wrap(x: torch.Tensor, per: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    if not per.any():
        return x
    period = torch.where(per, hi - lo, torch.ones_like(lo))
    base = torch.where(per, lo, torch.zeros_like(lo))
    w = base + torch.remainder(x - base, period)
    # remainder can round up to exactly one period for inputs just below a multiple of it
    w = torch.where(w >= base + period, w - period, w)
    return torch.where(per, w, x)


def periodic_difference(
    a: torch.Tensor, b: torch.Tensor, periodic: Sequence[bool], bounds: Bounds = None
) -> torch.Tensor:
    """Minimum-image difference ``a - b`` (broadcasting), per coordinate."""
    per, lo, hi = _geometry(periodic, bounds)
    return _difference(torch.as_tensor(a), torch.as_tensor(b), per, lo, hi)


def _difference(
    a: torch.Tensor, b: torch.Tensor, per: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor
) -> torch.Tensor:
    diff = a.to(torch.float64) - b.to(torch.float64)
    if not per.any():
        return diff
    period = torch.where(per, hi - lo, torch.ones_like(lo))
    image = diff - period * torch.round(diff / period)
    return torch.where(per, image, diff)


# ---------------------------------------------------------------------------------- MC walkers
@dataclass(frozen=True)
class WalkerResult:
    """Stopped walkers of :func:`cg_walkers`, earliest first."""

    #: CG points where the walkers stopped, ``[n, n_cg]`` float64 (``n <= n_wanted``)
    points: torch.Tensor
    #: step at which each returned walker stopped (1-based), int64 ``[n]``
    stop_steps: torch.Tensor
    #: index of each returned walker, int64 ``[n]``
    walker_index: torch.Tensor
    #: MC steps performed
    steps_used: int
    #: True if ``max_steps`` passed before ``n_wanted`` walkers stopped (convergence signal)
    exhausted: bool
    #: CG points evaluated by the ensemble (walker starts plus in-bounds proposals)
    n_evaluations: int
    #: accepted / attempted proposals of the running walkers
    acceptance: float


def cg_walkers(
    predict: Predictor,
    starts: torch.Tensor,
    periodic: Sequence[bool],
    bounds: Bounds,
    step_size: float,
    threshold_kT: float,
    n_wanted: int,
    max_steps: int,
    min_steps: int = 0,
    beta: float = 1.0,
    seed: int = 0,
    mass_temperature_kT: float | None = None,
    F_low_kT: float = 0.0,
    novelty_points: torch.Tensor | None = None,
    novelty_radius: float | None = None,
) -> WalkerResult:
    """Parallel Metropolis walkers on ``exp(-beta F̄(s))`` that stop where the ensemble std is high.

    ``predict(s [n, n_cg]) -> (F̄, σ)`` in kT. Every step, each running walker proposes
    ``s' = s + step_size · ξ`` with ``ξ ~ N(0, I)``; periodic coordinates are wrapped into
    ``[lo, hi)``; a proposal with a non-periodic coordinate outside its bounds, or with a
    non-finite F̄, is rejected (without evaluating it). After step ``t`` (accepted or not), a running
    walker whose current point has ``σ > threshold_kT`` and ``t > min_steps`` stops and is frozen.
    With ``mass_temperature_kT = T`` the disagreement is weighted by the point's probability:
    a walker stops where ``σ · exp(−max(F̄ − F_low_kT, 0) / T) > threshold_kT``, so points are
    added where an error costs probability mass (``F_low_kT``: the lowest F̄ of interest).
    With ``novelty_radius = r`` a walker also stops where no point of ``novelty_points [K, d]``
    (the labelled points) lies within ``r`` (minimum-image distance): an ensemble fitted to
    capped labels agrees with itself in a region it has never seen, so its disagreement alone
    never sends points there.

    Runs until ``n_wanted`` walkers have stopped and returns the ``n_wanted`` earliest (by stop
    step, ties by walker index). If ``max_steps`` pass first, returns the walkers stopped so far
    (possibly none) with ``exhausted=True``.
    """
    per, lo, hi = _geometry(periodic, bounds)
    x = _check_points(starts, per.shape[0], "starts")
    W = x.shape[0]
    if not 1 <= n_wanted <= W:
        raise ValueError(f"n_wanted must be in [1, number of walkers = {W}]; got {n_wanted}")
    if mass_temperature_kT is not None and not mass_temperature_kT > 0:
        raise ValueError(f"mass_temperature_kT must be > 0 (or None); got {mass_temperature_kT}")
    if not step_size > 0 or max_steps < 1 or min_steps < 0:
        raise ValueError(
            f"need step_size > 0, max_steps >= 1, min_steps >= 0; got {step_size}, "
            f"{max_steps}, {min_steps}"
        )
    x = _wrap(x, per, lo, hi)
    if ((x < lo) | (x > hi)).any():
        raise ValueError("starts lie outside the bounds of a non-periodic coordinate")
    gen = torch.Generator().manual_seed(int(seed))
    if (novelty_radius is None) != (novelty_points is None):
        raise ValueError("novelty_radius and novelty_points go together")
    if novelty_radius is not None:
        if not novelty_radius > 0:
            raise ValueError(f"novelty_radius must be > 0 (or None); got {novelty_radius}")
        known = _check_points(novelty_points, per.shape[0], "novelty_points")

    def far(points: torch.Tensor) -> torch.Tensor:
        """Points with no known point within the novelty radius."""
        if not len(known):
            return torch.ones(len(points), dtype=torch.bool)
        d = (
            torch.linalg.vector_norm(_difference(points[:, None], known[None], per, lo, hi), dim=-1)
            .min(dim=1)
            .values
        )
        return d > novelty_radius

    def evaluate(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std = predict(points)
        mean = torch.as_tensor(mean).to(torch.float64).reshape(-1)
        std = torch.as_tensor(std).to(torch.float64).reshape(-1)
        if mean.shape[0] != points.shape[0] or std.shape[0] != points.shape[0]:
            raise ValueError(
                f"predict returned shapes {tuple(mean.shape)}, {tuple(std.shape)} for "
                f"{points.shape[0]} points"
            )
        return mean, std

    F, sigma = evaluate(x)
    n_eval = W
    running = torch.ones(W, dtype=torch.bool)
    stop_step = torch.full((W,), -1, dtype=torch.int64)
    n_accepted = n_attempted = 0
    n_running, n_stopped = W, 0
    step = 0
    wrapping = bool(per.any())
    while step < max_steps and n_stopped < n_wanted:
        step += 1
        noise = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        log_u = torch.rand(W, generator=gen, dtype=torch.float64).log_()
        prop = x + step_size * noise
        if wrapping:
            prop = _wrap(prop, per, lo, hi)
        todo = running & ((prop >= lo) & (prop <= hi)).all(dim=1)
        n_attempted += n_running
        n_todo = int(todo.sum())
        if n_todo:
            if n_todo == W:  # every walker moves (the usual case): no gathering
                F_new, s_new = evaluate(prop)
            else:  # the others get F = NaN, which is never accepted
                idx = todo.nonzero().squeeze(1)
                F_new = torch.full_like(F, float("nan"))
                s_new = torch.full_like(sigma, float("nan"))
                F_new[idx], s_new[idx] = evaluate(prop[idx])
            acc = torch.isfinite(F_new) & (log_u < (F - F_new).mul_(beta))
            x = torch.where(acc.unsqueeze(1), prop, x)
            F, sigma = torch.where(acc, F_new, F), torch.where(acc, s_new, sigma)
            n_eval += n_todo
            n_accepted += int(acc.sum())
        if step > min_steps:
            score = sigma
            if mass_temperature_kT is not None:
                score = sigma * torch.exp(-(F - F_low_kT).clamp(min=0.0) / mass_temperature_kT)
            stops = running & (score > threshold_kT)
            if novelty_radius is not None and bool((running & ~stops).any()):
                rest = (running & ~stops).nonzero().squeeze(1)
                stops[rest[far(x[rest])]] = True
            n_stops = int(stops.sum())
            if n_stops:
                stop_step[stops] = step
                running &= ~stops
                n_running, n_stopped = n_running - n_stops, n_stopped + n_stops
    stopped = (stop_step >= 0).nonzero().squeeze(1)  # ascending walker index
    order = torch.argsort(stop_step[stopped], stable=True)
    chosen = stopped[order][:n_wanted]
    return WalkerResult(
        points=x[chosen].clone(),
        stop_steps=stop_step[chosen].clone(),
        walker_index=chosen,
        steps_used=step,
        exhausted=chosen.shape[0] < n_wanted,
        n_evaluations=n_eval,
        acceptance=n_accepted / max(n_attempted, 1),
    )


# --------------------------------------------------------------------------- diversity selection
def farthest_point_selection(
    points: torch.Tensor,
    n: int,
    periodic: Sequence[bool],
    bounds: Bounds = None,
    seed: int = 0,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indices of ``n`` of ``points [N, d]`` chosen greedily to maximise the minimum distance.

    Euclidean distance with minimum-image differences for periodic coordinates. Without
    ``exclude`` the first point is random (seeded); each next one is the point farthest from all
    chosen so far. With ``exclude [K, d]`` (points already in the dataset) those count as chosen
    from the start, so the first pick is the point farthest from them. Ties go to the lower index.
    """
    per, lo, hi = _geometry(periodic, bounds)
    d = per.shape[0]
    pts = _check_points(points, d, "points")
    N = pts.shape[0]
    if not 0 <= n <= N:
        raise ValueError(f"cannot select {n} of {N} points")
    if n == 0:
        return torch.zeros(0, dtype=torch.int64)

    def dist_to(q: torch.Tensor) -> torch.Tensor:  # [N, len(q)]
        return torch.linalg.vector_norm(_difference(pts[:, None], q[None], per, lo, hi), dim=-1)

    chosen: list[int] = []
    mind = torch.full((N,), math.inf, dtype=torch.float64)
    if exclude is not None and torch.as_tensor(exclude).numel() > 0:
        mind = dist_to(_check_points(exclude, d, "exclude")).min(dim=1).values
    else:
        gen = torch.Generator().manual_seed(int(seed))
        first = int(torch.randint(N, (1,), generator=gen))
        chosen.append(first)
        mind = dist_to(pts[first : first + 1])[:, 0]
    while len(chosen) < n:
        m = mind.clone()
        if chosen:
            m[torch.tensor(chosen)] = -math.inf  # never pick a point twice (duplicates)
        nxt = int(torch.argmax(m))
        chosen.append(nxt)
        mind = torch.minimum(mind, dist_to(pts[nxt : nxt + 1])[:, 0])
    return torch.tensor(chosen, dtype=torch.int64)


# ------------------------------------------------------------------------------------- spreading
def spread(
    centres: torch.Tensor,
    n_per_centre: int,
    radius: float,
    kind: str = "disk",
    periodic: Sequence[bool] = (),
    bounds: Bounds = None,
    seed: int = 0,
) -> torch.Tensor:
    """``n_per_centre`` new CG points around each centre: ``[C * n_per_centre, d]`` float64.

    Rows ``c * n_per_centre ... (c + 1) * n_per_centre - 1`` belong to centre ``c`` (group ids:
    ``torch.arange(C).repeat_interleave(n_per_centre)``). Kinds:

    * ``"disk"``: uniform in the ball of ``radius`` (2-D: radius ``radius·sqrt(U)``, uniform angle);
    * ``"gaussian"``: ``N(centre, radius² I)``;
    * ``"uniform"``: uniform in the cube ``centre ± radius`` (the 1-D interval).

    Periodic coordinates are wrapped into ``[lo, hi)``. A point with a non-periodic coordinate
    outside its bounds is *redrawn* (rejection, i.e. the distribution truncated to the bounds), not
    clipped, so no points pile up on the boundary. Centres must lie inside the bounds.
    """
    if kind not in _SPREAD_KINDS:
        raise ValueError(f"unknown spread kind {kind!r}; choose from {list(_SPREAD_KINDS)}")
    if n_per_centre < 1 or not radius > 0:
        raise ValueError(f"need n_per_centre >= 1 and radius > 0; got {n_per_centre}, {radius}")
    per, lo, hi = _geometry(periodic, bounds)
    d = per.shape[0]
    c = _wrap(_check_points(centres, d, "centres"), per, lo, hi)
    if ((c < lo) | (c > hi)).any():
        raise ValueError("a centre lies outside the bounds of a non-periodic coordinate")
    gen = torch.Generator().manual_seed(int(seed))
    base = c.repeat_interleave(n_per_centre, dim=0)
    out = torch.empty_like(base)
    todo = torch.arange(base.shape[0])
    for _ in range(10_000):
        k = todo.shape[0]
        if kind == "gaussian":
            offset = radius * torch.randn(k, d, generator=gen, dtype=torch.float64)
        elif kind == "uniform":
            offset = radius * (2.0 * torch.rand(k, d, generator=gen, dtype=torch.float64) - 1.0)
        else:
            direction = torch.randn(k, d, generator=gen, dtype=torch.float64)
            direction = direction / torch.linalg.vector_norm(direction, dim=1, keepdim=True)
            r = radius * torch.rand(k, 1, generator=gen, dtype=torch.float64) ** (1.0 / d)
            offset = r * direction
        cand = _wrap(base[todo] + offset, per, lo, hi)
        ok = ((cand >= lo) & (cand <= hi)).all(dim=1)
        out[todo[ok]] = cand[ok]
        todo = todo[~ok]
        if todo.numel() == 0:
            return out
    raise RuntimeError("spread: could not place points inside the bounds (centre on the edge?)")


# ---------------------------------------------------------------------------------------- splits
def _n_test(n: int, test_fraction: float) -> int:
    """round(test_fraction · n), but at least 1 and at most n - 1 when 0 < fraction < 1, n >= 2."""
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1]; got {test_fraction}")
    k = round(test_fraction * n)
    if 0.0 < test_fraction < 1.0 and n >= 2:
        k = min(max(k, 1), n - 1)
    return k


def split_points(n: int, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random train/test split of ``range(n)``: sorted int64 ``(train_idx, test_idx)``."""
    if n < 0:
        raise ValueError(f"n must be >= 0; got {n}")
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=gen)
    k = _n_test(n, test_fraction)
    return perm[k:].sort().values, perm[:k].sort().values
