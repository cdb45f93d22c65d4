"""Fine-tuning by energy (reverse KL) at the CG points of iteration k − 1 (``flow.pt``) and its
history with the evaluations it made (``train.h5``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .. import config as cfgmod
from ..data import write_h5
from ..energy.counting import EvaluationCounter
from .points import TRAIN, read_points
from .settings import Settings, check_given


def populated(st: Settings, ensemble_in: Any, s: torch.Tensor) -> torch.Tensor:
    """Which of the points ``s`` the ensemble predicts within ``labels.populated_kT`` of its
    lowest prediction over them."""
    from ..free_energy import FreeEnergyEnsemble, populated

    mean, _ = FreeEnergyEnsemble.load(ensemble_in).predict(s)
    return populated(mean, st["labels"]["populated_kT"])


def old_point_weights(
    st: Settings, labels_in: Any, older: torch.Tensor, mass: torch.Tensor | None = None
) -> torch.Tensor:
    """Training weights of the old points ``older`` (point indices) from their log-weight gap
    in ``labels_in`` (:func:`cgflow.training.priority_weights`; points without one: the median).
    ``mass`` (bool per old point): only these are weighted by their gap, the others as a gap of
    1 nat (``priority.kind: populated_gap``)."""
    from ..training import priority_weights
    from .labels import read_labels

    lab = read_labels(labels_in)
    if "log_w_gap_iteration" not in lab:
        raise ValueError(
            f"{labels_in} has no log_w_gap_iteration (written by an older cgflow): "
            "energy_training.priority.kind gap needs labels gathered with it"
        )
    gap = torch.full((len(older),), float("nan"), dtype=torch.float64)
    row = {int(i): r for r, i in enumerate(lab["point_index"])}
    for r, i in enumerate(older.tolist()):
        if i in row:
            gap[r] = lab["log_w_gap_iteration"][row[i]]
    pr = st["energy_training"]["priority"]
    weights = priority_weights(gap, pr["cap_nat"], pr["power"])
    if mass is not None:
        weights = torch.where(mass, weights, torch.ones_like(weights))
    return weights


def finetune(
    st: Settings,
    iteration: int,
    flow_in: Any,
    points_in: Any,
    flow_out: Any,
    train_out: Any,
    ensemble_in: Any = None,
    labels_in: Any = None,
) -> None:
    """Reverse-KL training on the points added in iteration k−1 plus a fraction of older ones
    (with ``energy_training.focus_populated``: only those ``ensemble_in``, iteration k − 1's,
    predicts populated; with ``energy_training.priority.kind: gap`` the older ones weighted by
    their log-weight gap in ``labels_in``, iteration k − 1's; ``populated_gap``: only those the
    ensemble predicts populated)."""
    from ..flows import load_flow, load_optimizer, save_flow
    from ..training import EnergyConfig, train_by_energy

    et = st["energy_training"]
    focus = cfgmod.focuses_training(st.cfg, iteration)
    setting = (
        f"energy_training.focus_populated {et['focus_populated']} and "
        f"energy_training.priority.kind {et['priority']['kind']!r}"
    )
    needs_ensemble = cfgmod.trains_with_ensemble(st.cfg, iteration)
    check_given(iteration, needs_ensemble, ensemble_in is not None, setting, "ensemble")
    prioritize = cfgmod.prioritizes_training(st.cfg, iteration)
    setting = f"energy_training.priority.kind {et['priority']['kind']!r}"
    check_given(iteration, prioritize, labels_in is not None, setting, "labels")
    flow, _ = load_flow(flow_in)
    flow = flow.to(st.dtype)
    p = read_points(points_in)
    train = p["split"] == TRAIN
    # grid mode: no points are ever added, every iteration trains on the whole grid
    newest = iteration - 1 if not st.grid_mode else int(p["tag"].max())
    is_latest = train & (p["tag"] == newest)
    is_older = train & (p["tag"] < newest)
    if focus:
        keep = populated(st, ensemble_in, p["s"])
        if bool((is_latest & keep).any()):
            is_latest, is_older = is_latest & keep, is_older & keep
    latest = p["s"][is_latest].to(st.dtype)
    older = p["s"][is_older].to(st.dtype)
    weights = None
    if prioritize:
        mass = None
        if et["priority"]["kind"] == "populated_gap":
            mass = populated(st, ensemble_in, p["s"][is_older])
        weights = old_point_weights(st, labels_in, torch.nonzero(is_older).flatten(), mass)
    section = st["energy_training"]["first" if iteration == 1 else "later"]
    cfg = EnergyConfig(**section, seed=st.stage_seed(iteration, "finetune"))
    counter = EvaluationCounter()
    torch.manual_seed(cfg.seed)
    opt = load_optimizer(flow_in, flow, cfg.lr)  # Adam moments carry over between iterations
    with st.training_backend(counter) as backend:
        hist = train_by_energy(
            flow,
            st.system,
            backend,
            latest,
            cfg,
            counter,
            old_points=older,
            optimizer=opt,
            old_weights=weights,
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
            "focus_populated": focus,
            "priority": et["priority"]["kind"] if prioritize else "uniform",
        },
        counters=counter.as_dict(),
    )
