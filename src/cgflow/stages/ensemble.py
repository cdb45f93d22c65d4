"""The free-energy ensemble of iteration k (``ensemble.pt``), fitted to the training labels."""

from __future__ import annotations

from typing import Any

from ..data import atomic_path
from .labels import read_labels
from .points import TRAIN
from .settings import Settings


def ensemble(st: Settings, iteration: int, labels_in: Any, out: Any) -> None:
    """Fit the ensemble to the labels of the training points (held-out labels stay out)."""
    from ..free_energy import fit_ensemble

    d = read_labels(labels_in)
    train = d["split"] == TRAIN
    ens = fit_ensemble(
        st["ensemble"],
        list(st.system.cg_spec.periodic),
        d["s"][train],
        d["F_kT"][train],
        st.stage_seed(iteration, "ensemble"),
        d["se_kT"][train],
    )
    with atomic_path(out) as tmp:
        ens.save(tmp)
