"""The campaign's steps as file-to-file functions: one per workflow rule (``cgflow wf <step>``).

Each step reads the validated workflow configuration (a YAML snapshot written once per
campaign), its input files, and writes its outputs atomically with provenance (system,
iteration, seed, config hash) and the energy evaluations it caused. The in-process loop
(:mod:`cgflow.campaign`) runs the same science; these functions only add the file boundaries.

Seeds are derived from (campaign seed, iteration, stage[, shard]).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from .data import Provenance, atomic_path, config_hash, read_h5, write_h5

#: stage numbers for seed derivation (stable: changing them changes every result)
STAGES = {
    "start": 0,
    "initial_points": 2,
    "finetune": 3,
    "sample": 4,
    "ensemble": 5,
    "walkers": 6,
    "select_fps": 7,
    "select_spread": 8,
    "select_split": 9,
    "backmap": 10,
}


def stage_seed(base: int, iteration: int, stage: str, shard: int = 0) -> int:
    return (base * 1_000_003 + iteration * 101 + STAGES[stage] + 7919 * shard) % (2**31 - 1)


# ------------------------------------------------------------------------------- configuration
class Settings:
    """The workflow configuration (as validated by the schema) plus derived objects."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.hash = config_hash(cfg)
        self.seed = int(cfg.get("seed", 0))
        self._system = None

    @classmethod
    def load(cls, path: str | os.PathLike) -> Settings:
        with open(path) as fh:
            return cls(yaml.safe_load(fh))

    def __getitem__(self, key: str) -> Any:
        try:
            return self.cfg[key]
        except KeyError:
            raise KeyError(f"configuration has no section {key!r}") from None

    @property
    def system(self) -> Any:
        if self._system is None:
            from .systems import get_system

            spec = self["system"]
            self._system = get_system(spec["name"], **(spec.get("options") or {}))
        return self._system

    @property
    def grid_mode(self) -> bool:
        """The grid-conditioning variant (``mode: grid``) instead of active learning."""
        return self.cfg.get("mode", "active_learning") == "grid"

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.cfg.get("dtype", "float32"))

    def provenance(self, iteration: int, seed: int | None = None) -> Provenance:
        s = self.system
        return Provenance(
            system=s.name,
            iteration=iteration,
            seed=self.seed if seed is None else seed,
            config_hash=self.hash,
            kT_kJ_per_mol=s.kT if s.temperature_K is not None else None,
            beta=None if s.temperature_K is not None else s.beta,
        )

    def training_backend(self) -> Any:
        from .systems import AnalyticSystem

        b = dict(self["backend"])
        kind = b.pop("kind", "torch")
        if "dtype" in b:
            b["dtype"] = getattr(torch, b["dtype"])
        if isinstance(self.system, AnalyticSystem):  # a torch callable: only the precision applies
            return self.system.energy_backend(
                "torch", **{k: v for k, v in b.items() if k == "dtype"}
            )
        return self.system.energy_backend(kind, **b)


def write_snapshot(cfg: dict[str, Any], out: str | os.PathLike) -> Path:
    """Write the validated configuration (with defaults filled in) that every step reads."""
    with atomic_path(out) as tmp:
        tmp.write_text(yaml.safe_dump(cfg, sort_keys=True))
    return Path(out)


# ------------------------------------------------------------------------------------ points
def _read_points(path: str | os.PathLike) -> dict[str, Any]:
    d = read_h5(path, "points")
    return {
        "s": torch.as_tensor(d["s"]),
        "split": torch.as_tensor(d["split"]),
        "tag": torch.as_tensor(d["tag"]),
        "group": torch.as_tensor(d["group"]),
        "centres": np.asarray(json.loads(d.attrs.get("centres", "[]")), dtype=np.float64),
    }


