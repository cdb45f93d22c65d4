"""The active-learning loop in one process (tests, notebooks); the workflow runs the same steps.

Iteration 0: starting data (short MD / Metropolis, counted), training by example, initial CG
points from the starting frames. Iteration k >= 1: reverse-KL training on the points of k−1
(plus a fraction of older points), PMF labels for all training points with the current flow,
ensemble fit, evaluation, CG walkers on the ensemble mean, point selection (farthest points,
spreading, group-aware train/test split). The loop stops when the walkers are exhausted (no
point with ensemble std above the threshold within the step budget: a convergence signal that
needs no ground truth), at ``max_iterations``, or below a metric threshold when a reference
exists.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch

from .energy.counting import EvaluationCounter
from .flows import build_flow
from .free_energy import FreeEnergyEnsemble, pmf_labels
from .md import short_run
from .sampling import cg_walkers, farthest_point_selection, split_groups, split_points, spread
from .systems import System, get_system
from .training import (
    EnergyConfig,
    ExampleConfig,
    cg_values,
    label_log_weights,
    train_by_energy,
    train_by_example,
)


@dataclass
class StartConfig:
    n_frames: int = 5000
    stride: int = 10
    n_points: int = 0  #: initial CG points taken from the frames (0 = all)
    #: keep only frames whose CG values lie in [low, high] per coordinate (None = all)
    cg_window: tuple[tuple[float, float], ...] | None = None
    test_fraction: float = 0.2
    sampler: dict[str, Any] = field(default_factory=dict)  #: e.g. step_size for Metropolis


@dataclass
class EnsembleConfig:
    n_members: int = 10
    hidden: tuple[int, ...] = (256, 128, 32)
    activation: str = "sigmoid"
    init: str = "xavier"
    epochs: int = 1500
    lr: float = 5e-4
    batch_size: int = 256
    split: str = "fraction"
    train_fraction: float = 0.8
    label_cap_kT: float | None = None  #: labels above min + cap are set to min + cap


@dataclass
class LabelConfig:
    draws: int = 30
    clip_top_k: int = 0
    relabel_all: bool = True  #: relabel every training point with the current flow


@dataclass
class WalkerConfig:
    n_walkers: int = 200
    step_size: float = 0.1
    threshold_kT: float = 0.2
    min_steps: int = 0
    max_steps: int = 500_000
    beta: float = 1.0  #: walkers sample exp(−beta F̄) (F̄ in kT)
    n_candidates: int = 30
    n_select: int = 15
    start: tuple[float, ...] | None = None  #: first start point (default: the minimum's CG value)


@dataclass
class SpreadConfig:
    kind: str = "disk"
    radius: float = 0.6
    n_per_centre: int = 200
    test_fraction: float = 0.2


@dataclass
class CampaignConfig:
    system: dict[str, Any] = field(default_factory=lambda: {"name": "alanine_dipeptide"})
    seed: int = 0
    start: StartConfig = field(default_factory=StartConfig)
    flow: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float64"
    example: ExampleConfig = field(default_factory=ExampleConfig)
    energy_first: EnergyConfig = field(default_factory=lambda: EnergyConfig(warmup_epochs=15))
    energy: EnergyConfig = field(default_factory=EnergyConfig)
    backend: dict[str, Any] = field(default_factory=lambda: {"kind": "torch", "dtype": "float32"})
    labels: LabelConfig = field(default_factory=LabelConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    walkers: WalkerConfig = field(default_factory=WalkerConfig)
    spreading: SpreadConfig = field(default_factory=SpreadConfig)
    max_iterations: int = 10

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class IterationRecord:
    iteration: int
    n_train_points: int
    n_new_points: int
    counts: dict[str, int]
    total_evaluations: int
    metrics: dict[str, float]
    selected: np.ndarray  #: CG centres selected by the walkers in this iteration
    walker_steps: int
    exhausted: bool
    seconds: float


@dataclass
class CampaignResult:
    flow: torch.nn.Module
    ensemble: FreeEnergyEnsemble
    records: list[IterationRecord]
    train_points: np.ndarray
    converged: bool
    reason: str
    counter: EvaluationCounter
    config: CampaignConfig | None = None  #: the settings (backend and precision included)


def _seed(base: int, iteration: int, stage: int) -> int:
    return (base * 1_000_003 + iteration * 101 + stage) % (2**31 - 1)


def fit_ensemble(
    e: EnsembleConfig, periodic: list[bool], s: torch.Tensor, f_kT: torch.Tensor, seed: int
) -> FreeEnergyEnsemble:
    """A new ensemble of ``e``'s shape fitted to labels ``f_kT`` at CG points ``s``."""
    f_kT = cap_labels(torch.as_tensor(f_kT), e.label_cap_kT)
    ensemble = FreeEnergyEnsemble(
        e.n_members, periodic, hidden=tuple(e.hidden), activation=e.activation, init=e.init
    )
    ensemble.fit(
        s,
        f_kT,
        epochs=e.epochs,
        lr=e.lr,
        batch_size=e.batch_size,
        split=e.split,
        train_fraction=e.train_fraction,
        seed=seed,
    )
    return ensemble


