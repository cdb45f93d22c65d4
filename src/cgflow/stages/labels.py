"""PMF labels of iteration k: flow draws at the labelled points of k − 1 (``samples/``), their
exact energies in shards (``energies/``, one GPU job each) and the labels
F(s) = −log (1/D) Σ w over D draws per point with their ESS (``labels.h5``)."""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch

from .. import config as cfgmod
from ..data import read_h5, write_h5
from ..energy.counting import EvaluationCounter
from ..free_energy import WeightSums
from .points import read_points
from .settings import Settings, check_given

#: environment variables recorded with each energy shard (which devices and cluster job it saw)
JOB_ENVIRONMENT = ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", "SLURM_JOB_GPUS", "SLURM_GPUS")


def labelled_indices(st: Settings, iteration: int, p: dict[str, Any]) -> torch.Tensor:
    """Points labelled in ``iteration`` (training and held-out): all of them, or those added in
    iteration k − 1 (:func:`cgflow.config.relabels_all`)."""
    if cfgmod.relabels_all(st.cfg):
        return torch.arange(len(p["s"]))
    return torch.nonzero(p["tag"] == iteration - 1).flatten()


def draw_counts(
    st: Settings,
    iteration: int,
    p: dict[str, Any],
    idx: np.ndarray,
    ensemble_in: Any,
    labels_in: Any,
) -> np.ndarray:
    """Draws of each labelled point ``idx``: ``labels.draws`` each, or with ``labels.allocate``
    (from iteration 2) as :func:`cgflow.free_energy.allocate_draws` decides from iteration
    k − 1's ensemble and labels."""
    lab = st["labels"]
    draws = int(lab["draws"])
    allocating = cfgmod.allocates_draws(st.cfg, iteration)
    given = ensemble_in is not None and labels_in is not None
    setting = f"labels.allocate {lab['allocate']}"
    check_given(iteration, allocating, given, setting, "ensemble and labels")
    if not allocating:
        return np.full(len(idx), draws, dtype=np.int64)
    from ..free_energy import FreeEnergyEnsemble, allocate_draws

    F_pred, _ = FreeEnergyEnsemble.load(ensemble_in).predict(p["s"][idx])
    prev = _previous_sums(read_labels(labels_in), torch.as_tensor(idx))
    counts = allocate_draws(
        F_pred,
        prev.labels().se_kT,
        prev.n_draws,
        budget=draws * len(idx),
        draws=draws,
        target_se_kT=lab["target_se_kT"],
        min_draws=lab["min_draws"],
        max_draws=lab["max_draws"],
        populated_kT=lab["populated_kT"],
        rule=lab["allocation"],
    )
    return counts.numpy()