def _write_points(st: Settings, out: Any, iteration: int, s, split, tag, group, centres) -> None:
    units = "rad" if all(st.system.cg_spec.periodic) else "1"
    write_h5(
        out,
        "points",
        {"s": s, "split": split, "tag": tag, "group": group},
        {"s": units, "split": "1", "tag": "1", "group": "1"},
        st.provenance(iteration),
        attrs={
            "centres": np.asarray(centres, dtype=np.float64).tolist(),
            "split_codes": "0 = train, 1 = test",
            "tag_meaning": "iteration whose selection added the point",
        },
    )


# ---------------------------------------------------------------------------------- iteration 0
def start(st: Settings, out: Any) -> None:
    """Starting data: short MD (molecules) or Metropolis (analytic), all evaluations counted."""
    from .md import short_run

    c = st["start"]
    run = short_run(
        st.system,
        c["n_frames"],
        c["stride"],
        seed=stage_seed(st.seed, 0, "start"),
        **(c.get("sampler") or {}),
    )
    s = st.system.cg(torch.as_tensor(run.frames)).numpy()
    units = st.system.length_unit
    write_h5(
        out,
        "start",
        {"x": run.frames, "s": s},
        {"x": units, "s": "rad" if all(st.system.cg_spec.periodic) else "1"},
        st.provenance(0, stage_seed(st.seed, 0, "start")),
        attrs={"stride": run.stride, "sampler": c.get("sampler") or {}},
        counters=run.counts,
    )


def _start_values(st: Settings, start_h5: Any) -> tuple[torch.Tensor, torch.Tensor]:
    from .campaign import within_window
    from .training import cg_values

    d = read_h5(start_h5, "start")
    window = st["start"].get("cg_window")
    return within_window(
        *cg_values(st.system, d["x"], st.dtype), tuple(map(tuple, window)) if window else None
    )


def pretrain(st: Settings, start_h5: Any, out: Any) -> None:
    """Training by example on the starting frames; writes the flow with its history."""
    from .flows import build_flow, save_flow
    from .training import ExampleConfig, train_by_example

    s, x_fg = _start_values(st, start_h5)
    torch.manual_seed(stage_seed(st.seed, 0, "start"))
    flow = build_flow(st.system, **(st["flow"] or {})).to(st.dtype)
    ex = ExampleConfig(**st["example"], seed=stage_seed(st.seed, 0, "start"))
    opt = torch.optim.Adam(flow.parameters(), lr=ex.lr)
    hist = train_by_example(flow, s, x_fg, ex, optimizer=opt)
    save_flow(
        flow,
        out,
        extra={
            "iteration": 0,
            "nll": hist["nll"],
            "config_hash": st.hash,
            "dtype": st.cfg.get("dtype"),
        },
        optimizer=opt,
    )


def initial_points(st: Settings, start_h5: Any, out: Any) -> None:
    """CG points of the starting frames (optionally a random subset), train/test split; in the
    grid mode the regular grid instead (random split)."""
    from .sampling import split_groups, split_points

    if st.grid_mode:
        from .campaign import grid_points

        s = grid_points(st.system, int(st["grid"]["per_axis"]))
        _, te = split_points(
            len(s), st["start"]["test_fraction"], seed=stage_seed(st.seed, 0, "initial_points")
        )
        split = torch.zeros(len(s), dtype=torch.int64)
        split[te] = 1
        group = torch.arange(len(s))
        _write_points(st, out, 0, s, split, torch.zeros(len(s), dtype=torch.int64), group, [])
        return
    s, _ = _start_values(st, start_h5)
    n = st["start"].get("n_points") or 0
    gen = torch.Generator().manual_seed(stage_seed(st.seed, 0, "initial_points"))
    if n and n < len(s):
        s = s[torch.randperm(len(s), generator=gen)[:n]]
    group = torch.arange(len(s))
    _, te = split_groups(
        group, st["start"]["test_fraction"], seed=stage_seed(st.seed, 0, "initial_points")
    )
    split = torch.zeros(len(s), dtype=torch.int64)
    split[te] = 1
    _write_points(
        st, out, 0, s.to(torch.float64), split, torch.zeros(len(s), dtype=torch.int64), group, []
    )