def cap_labels(f_kT: torch.Tensor, cap_kT: float | None) -> torch.Tensor:
    """Labels above ``min + cap_kT`` set to ``min + cap_kT`` (unchanged with ``cap_kT=None``)."""
    if cap_kT is None or f_kT.numel() == 0:
        return f_kT
    if not cap_kT > 0:
        raise ValueError(f"label_cap_kT must be > 0, got {cap_kT}")
    return torch.minimum(f_kT, f_kT.min() + cap_kT)


def within_window(
    s: torch.Tensor, x_fg: torch.Tensor, window: tuple[tuple[float, float], ...] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the frames whose CG values lie in ``window`` (``[low, high]`` per coordinate)."""
    if window is None:
        return s, x_fg
    inside = torch.ones(len(s), dtype=torch.bool)
    for j, (lo, hi) in enumerate(window):
        inside &= (s[:, j] >= lo) & (s[:, j] <= hi)
    if not bool(inside.any()):
        raise ValueError(f"no starting frame has CG values inside cg_window {window}")
    return s[inside], x_fg[inside]


def _iteration_zero(
    config: CampaignConfig,
) -> tuple[System, EvaluationCounter, torch.nn.Module, torch.optim.Optimizer, torch.Tensor]:
    """Starting data (counted) and training by example: system, counter, flow, optimizer, CG values."""
    torch.manual_seed(config.seed)
    dtype = getattr(torch, config.dtype)
    opts = dict(config.system)
    system = get_system(opts.pop("name"), **opts)
    counter = EvaluationCounter()
    run = short_run(
        system,
        config.start.n_frames,
        config.start.stride,
        seed=_seed(config.seed, 0, 0),
        **config.start.sampler,
    )
    counter.merge([run.counts])
    s0, x_fg = within_window(*cg_values(system, run.frames, dtype), config.start.cg_window)
    flow = build_flow(system, **config.flow).to(dtype)
    opt = torch.optim.Adam(flow.parameters(), lr=config.example.lr)
    train_by_example(flow, s0, x_fg, config.example, optimizer=opt)
    return system, counter, flow, opt, s0


def run_campaign(
    config: CampaignConfig,
    evaluate: Callable[[FreeEnergyEnsemble, System], dict[str, float]] | None = None,
    stop_metric: tuple[str, float] | None = None,
    log: Callable[[str], None] = lambda msg: None,
) -> CampaignResult:
    """Run the loop to convergence; ``evaluate(ensemble, system)`` gives metrics per iteration."""
    dtype = getattr(torch, config.dtype)
    t0 = time.perf_counter()
    system, counter, flow, opt, s0 = _iteration_zero(config)
    pts = s0
    if config.start.n_points and config.start.n_points < len(pts):
        gen = torch.Generator().manual_seed(_seed(config.seed, 0, 1))
        pts = pts[torch.randperm(len(pts), generator=gen)[: config.start.n_points]]
    tr, te = split_groups(
        torch.arange(len(pts)), config.start.test_fraction, seed=_seed(config.seed, 0, 2)
    )
    latest, test_points = pts[tr], pts[te]
    older = pts[:0]
    periodic = list(system.cg_spec.periodic)
    bounds = list(system.cg_spec.bounds)
    x_min, _ = system.initial_configuration()
    start_point = (
        torch.tensor([config.walkers.start], dtype=dtype)
        if config.walkers.start is not None
        else system.cg(torch.as_tensor(x_min[None], dtype=dtype))
    )
    starts = start_point
    records: list[IterationRecord] = []
    labels_f = torch.empty(0, dtype=torch.float64)
    labelled = pts[:0]
    converged, reason = False, "max_iterations"
    ensemble: FreeEnergyEnsemble | None = None
    log(f"iteration 0: {len(latest)} train / {len(test_points)} test points, N = {counter.total}")

    for k in range(1, config.max_iterations + 1):
        t_it = time.perf_counter()
        ecfg = config.energy_first if k == 1 else config.energy
        ecfg = EnergyConfig(**{**asdict(ecfg), "seed": _seed(config.seed, k, 3)})
        backend = system.energy_backend(**_backend_options(config.backend))
        opt.param_groups[0]["lr"] = ecfg.lr
        train_by_energy(
            flow, system, backend, latest, ecfg, counter, old_points=older, optimizer=opt
        )
        all_train = torch.cat([older, latest])
        # labels: relabel everything with the current flow, or only the new points
        to_label = all_train if config.labels.relabel_all else latest
        log_w = label_log_weights(
            flow,
            system,
            backend,
            to_label,
            config.labels.draws,
            counter,
            seed=_seed(config.seed, k, 4),
        )
        lab = pmf_labels(log_w, clip_top_k=config.labels.clip_top_k)
        if config.labels.relabel_all:
            labelled, labels_f = to_label, lab.F_kT
        else:
            labelled, labels_f = torch.cat([labelled, to_label]), torch.cat([labels_f, lab.F_kT])
        ensemble = fit_ensemble(
            config.ensemble, periodic, labelled, labels_f, _seed(config.seed, k, 5)
        )
        metrics = evaluate(ensemble, system) if evaluate else {}
        w = config.walkers
        wstarts = starts[torch.arange(w.n_walkers) % len(starts)]
        res = cg_walkers(
            ensemble.predict,
            wstarts,
            periodic=periodic,
            bounds=bounds,
            step_size=w.step_size,
            threshold_kT=w.threshold_kT,
            n_wanted=w.n_candidates,
            max_steps=w.max_steps,
            min_steps=w.min_steps,
            beta=w.beta,
            seed=_seed(config.seed, k, 6),
        )
        selected = res.points[:0]
        if len(res.points):
            n_sel = min(w.n_select, len(res.points))
            idx = farthest_point_selection(
                res.points, n_sel, periodic, bounds, seed=_seed(config.seed, k, 7)
            )
            selected = res.points[idx]
        records.append(
            IterationRecord(
                iteration=k,
                n_train_points=len(all_train),
                n_new_points=0,
                counts=counter.as_dict(),
                total_evaluations=counter.total,
                metrics=metrics,
                selected=selected.detach().cpu().numpy(),
                walker_steps=int(res.steps_used),
                exhausted=bool(res.exhausted),
                seconds=time.perf_counter() - t_it,
            )
        )
        log(
            f"iteration {k}: N = {counter.total}, metrics {metrics}, walkers {'exhausted' if res.exhausted else len(res.points)}"
        )
        if stop_metric is not None and metrics.get(stop_metric[0], math.inf) < stop_metric[1]:
            converged, reason = True, f"{stop_metric[0]} < {stop_metric[1]}"
            break
        if res.exhausted and len(selected) == 0:
            converged, reason = True, "walkers exhausted"
            break
        sp = config.spreading
        new = spread(
            selected,
            sp.n_per_centre,
            sp.radius,
            kind=sp.kind,
            periodic=periodic,
            bounds=bounds,
            seed=_seed(config.seed, k, 8),
        )
        if len(selected) >= 2:  # keep each centre's points on one side (test = new regions)
            groups = torch.arange(len(selected)).repeat_interleave(sp.n_per_centre)
            tr, te = split_groups(groups, sp.test_fraction, seed=_seed(config.seed, k, 9))
        else:
            tr, te = split_points(len(new), sp.test_fraction, seed=_seed(config.seed, k, 9))
        older, latest = all_train, new[tr].to(dtype)
        test_points = torch.cat([test_points, new[te].to(dtype)])
        records[-1].n_new_points = len(latest)
        starts = selected.to(dtype)
    assert ensemble is not None
    log(f"done after {time.perf_counter() - t0:.1f} s: {reason}")
    return CampaignResult(
        flow=flow,
        ensemble=ensemble,
        records=records,
        train_points=torch.cat([older, latest]).detach().cpu().numpy(),
        converged=converged,
        reason=reason,
        counter=counter,
        config=config,
    )


def _backend_options(spec: dict[str, Any]) -> dict[str, Any]:
    opts = dict(spec)
    kind = opts.pop("kind", "torch")
    if "dtype" in opts and isinstance(opts["dtype"], str):
        opts["dtype"] = getattr(torch, opts["dtype"])
    return {"kind": kind, **opts}


def grid_points(system: System, per_axis: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A regular grid of CG points at bin centres (periodic ends are not duplicated)."""
    axes = []
    for lo, hi in system.cg_spec.bounds:
        width = (hi - lo) / per_axis
        axes.append(lo + (torch.arange(per_axis, dtype=dtype) + 0.5) * width)
    mesh = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([m.reshape(-1) for m in mesh], dim=1)


def run_grid_campaign(
    config: CampaignConfig,
    per_axis: int = 100,
    eval_every: int = 10,
    evaluate: Callable[[FreeEnergyEnsemble, System], dict[str, float]] | None = None,
    log: Callable[[str], None] = lambda msg: None,
) -> CampaignResult:
    """Grid conditioning, no active learning (method-spec §7.1): a baseline.

    After training by example, the flow is trained by energy on a regular grid of CG points
    (80/20 split) for ``config.energy.epochs`` epochs (its warm-up and schedule span the whole
    run); every ``eval_every`` epochs all training points are labelled, the ensemble is refitted
    and evaluated (one record each).
    """
    dtype = getattr(torch, config.dtype)
    system, counter, flow, opt, _ = _iteration_zero(config)
    pts = grid_points(system, per_axis, dtype)
    tr, _ = split_points(len(pts), config.spreading.test_fraction, seed=_seed(config.seed, 0, 2))
    train = pts[tr]
    backend = system.energy_backend(**_backend_options(config.backend))
    periodic = list(system.cg_spec.periodic)
    total = config.energy.epochs
    records: list[IterationRecord] = []
    ensemble: FreeEnergyEnsemble | None = None
    for k, start in enumerate(range(0, total, eval_every), start=1):
        t_it = time.perf_counter()
        n = min(eval_every, total - start)
        ecfg = EnergyConfig(
            **{
                **asdict(config.energy),
                "epochs": n,
                "epoch_offset": start,
                "schedule_epochs": config.energy.schedule_epochs or total,
                "seed": _seed(config.seed, k, 3),
            }
        )
        train_by_energy(flow, system, backend, train, ecfg, counter, optimizer=opt)
        log_w = label_log_weights(
            flow,
            system,
            backend,
            train,
            config.labels.draws,
            counter,
            seed=_seed(config.seed, k, 4),
        )
        lab = pmf_labels(log_w, clip_top_k=config.labels.clip_top_k)
        ensemble = fit_ensemble(
            config.ensemble, periodic, train, lab.F_kT, _seed(config.seed, k, 5)
        )
        metrics = evaluate(ensemble, system) if evaluate else {}
        records.append(
            IterationRecord(
                k,
                len(train),
                0,
                counter.as_dict(),
                counter.total,
                metrics,
                np.zeros((0, len(periodic))),
                0,
                False,
                time.perf_counter() - t_it,
            )
        )
        log(f"grid epoch {start + n}: N = {counter.total}, metrics {metrics}")
    assert ensemble is not None
    return CampaignResult(
        flow, ensemble, records, train.detach().cpu().numpy(), False, "epochs done", counter, config
    )


def mueller_brown_config(seed: int = 0, **overrides: Any) -> CampaignConfig:
    """The Müller–Brown campaign of the original code (method-spec §7.2), seeded.

    Starting points only in s ∈ [−2.2, −1.8]; the ensemble runs fewer, larger-batch epochs than
    the original (300 x 16 instead of 1000 x 5), which converges to the same labels here.
    """
    mb_energy = EnergyConfig(
        lr=5e-3, batch_size=8, warmup_epochs=0, clip_early=20, clip_late=20, skip_top_k=0
    )
    cfg = CampaignConfig(
        system={"name": "mueller_brown"},
        seed=seed,
        start=StartConfig(
            n_frames=400,
            stride=20,
            n_points=100,
            test_fraction=0.2,
            cg_window=((-2.2, -1.8),),
            sampler={"step_size": 0.05},
        ),
        flow={"cond_mean": [-2.0], "cond_std": [0.3]},
        dtype="float64",
        example=ExampleConfig(epochs=80, lr=5e-4, batch_size=16),
        energy_first=replace(mb_energy, epochs=12),
        energy=replace(mb_energy, epochs=7),
        backend={"kind": "torch"},
        labels=LabelConfig(draws=30),
        ensemble=EnsembleConfig(
            n_members=10,
            hidden=(64, 64),
            activation="sigmoid",
            init="gaussian_uniform",
            epochs=300,
            lr=1e-3,
            batch_size=16,
            split="bagging",
            train_fraction=0.9,
        ),
        walkers=WalkerConfig(
            n_walkers=50,
            step_size=0.1,
            threshold_kT=0.4,
            min_steps=10,
            max_steps=30_000,
            n_candidates=1,
            n_select=1,
            start=(-2.0,),
        ),
        spreading=SpreadConfig(kind="uniform", radius=0.5, n_per_centre=65, test_fraction=0.2),
        max_iterations=25,
    )
    for key, value in overrides.items():
        if not hasattr(cfg, key):
            raise ValueError(f"unknown campaign setting {key!r}")
        setattr(cfg, key, value)
    return cfg


def mueller_brown_evaluator(
    bins: int = 100, bounds: tuple[float, float] = (-2.5, 1.1), max_F_kT: float = 10.0
):
    """Metrics against the exact Müller–Brown PMF on ``bins`` bin centres over ``bounds``:
    max |ΔF| where F <= ``max_F_kT``, KLD, largest ensemble std (:func:`mueller_brown_metrics`)."""
    from .metrics import grid_values, mueller_brown_metrics

    system = get_system("mueller_brown")
    width = (bounds[1] - bounds[0]) / bins
    grid = bounds[0] + (np.arange(bins) + 0.5) * width
    exact = system.exact_pmf(grid)

    def evaluate(ensemble: FreeEnergyEnsemble, _system: System) -> dict[str, float]:
        mean, std = grid_values(ensemble.predict, grid[:, None])
        return mueller_brown_metrics(mean, exact, std, max_F_kT)

    return evaluate
