"""Evaluation of iteration k (``metrics.json``, ``pmf.png``): the ensemble against the
configured system's ground truth, and the held-out label error.

Ground truth by system: alanine dipeptide — the shipped replica-exchange reference (at its
temperature); Müller–Brown — its exact PMF at the configured β and bounds; any analytic
system — ``evaluation.reference_csv`` if given, else the exact PMF by quadrature over
``evaluation.fg_range``; otherwise only the label and ensemble figures.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from ..data import atomic_path
from .labels import read_labels
from .points import HELD_OUT, TRAIN, read_points
from .settings import Settings


def cg_grid(system: Any, bins: int) -> np.ndarray:
    """Bin centres ``[bins^d, d]`` over the system's CG bounds."""
    axes = [lo + (np.arange(bins) + 0.5) * (hi - lo) / bins for lo, hi in system.cg_spec.bounds]
    mesh = np.meshgrid(*axes, indexing="ij")
    return np.stack([m.reshape(-1) for m in mesh], axis=1)


def read_reference_csv(path: Any, names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """CG points and F (kT) of a reference CSV with one column per CG coordinate (named as the
    system names them) and ``F_kT``."""
    import pandas as pd

    df = pd.read_csv(path)
    missing = [c for c in (*names, "F_kT") if c not in df.columns]
    if missing:
        raise ValueError(
            f"reference CSV {path}: missing column(s) {missing}; need {[*names, 'F_kT']}"
        )
    s, f = df[list(names)].to_numpy(np.float64), df["F_kT"].to_numpy(np.float64)
    if not (np.isfinite(s).all() and np.isfinite(f).all()) or len(f) < 2:
        raise ValueError(f"reference CSV {path}: needs at least two rows of finite values")
    return s, f


def exact_pmf(st: Settings) -> tuple[np.ndarray, np.ndarray] | None:
    """``(points, F_kT)`` of the configured system's exact PMF, or None where there is none."""
    from ..systems import AnalyticSystem

    system, ev = st.system, st["evaluation"]
    if ev["reference_csv"]:
        return read_reference_csv(ev["reference_csv"], system.cg_spec.names)
    if not isinstance(system, AnalyticSystem):
        return None
    grid = cg_grid(system, ev["bins"])
    if hasattr(system, "exact_pmf"):  # Müller–Brown: adaptive quadrature at the configured β
        return grid, system.exact_pmf(grid[:, 0])
    if ev["fg_range"] is None:
        return None
    return grid, system.quadrature_pmf(grid, ev["fg_range"], ev["quadrature_points"])


def aldp_reference(system: Any) -> Any:
    """The shipped ground truth of alanine dipeptide at the system's temperature, or None."""
    from ..reference import ALDP_REFERENCE, load_reference

    if system.name != "alanine_dipeptide" or not ALDP_REFERENCE.exists():
        return None
    ref = load_reference()
    if not math.isclose(system.kT, float(ref.attrs["kT_kJ_per_mol"]), rel_tol=1e-6):
        return None
    return ref


def label_quality(
    predict: Any, labels: dict[str, Any], max_F_kT: float, populated_kT: float
) -> dict[str, float]:
    """Median ESS of the labels; the flow's efficiency ``flow_ess_fraction``, the median over
    populated points (ensemble mean within ``populated_kT`` of its lowest value over the
    labelled points) of this iteration's ESS / draws; the median standard error of the labels
    there (``label_se_populated_kT``); and the RMSE of the ensemble mean against the held-out
    labels within ``max_F_kT`` of the lowest training label (NaN without such labels)."""
    import torch

    from ..free_energy import populated

    F, split = labels["F_kT"], labels["split"]
    finite = torch.isfinite(F)
    train = finite & (split == TRAIN)
    low = float(F[train].min()) if bool(train.any()) else math.nan
    held = finite & (split == HELD_OUT) & (F <= low + max_F_kT)
    out = {
        "label_ess_median": float(labels["ess"].to(torch.float64).median()) if len(F) else math.nan,
        "heldout_rmse_kT": math.nan,
        "n_heldout_labels": int(held.sum()),
        "flow_ess_fraction": math.nan,
        "label_se_populated_kT": math.nan,
    }
    if not len(F):
        return out
    with torch.no_grad():
        mean, _ = predict(labels["s"])
    mean = mean.to(torch.float64)
    if bool(held.any()):
        out["heldout_rmse_kT"] = float(torch.sqrt(((mean[held] - F[held]) ** 2).mean()))
    mass = populated(mean, populated_kT) & (labels["n_draws_iteration"] > 0)
    if bool(mass.any()):
        frac = labels["ess_iteration"].to(torch.float64) / labels["n_draws_iteration"]
        out["flow_ess_fraction"] = float(frac[mass].median())
        out["label_se_populated_kT"] = float(labels["se_kT"][mass].median())
    return out


def evaluate(
    st: Settings,
    iteration: int,
    ensemble_in: Any,
    points_in: Any,
    labels_in: Any,
    metrics_out: Any,
    plot_out: Any,
) -> dict[str, Any]:
    """Metrics of the ensemble mean against the system's ground truth (where it has one), the
    held-out label error, and the PMF plot."""
    from ..free_energy import FreeEnergyEnsemble
    from ..metrics import aldp_evaluation, exact_pmf_metrics, grid_values
    from ..plots import iteration_plot

    ens = FreeEnergyEnsemble.load(ensemble_in)
    p = read_points(points_in)
    system = st.system
    metrics: dict[str, Any] = {
        "iteration": iteration,
        "n_train_points": int((p["split"] == TRAIN).sum()),
        "n_test_points": int((p["split"] == HELD_OUT).sum()),
    }
    metrics.update(
        label_quality(
            ens.predict,
            read_labels(labels_in),
            st["evaluation"]["max_F_kT"],
            st["labels"]["populated_kT"],
        )
    )
    reference = aldp_reference(system)
    exact = exact_pmf(st)
    if exact is not None:
        mean, std = grid_values(ens.predict, exact[0])
        metrics.update(exact_pmf_metrics(mean, exact[1], std, st["evaluation"]["max_F_kT"]))
    elif reference is not None:
        metrics.update(aldp_evaluation(ens.predict, reference))
    with atomic_path(metrics_out) as tmp:
        tmp.write_text(json.dumps(metrics, indent=1, sort_keys=True))
    with atomic_path(plot_out) as tmp:
        iteration_plot(
            tmp,
            system,
            ens.predict,
            p["s"][p["split"] == TRAIN].numpy(),
            p["centres"],
            None if reference is None else reference["counts_std100"],
            f"{st['campaign']}: {system.name}, iteration {iteration}",
        )
    return metrics