# ---------------------------------------------------------------------------------- iteration k
def finetune(
    st: Settings, iteration: int, flow_in: Any, points_in: Any, flow_out: Any, train_out: Any
) -> None:
    """Reverse-KL training on the points added in iteration k−1 plus a fraction of older ones."""
    from .energy.counting import EvaluationCounter
    from .flows import load_flow, load_optimizer, save_flow
    from .training import EnergyConfig, train_by_energy

    flow, _ = load_flow(flow_in)
    flow = flow.to(st.dtype)
    p = _read_points(points_in)
    train = p["split"] == 0
    # grid mode: no points are ever added, every iteration trains on the whole grid
    newest = iteration - 1 if not st.grid_mode else int(p["tag"].max())
    latest = p["s"][train & (p["tag"] == newest)].to(st.dtype)
    older = p["s"][train & (p["tag"] < newest)].to(st.dtype)
    section = st["energy_training"]["first" if iteration == 1 else "later"]
    cfg = EnergyConfig(**section, seed=stage_seed(st.seed, iteration, "finetune"))
    counter = EvaluationCounter()
    torch.manual_seed(cfg.seed)
    opt = load_optimizer(flow_in, flow, cfg.lr)  # Adam moments carry over between iterations
    hist = train_by_energy(
        flow,
        st.system,
        st.training_backend(),
        latest,
        cfg,
        counter,
        old_points=older,
        optimizer=opt,
    )
    save_flow(
        flow,
        flow_out,
        extra={
            "iteration": iteration,
            "config_hash": st.hash,
            "counters": counter.as_dict(),
            "backend": st["backend"],
        },
        optimizer=opt,
    )
    write_h5(
        train_out,
        "train",
        {
            "loss": np.asarray(hist.loss),
            "lr": np.asarray(hist.lr),
            "dropped": np.asarray(hist.dropped),
            "rejected_draws": np.asarray(hist.rejected_draws),
            "skipped_batches": np.asarray(hist.skipped_batches),
        },
        {"loss": "nat", "lr": "1", "dropped": "1", "rejected_draws": "1", "skipped_batches": "1"},
        st.provenance(iteration, cfg.seed),
        attrs={
            "energy_training": cfg.as_dict(),
            "backend": st["backend"],
            "n_latest": len(latest),
            "n_older": len(older),
        },
        counters=counter.as_dict(),
    )


def _labelled_indices(st: Settings, iteration: int, p: dict[str, Any]) -> torch.Tensor:
    train = p["split"] == 0
    if st["labels"]["relabel_all"]:
        return torch.nonzero(train).flatten()
    return torch.nonzero(train & (p["tag"] == iteration - 1)).flatten()


def sample(
    st: Settings, iteration: int, flow_in: Any, points_in: Any, shard: int, n_shards: int, out: Any
) -> None:
    """Flow draws (internal coordinates, log q, chirality flag) for one shard of the labelled points."""
    from .flows import load_flow
    from .training import draw

    if not 0 <= shard < n_shards:
        raise ValueError(f"shard {shard} is not in [0, {n_shards})")
    flow, _ = load_flow(flow_in)
    flow = flow.to(st.dtype)
    p = _read_points(points_in)
    idx = np.array_split(_labelled_indices(st, iteration, p).numpy(), n_shards)[shard]
    draws = int(st["labels"]["draws"])
    seed = stage_seed(st.seed, iteration, "sample", shard)
    s = p["s"][idx].to(st.dtype).repeat_interleave(draws, dim=0)
    gen = torch.Generator().manual_seed(seed)
    z, log_q, kept = [], [], []
    with torch.no_grad():
        for start_row in range(0, len(s), 4096):
            d = draw(flow, st.system, s[start_row : start_row + 4096], gen)
            z.append(d.z.to(torch.float64))
            log_q.append(d.log_q.to(torch.float64))
            kept.append(d.kept)
    n_int = st.system.n_internal
    write_h5(
        out,
        "samples",
        {
            "point_index": np.repeat(idx, draws),
            "z": torch.cat(z) if z else torch.zeros(0, n_int, dtype=torch.float64),
            "log_q": torch.cat(log_q) if log_q else torch.zeros(0, dtype=torch.float64),
            "kept": torch.cat(kept) if kept else torch.zeros(0, dtype=torch.bool),
        },
        {"point_index": "1", "z": "internal (nm, rad)", "log_q": "nat", "kept": "1"},
        st.provenance(iteration, seed),
        attrs={"shard": shard, "n_shards": n_shards, "draws_per_point": draws},
    )