def shard_points(counts: np.ndarray, n_shards: int) -> np.ndarray:
    """Shard of each point: consecutive points, about the same number of draws per shard."""
    before = np.cumsum(counts) - counts
    total = max(int(counts.sum()), 1)
    return np.minimum(before * n_shards // total, n_shards - 1)


def sample(
    st: Settings,
    iteration: int,
    flow_in: Any,
    points_in: Any,
    shard: int,
    n_shards: int,
    out: Any,
    ensemble_in: Any = None,
    labels_in: Any = None,
) -> None:
    """Flow draws (internal coordinates, log q, chirality flag) for one shard of the labelled
    points; ``ensemble_in``, ``labels_in``: iteration k − 1's, for ``labels.allocate``."""
    from ..flows import load_flow
    from ..training import label_draws

    if not 0 <= shard < n_shards:
        raise ValueError(f"shard {shard} is not in [0, {n_shards})")
    flow, _ = load_flow(flow_in)
    flow = flow.to(st.dtype)
    p = read_points(points_in)
    idx = labelled_indices(st, iteration, p).numpy()
    counts = draw_counts(st, iteration, p, idx, ensemble_in, labels_in)
    mine = shard_points(counts, n_shards) == shard
    idx, counts = idx[mine], counts[mine]
    seed = st.stage_seed(iteration, "sample", shard)
    d = label_draws(
        flow, st.system, p["s"][idx], torch.as_tensor(counts), torch.Generator().manual_seed(seed)
    )
    write_h5(
        out,
        "samples",
        {"point_index": np.repeat(idx, counts), "z": d.z, "log_q": d.log_q, "kept": d.kept},
        {"point_index": "1", "z": "internal (nm, rad)", "log_q": "nat", "kept": "1"},
        st.provenance(iteration, seed),
        attrs={
            "shard": shard,
            "n_shards": n_shards,
            "draws_per_point": int(st["labels"]["draws"]),
            "allocated": cfgmod.allocates_draws(st.cfg, iteration),
        },
    )


def job_environment() -> dict[str, str]:
    """``env_<NAME>`` attributes for the variables of :data:`JOB_ENVIRONMENT` that are set."""
    env = {f"env_{k}": os.environ[k] for k in JOB_ENVIRONMENT if k in os.environ}
    print(f"job environment: {env or 'no scheduler or GPU variables set'}", flush=True)
    return env


def energy(st: Settings, samples_in: Any, shard: int, out: Any) -> None:
    """Reduced target log density ``log p̃ = −u(x(z)) + log|det|`` of the kept draws of one shard."""
    from ..training import label_log_target

    d = read_h5(samples_in, "samples")
    if int(d.attrs["shard"]) != shard:
        raise ValueError(f"{samples_in} holds shard {d.attrs['shard']}, not shard {shard}")
    counter = EvaluationCounter()
    backend, opts = st.label_backend(counter)
    with backend:
        log_p, u_kT = label_log_target(
            st.system, torch.as_tensor(d["z"]), torch.as_tensor(d["kept"]), backend
        )
    write_h5(
        out,
        "energies",
        {"log_p": log_p, "u_kT": u_kT, "valid": torch.isfinite(log_p)},
        {"log_p": "nat", "u_kT": "kT", "valid": "1"},
        st.provenance(int(d.attrs["iteration"]), int(d.attrs["seed"])),
        attrs={
            "shard": shard,
            "backend": st["energy"]["backend"],
            "backend_options": {k: str(v) for k, v in opts.items()},
            **job_environment(),
        },
        counters=counter.as_dict(),
    )


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
    from ..free_energy import log_weight_gap, pmf_labels
    from ..training import log_weights

    if len(samples) != len(energies):
        raise ValueError(f"{len(samples)} sample shards but {len(energies)} energy shards")
    lab = st["labels"]
    setting = f"labels.relabel_all {lab['relabel_all']} and labels.pool_draws {lab['pool_draws']}"
    needed = cfgmod.needs_previous_labels(st.cfg, iteration)
    check_given(iteration, needed, previous_labels is not None, setting, "labels file")
    p = read_points(points_in)
    draws = int(st["labels"]["draws"])
    idx_all, lw_all = [], []
    for sp, ep in zip(samples, energies, strict=True):
        sd, ed = read_h5(sp, "samples"), read_h5(ep, "energies")
        if int(sd.attrs["shard"]) != int(ed.attrs["shard"]):
            raise ValueError(
                f"{sp} is shard {sd.attrs['shard']} but {ep} is shard {ed.attrs['shard']}"
            )
        lw_all.append(log_weights(ed["log_p"], sd["log_q"], sd["kept"]))
        idx_all.append(torch.as_tensor(sd["point_index"]))
    idx, lw = torch.cat(idx_all), torch.cat(lw_all)
    points, row = torch.unique(idx, return_inverse=True)
    wanted = labelled_indices(st, iteration, p)
    if not torch.equal(points, wanted):
        raise ValueError(
            f"iteration {iteration}: the shards drew for {len(points)} points but "
            f"{len(wanted)} are to be labelled (a shard of another plan?)"
        )
    clip = int(st["labels"]["clip_top_k"])
    fresh = WeightSums.from_draws(row, lw, len(points))
    sums = fresh
    if previous_labels is not None and cfgmod.pools_draws(st.cfg):
        sums = fresh + _previous_sums(read_labels(previous_labels), points)
    # clipping biases the labels (never with pooled draws; the stored sums stay unclipped)
    if clip:
        if not bool((fresh.n_draws == draws).all()):
            raise ValueError("labels.clip_top_k needs the same number of draws at every point")
        res = pmf_labels(lw[torch.argsort(row, stable=True)].reshape(-1, draws), clip_top_k=clip)
    else:
        res = sums.labels()
    new = {
        "s": p["s"][points],
        "point_index": points,
        "split": p["split"][points],
        "F_kT": res.F_kT,
        "se_kT": res.se_kT,
        "ess": res.ess,
        "n_valid": res.n_valid,
        "n_draws": sums.n_draws,
        "log_sum_w": sums.log_sum_w,
        "log_sum_w2": sums.log_sum_w2,
        "ess_iteration": fresh.labels().ess,
        "n_draws_iteration": fresh.n_draws,
        "log_w_gap_iteration": log_weight_gap(row, lw, len(points)),
    }
    if previous_labels is not None and not cfgmod.pools_draws(st.cfg):  # carried over
        prev = read_labels(previous_labels)
        if "log_w_gap_iteration" not in prev:
            prev["log_w_gap_iteration"] = torch.full_like(prev["F_kT"], math.nan)
        new = {k: torch.cat([prev[k], v]) for k, v in new.items()}
    write_h5(
        out,
        "labels",
        new,
        {**LABEL_UNITS, "s": st.cg_units},
        st.provenance(iteration),
        attrs={
            "draws_per_point": draws,
            "clip_top_k": clip,
            "pool_draws": cfgmod.pools_draws(st.cfg),
        },
    )


#: datasets of a labels file and their units (``s``: the CG units of the system)
LABEL_UNITS = {
    "s": "",
    "point_index": "1",
    "split": "1",
    "F_kT": "kT",
    "se_kT": "kT",
    "ess": "1",
    "n_valid": "1",
    "n_draws": "1",
    "log_sum_w": "nat",
    "log_sum_w2": "nat",
    "ess_iteration": "1",
    "n_draws_iteration": "1",
    "log_w_gap_iteration": "nat",
}


def _previous_sums(prev: dict[str, torch.Tensor], points: torch.Tensor) -> WeightSums:
    """The running sums of ``prev`` at ``points`` (zero draws for points it does not have)."""
    n = len(points)
    log_w = torch.full((n,), -math.inf, dtype=torch.float64)
    log_w2, n_draws, n_valid = (
        log_w.clone(),
        torch.zeros(n, dtype=torch.int64),
        torch.zeros(n, dtype=torch.int64),
    )
    row = {int(i): r for r, i in enumerate(prev["point_index"])}
    missing = set(row) - {int(i) for i in points}
    if missing:
        raise ValueError(
            f"pooled labels: points {sorted(missing)[:5]} of the previous labels were not drawn again"
        )
    for r, i in enumerate(points.tolist()):
        if i in row:
            j = row[i]
            log_w[r], log_w2[r] = prev["log_sum_w"][j], prev["log_sum_w2"][j]
            n_draws[r], n_valid[r] = prev["n_draws"][j], prev["n_valid"][j]
    return WeightSums(log_w, log_w2, n_draws, n_valid)


def read_labels(path: Any) -> dict[str, torch.Tensor]:
    """The datasets of a labels file as tensors (``log_w_gap_iteration`` only where the file
    has it: labels written before it existed lack it)."""
    d = read_h5(path, "labels")
    return {
        k: torch.as_tensor(d[k]) for k in LABEL_UNITS if k in d.arrays or k != "log_w_gap_iteration"
    }
