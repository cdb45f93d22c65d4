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
from .settings import Settings


def populated(st: Settings, ensemble_in: Any, s: torch.Tensor) -> torch.Tensor:
    """Which of the points ``s`` the ensemble predicts within ``labels.populated_kT`` of its
    lowest prediction over them."""
    from ..free_energy import FreeEnergyEnsemble, populated

    mean, _ = FreeEnergyEnsemble.load(ensemble_in).predict(s)
    return populated(mean, st["labels"]["populated_kT"])


def finetune(
    st: Settings,
    iteration: int,
    flow_in: Any,
    points_in: Any,
    flow_out: Any,
    train_out: Any,
    ensemble_in: Any = None,
) -> None:
    """Reverse-KL training on the points added in iteration k−1 plus a fraction of older ones
    (with ``energy_training.focus_populated``: only those ``ensemble_in``, iteration k − 1's,
    predicts populated)."""
    from ..flows import load_flow, load_optimizer, save_flow
    from ..training import EnergyConfig, train_by_energy

    focus = cfgmod.focuses_training(st.cfg, iteration)
    if focus != (ensemble_in is not None):
        raise ValueError(
            f"iteration {iteration}: with energy_training.focus_populated "
            f"{st['energy_training']['focus_populated']} the previous ensemble must "
            f"{'' if focus else 'not '}be given"
        )
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
    section = st["energy_training"]["first" if iteration == 1 else "later"]
    cfg = EnergyConfig(**section, seed=st.stage_seed(iteration, "finetune"))
    counter = EvaluationCounter()
    torch.manual_seed(cfg.seed)
    opt = load_optimizer(flow_in, flow, cfg.lr)  # Adam moments carry over between iterations
    with st.training_backend(counter) as backend:
        hist = train_by_energy(
            flow, st.system, backend, latest, cfg, counter, old_points=older, optimizer=opt
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
        },
        counters=counter.as_dict(),
    )