def energy(st: Settings, samples_in: Any, shard: int, out: Any) -> None:
    """Reduced target log density ``log p̃ = −u(x(z)) + log|det|`` of the kept draws of one shard.

    ``CGFLOW_FAIL_SHARD=<j>`` in the environment makes shard ``j`` fail (for tests of reruns).
    """
    if (
        os.environ.get("CGFLOW_FAIL_SHARD", "") == str(shard)
        or st["energy"].get("fail_shard") == shard
    ):
        raise RuntimeError(
            f"failure injected into energy shard {shard} (CGFLOW_FAIL_SHARD / energy.fail_shard)"
        )
    d = read_h5(samples_in, "samples")
    z = torch.as_tensor(d["z"])
    kept = torch.as_tensor(d["kept"])
    e = st["energy"]
    kind = e.get("backend", "openmm")
    system = st.system
    opts: dict[str, Any] = {}
    if kind == "openmm":
        opts = {"platform": e.get("platform"), "n_workers": int(e.get("n_workers", 0))}
    elif kind == "torch":
        opts = {"dtype": getattr(torch, e.get("torch_dtype", "float64"))}
    log_p = torch.full((len(z),), float("nan"), dtype=torch.float64)
    u_kT = torch.full((len(z),), float("nan"), dtype=torch.float64)
    n_eval = int(kept.sum())
    if n_eval:
        x, log_det = system.to_cartesian(z[kept])
        backend = (
            system.energy_backend(kind, **opts) if kind != "analytic" else system.energy_backend()
        )
        try:
            u = torch.as_tensor(np.asarray(_detach(backend.energies(x))), dtype=torch.float64)
        finally:
            backend.close()
        u_kT[kept] = system.beta * u
        log_p[kept] = -system.beta * u + log_det.to(torch.float64)
    write_h5(
        out,
        "energies",
        {"log_p": log_p, "u_kT": u_kT, "valid": torch.isfinite(log_p)},
        {"log_p": "nat", "u_kT": "kT", "valid": "1"},
        st.provenance(int(d.attrs["iteration"]), int(d.attrs["seed"])),
        attrs={
            "shard": shard,
            "backend": kind,
            "backend_options": {k: str(v) for k, v in opts.items()},
            **job_environment(),
        },
        counters={"labels": n_eval},
    )


#: environment variables recorded with each energy shard (which devices and cluster job it saw)
JOB_ENVIRONMENT = ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", "SLURM_JOB_GPUS", "SLURM_GPUS")


def job_environment() -> dict[str, str]:
    """``env_<NAME>`` attributes for the variables of :data:`JOB_ENVIRONMENT` that are set."""
    env = {f"env_{k}": os.environ[k] for k in JOB_ENVIRONMENT if k in os.environ}
    print(f"job environment: {env or 'no scheduler or GPU variables set'}", flush=True)
    return env


def _detach(u: Any) -> Any:
    return u.detach().cpu().numpy() if hasattr(u, "detach") else u


def gather(
    st: Settings,
    iteration: int,
    points_in: Any,
    samples: list[Any],
    energies: list[Any],
    out: Any,
    previous_labels: Any = None,
) -> None:
    """PMF labels F(s) = −log mean w over a fixed number of draws per point (rejected = 0)."""
    from .free_energy import pmf_labels

    if len(samples) != len(energies):
        raise ValueError(f"{len(samples)} sample shards but {len(energies)} energy shards")
    p = _read_points(points_in)
    draws = int(st["labels"]["draws"])
    idx_all, lw_all = [], []
    for sp, ep in zip(samples, energies, strict=True):
        sd, ed = read_h5(sp, "samples"), read_h5(ep, "energies")
        if int(sd.attrs["shard"]) != int(ed.attrs["shard"]):
            raise ValueError(
                f"{sp} is shard {sd.attrs['shard']} but {ep} is shard {ed.attrs['shard']}"
            )
        lw = torch.as_tensor(ed["log_p"]) - torch.as_tensor(sd["log_q"])
        lw = torch.where(
            torch.as_tensor(sd["kept"]) & torch.isfinite(lw), lw, torch.full_like(lw, -math.inf)
        )
        idx_all.append(torch.as_tensor(sd["point_index"]))
        lw_all.append(lw)
    idx = torch.cat(idx_all)
    lw = torch.cat(lw_all)
    points = idx.reshape(-1, draws)[:, 0] if len(idx) else idx
    res = pmf_labels(lw.reshape(-1, draws), clip_top_k=int(st["labels"]["clip_top_k"]))
    s = p["s"][points]
    F, ess, n_valid = res.F_kT, res.ess, res.n_valid
    if previous_labels is not None and not st["labels"]["relabel_all"]:
        prev = read_h5(previous_labels, "labels")
        s = torch.cat([torch.as_tensor(prev["s"]), s])
        points = torch.cat([torch.as_tensor(prev["point_index"]), points])
        F = torch.cat([torch.as_tensor(prev["F_kT"]), F])
        ess = torch.cat([torch.as_tensor(prev["ess"]), ess])
        n_valid = torch.cat([torch.as_tensor(prev["n_valid"]), n_valid])
    write_h5(
        out,
        "labels",
        {"s": s, "point_index": points, "F_kT": F, "ess": ess, "n_valid": n_valid},
        {
            "s": "rad" if all(st.system.cg_spec.periodic) else "1",
            "point_index": "1",
            "F_kT": "kT",
            "ess": "1",
            "n_valid": "1",
        },
        st.provenance(iteration),
        attrs={"draws_per_point": draws, "clip_top_k": int(st["labels"]["clip_top_k"])},
    )


def ensemble(st: Settings, iteration: int, labels_in: Any, out: Any) -> None:
    from .campaign import EnsembleConfig, fit_ensemble

    d = read_h5(labels_in, "labels")
    e = EnsembleConfig(**{**st["ensemble"], "hidden": tuple(st["ensemble"]["hidden"])})
    seed = stage_seed(st.seed, iteration, "ensemble")
    ens = fit_ensemble(
        e,
        list(st.system.cg_spec.periodic),
        torch.as_tensor(d["s"]),
        torch.as_tensor(d["F_kT"]),
        seed,
    )
    with atomic_path(out) as tmp:
        ens.save(tmp)


def _write_walkers(
    st: Settings, iteration: int, out: Any, points: Any, stop_steps: Any, attrs: dict
) -> None:
    n_cg = st.system.cg_spec.dim
    write_h5(
        out,
        "walkers",
        {"points": np.asarray(points).reshape(-1, n_cg), "stop_steps": np.asarray(stop_steps)},
        {"points": "rad" if all(st.system.cg_spec.periodic) else "1", "stop_steps": "1"},
        st.provenance(iteration),
        attrs=attrs,
    )


def walkers(st: Settings, iteration: int, ensemble_in: Any, points_in: Any, out: Any) -> None:
    """CG walkers from the previous iteration's centres (first time: the minimum or walkers.start)."""
    from .free_energy import FreeEnergyEnsemble
    from .sampling import cg_walkers

    if st.grid_mode:  # no walkers: nothing is added, the run ends at max_iterations
        attrs = {"exhausted": False, "steps_used": 0, "n_walkers": 0, "grid_mode": True}
        _write_walkers(st, iteration, out, np.zeros(0), np.zeros(0, dtype=np.int64), attrs)
        return
    ens = FreeEnergyEnsemble.load(ensemble_in)
    p = _read_points(points_in)
    w = st["walkers"]
    if len(p["centres"]):
        starts = torch.as_tensor(p["centres"])
    elif w.get("start") is not None:
        starts = torch.tensor([w["start"]], dtype=torch.float64)
    else:
        x_min, _ = st.system.initial_configuration()
        starts = st.system.cg(torch.as_tensor(x_min[None], dtype=torch.float64))
    starts = starts.reshape(len(starts), -1)[torch.arange(w["n_walkers"]) % len(starts)]
    res = cg_walkers(
        ens.predict,
        starts,
        periodic=list(st.system.cg_spec.periodic),
        bounds=list(st.system.cg_spec.bounds),
        step_size=w["step_size"],
        threshold_kT=w["threshold_kT"],
        n_wanted=w["n_candidates"],
        max_steps=w["max_steps"],
        min_steps=w["min_steps"],
        beta=float(w.get("beta", 1.0)),
        seed=stage_seed(st.seed, iteration, "walkers"),
    )
    attrs = {
        "exhausted": bool(res.exhausted),
        "steps_used": int(res.steps_used),
        "n_walkers": w["n_walkers"],
    }
    _write_walkers(st, iteration, out, res.points, res.stop_steps, attrs)


def select(st: Settings, iteration: int, walkers_in: Any, points_in: Any, out: Any) -> None:
    """Farthest points among the stopped walkers, spread around each, split, appended."""
    from .sampling import farthest_point_selection, split_groups, split_points, spread

    d = read_h5(walkers_in, "walkers")
    p = _read_points(points_in)
    found = torch.as_tensor(d["points"])
    periodic = list(st.system.cg_spec.periodic)
    bounds = list(st.system.cg_spec.bounds)
    s, split, tag, group = p["s"], p["split"], p["tag"], p["group"]
    centres = found[:0]
    if len(found):
        n_sel = min(st["walkers"]["n_select"], len(found))
        centres = found[
            farthest_point_selection(
                found, n_sel, periodic, bounds, seed=stage_seed(st.seed, iteration, "select_fps")
            )
        ]
        sp = st["spreading"]
        new = spread(
            centres,
            sp["n_per_centre"],
            sp["radius"],
            kind=sp["kind"],
            periodic=periodic,
            bounds=bounds,
            seed=stage_seed(st.seed, iteration, "select_spread"),
        )
        groups = torch.arange(len(centres)).repeat_interleave(sp["n_per_centre"])
        seed = stage_seed(st.seed, iteration, "select_split")
        if len(centres) >= 2:
            _, te = split_groups(groups, sp["test_fraction"], seed=seed)
        else:
            _, te = split_points(len(new), sp["test_fraction"], seed=seed)
        new_split = torch.zeros(len(new), dtype=torch.int64)
        new_split[te] = 1
        s = torch.cat([s, new.to(s.dtype)])
        split = torch.cat([split, new_split])
        tag = torch.cat([tag, torch.full((len(new),), iteration, dtype=torch.int64)])
        group = torch.cat([group, int(group.max()) + 1 + groups if len(group) else groups])
    _write_points(st, out, iteration, s, split, tag, group, centres.numpy())


def check(
    st: Settings,
    iteration: int,
    walkers_in: Any,
    metrics_in: Any,
    out: Any,
    max_iterations: int | None = None,
    stop_metric: str | None = None,
    stop_threshold: float | None = None,
) -> dict[str, Any]:
    """Converged? Walkers exhausted (no ground truth needed), metric threshold, or max iterations.

    The stop settings come as arguments (the workflow keeps them out of the config snapshot so
    a campaign can be extended); missing ones are read from the configuration.
    """
    d = read_h5(walkers_in, "walkers")
    metrics = json.loads(Path(metrics_in).read_text())
    stop = dict(st.cfg.get("stop") or {})
    if stop_metric is not None:
        stop = {"metric": stop_metric, "threshold": stop_threshold}
    if max_iterations is None:
        max_iterations = int(st.cfg.get("max_iterations", 10**9))
    status = {"iteration": iteration, "converged": False, "reason": "continue"}
    if d.attrs["exhausted"] and len(d["points"]) == 0:
        status.update(converged=True, reason="walkers exhausted")
    elif stop.get("metric") and metrics.get(stop["metric"], math.inf) < stop["threshold"]:
        status.update(converged=True, reason=f"{stop['metric']} < {stop['threshold']}")
    elif iteration >= max_iterations:
        status.update(converged=True, reason="max iterations")
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(status, indent=1))
    return status


# ---------------------------------------------------------------------------------- evaluation
def evaluate(
    st: Settings, iteration: int, ensemble_in: Any, points_in: Any, metrics_out: Any, plot_out: Any
) -> dict[str, Any]:
    """Metrics of the ensemble mean (against ground truth where the system has one) and a plot."""
    from .free_energy import FreeEnergyEnsemble
    from .plots import iteration_plot

    ens = FreeEnergyEnsemble.load(ensemble_in)
    p = _read_points(points_in)
    system = st.system
    metrics: dict[str, Any] = {
        "iteration": iteration,
        "n_train_points": int((p["split"] == 0).sum()),
        "n_test_points": int((p["split"] == 1).sum()),
    }
    reference = _reference(system)
    if system.name == "mueller_brown":
        from .campaign import mueller_brown_evaluator

        metrics.update(mueller_brown_evaluator()(ens, system))
    elif reference is not None:
        from .metrics import aldp_evaluation

        metrics.update(aldp_evaluation(ens.predict, reference))
    with atomic_path(metrics_out) as tmp:
        tmp.write_text(json.dumps(metrics, indent=1, sort_keys=True))
    with atomic_path(plot_out) as tmp:
        iteration_plot(
            tmp,
            system,
            ens.predict,
            p["s"][p["split"] == 0].numpy(),
            p["centres"],
            None if reference is None else reference["counts_std100"],
            f"{st.cfg.get('campaign', '')}: {system.name}, iteration {iteration}",
        )
    return metrics


def _reference(system: Any) -> Any:
    """The shipped ground truth of a system (alanine dipeptide, implicit solvent, at the
    reference's temperature), or None."""
    from .reference import ALDP_REFERENCE, load_reference

    if system.name != "alanine_dipeptide" or not ALDP_REFERENCE.exists():
        return None
    ref = load_reference()
    if not math.isclose(system.kT, float(ref.attrs["kT_kJ_per_mol"]), rel_tol=1e-6):
        return None
    return ref


# ------------------------------------------------------------------------------------ backmap
def backmap(
    st: Settings,
    flow_in: Any,
    points_rad: dict[str, list[float]],
    n_structures: int,
    out_dir: Any,
) -> dict[str, Any]:
    """All-atom structures of the flow at named CG points: ``<name>.pdb`` (topology + first
    frame) and ``<name>.dcd`` (all kept draws) in ``out_dir``, and ``backmap.json``."""
    from .backmap import backmap_point, mdtraj_topology, write_trajectory
    from .flows import load_flow

    for name in points_rad:
        if not name.replace("_", "").isalnum():
            raise ValueError(f"backmap point name {name!r}: use letters, digits and _ only")
    topology = mdtraj_topology(st.system)
    flow, extra = load_flow(flow_in)
    flow = flow.to(st.dtype)
    iteration = int(extra.get("iteration", 0))
    seed = stage_seed(st.seed, iteration, "backmap")
    gen = torch.Generator().manual_seed(seed)
    out = Path(out_dir)
    info: dict[str, Any] = {
        "flow": str(flow_in),
        "iteration": iteration,
        "seed": seed,
        "config_hash": st.hash,
        "energy_evaluations": 0,
        "points": {},
    }
    for name, s in points_rad.items():
        b = backmap_point(flow, st.system, s, n_structures, gen)
        write_trajectory(b.x_nm, topology, out / f"{name}.pdb", out / f"{name}.dcd")
        info["points"][name] = {
            "s_rad": list(b.s),
            "n_structures": len(b.x_nm),
            "n_drawn": b.n_drawn,
            "kept_fraction": len(b.x_nm) / b.n_drawn,
        }
        print(f"backmap {name}: {len(b.x_nm)} structures from {b.n_drawn} draws", flush=True)
    with atomic_path(out / "backmap.json") as tmp:
        tmp.write_text(json.dumps(info, indent=1, sort_keys=True))
    return info


def summary(
    st: Settings,
    campaign_dir: Any,
    last_iteration: int,
    out: Any,
    plot_out: Any = None,
    baselines: Any = None,
) -> Any:
    """One row per iteration: metrics, points, energy evaluations by kind, cumulative N, wall
    times; with ``plot_out``, also the convergence curves (metrics vs N), with the curves of a
    ``baselines`` points CSV if given."""
    import pandas as pd

    from .energy.counting import COUNTED_KINDS, UNCOUNTED_KINDS

    root = Path(campaign_dir)
    rows = []
    cumulative: dict[str, int] = dict.fromkeys(COUNTED_KINDS + UNCOUNTED_KINDS, 0)
    for k in range(last_iteration + 1):
        it = root / f"iter_{k:03d}"
        counts: dict[str, int] = dict.fromkeys(COUNTED_KINDS + UNCOUNTED_KINDS, 0)
        files = (
            [it / "start.h5"]
            if k == 0
            else [it / "train.h5", *sorted((it / "energies").glob("shard_*.h5"))]
        )
        for f in files:
            kind = (
                "start" if f.name == "start.h5" else "train" if f.name == "train.h5" else "energies"
            )
            for key, n in read_h5(f, kind, datasets=[]).counters.items():
                counts[key] = counts.get(key, 0) + n
        for key, n in counts.items():
            cumulative[key] = cumulative.get(key, 0) + n
        row: dict[str, Any] = {"iteration": k}
        if k > 0:
            row.update(
                {
                    f"metric_{m}": v
                    for m, v in json.loads((it / "metrics.json").read_text()).items()
                    if m != "iteration"
                }
            )
            status = json.loads((it / "status.json").read_text())
            row["converged"] = status["converged"]
            row["reason"] = status["reason"]
        pts = _read_points(it / "points.h5")
        row["n_train_points"] = int((pts["split"] == 0).sum())
        row["n_test_points"] = int((pts["split"] == 1).sum())
        row.update({f"evals_{key}": n for key, n in counts.items()})
        row.update({f"cum_evals_{key}": n for key, n in cumulative.items()})
        row["N"] = sum(cumulative[key] for key in COUNTED_KINDS)
        row.update(_wall_times(root / "benchmarks", k))
        rows.append(row)
    df = pd.DataFrame(rows)
    with atomic_path(out) as tmp:
        df.to_csv(tmp, index=False)
    if plot_out is not None:
        from .plots import convergence

        base = pd.read_csv(baselines) if baselines else None
        with atomic_path(plot_out) as tmp:
            convergence(tmp, df, f"{st.cfg.get('campaign', '')}: {st['system']['name']}", base)
    return df


def _wall_times(bench_dir: Path, iteration: int) -> dict[str, float]:
    """Seconds per rule of one iteration from Snakemake's benchmark files (if present)."""
    out: dict[str, float] = {}
    if not bench_dir.exists():
        return out
    tag = f"iter_{iteration:03d}"
    for f in sorted(bench_dir.rglob(f"*{tag}*.tsv")):
        rule = f.relative_to(bench_dir).parts[0]
        try:
            lines = f.read_text().splitlines()
            seconds = float(lines[1].split("\t")[0])
        except (IndexError, ValueError):
            continue
        out[f"seconds_{rule}"] = out.get(f"seconds_{rule}", 0.0) + seconds
    return out


def speedup(st: Settings, summary_in: Any, baselines_in: Any, out: Any, out_md: Any) -> Any:
    """The campaign against the shipped baselines: evaluations to reach each target, ratios
    (:func:`cgflow.baselines.campaign_speedup`), as CSV and Markdown."""
    from .baselines import campaign_speedup, markdown_table

    table, _ = campaign_speedup(summary_in, baselines_in)
    with atomic_path(out) as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(out_md) as tmp:
        tmp.write_text(markdown_table(table))
    return table
