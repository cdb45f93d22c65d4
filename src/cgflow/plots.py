"""Figures of a campaign (matplotlib, Agg backend): PMF maps and profiles per iteration, and the
convergence curves of ``summary.csv``.

The panel functions take plain arrays (free energies in kT, angles in rad) and write one PNG;
:func:`iteration_plot` evaluates an ensemble on the right grid for a system and picks the panels.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from .metrics import GRIDS, free_energy_from_counts, grid_values

#: colour scales of free energies are capped here (kT)
F_CAP_KT = 15.0
#: colour scale of model − reference differences: ± this (kT)
DIFF_CAP_KT = 3.0
#: colour scale of the ensemble std: 0 to this (kT)
STD_CAP_KT = 3.0


def _save(fig: Any, path: str | os.PathLike) -> None:
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def _overlay_points(ax: Any, points: np.ndarray | None, centres: np.ndarray | None) -> None:
    if points is not None and len(points):
        ax.scatter(points[:, 0], points[:, 1], s=2, c="w", edgecolors="none", alpha=0.6)
    if centres is not None and len(centres):
        ax.scatter(centres[:, 0], centres[:, 1], s=30, c="r", marker="x", label="centres")


def _map(ax: Any, F: np.ndarray, extent: Sequence[float], label: str, **kw: Any) -> None:
    im = ax.imshow(np.ma.masked_invalid(F).T, origin="lower", extent=extent, aspect="auto", **kw)
    ax.figure.colorbar(im, ax=ax, label=label)


def aligned_difference(F_model_kT: np.ndarray, F_ref_kT: np.ndarray) -> np.ndarray:
    """Model − reference (kT) with the mean difference over the reference's populated (finite)
    bins removed; NaN where the reference is empty."""
    d = np.asarray(F_model_kT, dtype=np.float64) - np.asarray(F_ref_kT, dtype=np.float64)
    finite = np.isfinite(d)
    if finite.any():
        d = d - d[finite].mean()
    return d


def pmf_maps(
    path: str | os.PathLike,
    F_model_kT: np.ndarray,
    std_kT: np.ndarray,
    extent: Sequence[float],
    F_ref_kT: np.ndarray | None = None,
    points: np.ndarray | None = None,
    centres: np.ndarray | None = None,
    names: Sequence[str] = ("φ / rad", "ψ / rad"),
    title: str = "",
    cap_kT: float = F_CAP_KT,
) -> None:
    """2-D free-energy maps on a regular grid ``[n0, n1]`` (first axis = first coordinate).

    Panels: reference F (if given), model mean F, model − reference (aligned by the mean over
    populated bins; if a reference is given), ensemble std; all F shifted to min 0 and capped at
    ``cap_kT``. Training ``points`` and selected ``centres`` ``[n, 2]`` are drawn on the maps.
    """
    F = np.asarray(F_model_kT, dtype=np.float64)
    F = F - F.min()
    panels: list[tuple[str, np.ndarray, str, dict]] = []
    f_kw = {"cmap": "viridis", "vmin": 0.0, "vmax": cap_kT}
    if F_ref_kT is not None:
        ref = np.asarray(F_ref_kT, dtype=np.float64) - np.nanmin(F_ref_kT)
        panels.append(("reference F", np.minimum(ref, cap_kT), "F / kT", f_kw))
    panels.append(("ensemble mean F", np.minimum(F, cap_kT), "F / kT", f_kw))
    if F_ref_kT is not None:
        d = aligned_difference(F, F_ref_kT)
        d_kw = {"cmap": "RdBu_r", "vmin": -DIFF_CAP_KT, "vmax": DIFF_CAP_KT}
        panels.append(("model − reference", d, "ΔF / kT", d_kw))
    s_kw = {"cmap": "magma", "vmin": 0.0, "vmax": STD_CAP_KT}
    panels.append(("ensemble std", np.asarray(std_kT, dtype=np.float64), "σ / kT", s_kw))
    ncol = 2 if len(panels) > 2 else len(panels)
    nrow = math.ceil(len(panels) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, 4.2 * nrow), squeeze=False)
    for ax, (name, values, label, kw) in zip(axes.flat, panels, strict=False):
        _map(ax, values, extent, label, **kw)
        _overlay_points(ax, points, centres)
        ax.set_title(name)
        ax.set_xlabel(names[0])
        ax.set_ylabel(names[1])
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    _save(fig, path)


def pmf_profile(
    path: str | os.PathLike,
    s: np.ndarray,
    F_model_kT: np.ndarray,
    std_kT: np.ndarray,
    F_exact_kT: np.ndarray | None = None,
    points: np.ndarray | None = None,
    name: str = "s",
    title: str = "",
) -> None:
    """1-D free-energy profile: model mean ± std (aligned to the exact minimum if given), the
    exact profile, and the training points as ticks."""
    s = np.asarray(s, dtype=np.float64)
    F = np.asarray(F_model_kT, dtype=np.float64)
    std = np.asarray(std_kT, dtype=np.float64)
    if F_exact_kT is not None:
        i = int(np.argmin(F_exact_kT))
        F = F - F[i] + F_exact_kT[i]
    else:
        F = F - F.min()
    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    ax.plot(s, F, label="ensemble mean")
    ax.fill_between(s, F - std, F + std, alpha=0.3, label="± std")
    if F_exact_kT is not None:
        ax.plot(s, F_exact_kT, "k--", label="exact")
    if points is not None and len(points):
        pts = np.asarray(points, dtype=np.float64).ravel()
        ax.plot(pts, np.full_like(pts, -0.5), "|", color="C3", label="training points")
    ax.set_xlabel(name)
    ax.set_ylabel("F / kT")
    ax.set_ylim(-1.0, min(max(float(np.nanmax(F + std)), 1.0), F_CAP_KT) + 1.0)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    _save(fig, path)


# ------------------------------------------------------------------------- per iteration
def iteration_plot(
    path: str | os.PathLike,
    system: Any,
    predict: Callable[[Any], Any],
    train_points: np.ndarray,
    centres: np.ndarray | None = None,
    reference_counts: np.ndarray | None = None,
    title: str = "",
) -> None:
    """The evaluate step's figure: a profile (1-D CG) or maps (2-D CG) of the ensemble.

    ``reference_counts``: reference histogram on the std100 grid (periodic 2-D systems only).
    """
    spec = system.cg_spec
    points = np.asarray(train_points, dtype=np.float64).reshape(len(train_points), -1)
    if spec.dim == 1:
        lo, hi = spec.bounds[0]
        s = np.linspace(lo, hi, 300)
        mean, std = grid_values(predict, s[:, None])
        exact = system.exact_pmf(s) if hasattr(system, "exact_pmf") else None
        pmf_profile(path, s, mean, std, exact, points, spec.names[0], title)
        return
    if spec.dim != 2:
        raise ValueError(f"no plot for {spec.dim}-D CG coordinates")
    ref = None
    if all(spec.periodic):
        grid = GRIDS["std100"]
        c = grid.centres_phi_psi()
        extent = (-math.pi, math.pi, -math.pi, math.pi)
        if reference_counts is not None:
            ref = free_energy_from_counts(reference_counts)
    else:
        (lo0, hi0), (lo1, hi1) = spec.bounds[:2]
        a, b = np.linspace(lo0, hi0, 120), np.linspace(lo1, hi1, 120)
        c = np.stack(np.meshgrid(a, b, indexing="ij"), axis=-1)
        extent = (lo0, hi0, lo1, hi1)
    mean, std = grid_values(predict, c)
    names = tuple(f"{n} / rad" if p else n for n, p in zip(spec.names, spec.periodic, strict=True))
    pmf_maps(path, mean, std, extent, ref, points, centres, names, title)


# ---------------------------------------------------------------------------- convergence
#: KLD columns of summary.csv drawn (with their noise floor ``metric_kld_floor_<grid>``)
KLD_COLUMNS = ("metric_kld_std100", "metric_kld_std36", "metric_kld")
#: ΔF error columns (with the reference's standard error ``…_ref_stderr_kT`` as a band)
DF_ERROR_COLUMNS = ("metric_dF_phi_pos_err_kT", "metric_dF_aR_beta_err_kT")


def _present(df: Any, columns: Sequence[str]) -> list[str]:
    return [c for c in columns if c in df.columns and df[c].notna().any()]


def _kld_panel(ax: Any, df: Any, N: np.ndarray) -> None:
    for i, col in enumerate(_present(df, KLD_COLUMNS)):
        colour = f"C{i}"
        ax.plot(N, df[col], "o-", color=colour, label=col.removeprefix("metric_"))
        floor = col.replace("metric_kld_", "metric_kld_floor_")
        if floor != col and floor in df.columns and df[floor].notna().any():
            ax.axhline(float(df[floor].dropna().iloc[0]), color=colour, ls=":", label="noise floor")
    ax.set_yscale("log")
    ax.set_ylabel("forward KLD / nat")


def _error_panel(ax: Any, df: Any, N: np.ndarray) -> None:
    cols = _present(df, DF_ERROR_COLUMNS)
    for i, col in enumerate(cols):
        colour = f"C{i}"
        ax.plot(N, df[col], "o-", color=colour, label=col.removeprefix("metric_"))
        se = col.replace("_err_kT", "_ref_stderr_kT")
        if se in df.columns and df[se].notna().any():
            v = float(df[se].dropna().iloc[0])
            ax.axhspan(-v, v, color=colour, alpha=0.15, label="reference ± s.e.")
    if cols:
        ax.axhline(0.0, color="k", lw=0.8)
        ax.set_ylabel("ΔF error / kT")
    elif _present(df, ["metric_max_abs_dF_kT"]):
        ax.plot(N, df["metric_max_abs_dF_kT"], "o-", label="max |ΔF| (F ≤ 10 kT)")
        ax.set_yscale("log")
        ax.set_ylabel("max |ΔF| / kT")


#: line style and colour of each baseline, in the order of ``baselines.BASELINE_LABELS``
_BASELINE_LINES = (
    ("-", "0.35"),
    ("--", "0.35"),
    ("-", "tab:olive"),
    ("--", "tab:olive"),
    ("-.", "tab:brown"),
    ("-.", "tab:red"),
    (":", "tab:purple"),
)


def _median_band(
    ax: Any, points: Any, method: str, metric: str, band: bool, absolute: bool, **style: Any
) -> None:
    """The median over a method's runs with the range over runs shaded (where finite)."""
    from .baselines import median_curve

    n, med, lo, hi = median_curve(points, method, metric, absolute=absolute)
    ok = np.isfinite(med)
    if not ok.any():
        return
    ax.plot(n[ok], med[ok], **style)
    fin = ok & np.isfinite(hi)
    if band and fin.any() and np.any(hi[fin] > lo[fin]):
        ax.fill_between(n[fin], lo[fin], hi[fin], color=style.get("color"), alpha=0.15, lw=0)


def baseline_curves(
    ax: Any, points: Any, metric: str, band: bool = True, absolute: bool = False
) -> None:
    """Median over runs (seeds, trajectories) of ``metric`` (or of its absolute value) against
    evaluations for each baseline method in the points table (``cgflow baseline speedup``),
    the range over runs shaded. A point where the median run is not finite (e.g. the ΔF of
    trajectories that never entered the basin) is left out."""
    if points is None or metric not in points.columns:
        return
    from .baselines import BASELINE_LABELS

    for (method, label), (ls, colour) in zip(BASELINE_LABELS.items(), _BASELINE_LINES, strict=True):
        style = {"ls": ls, "color": colour, "label": f"{label} ({metric})"}
        _median_band(ax, points, method, metric, band, absolute, **style)


def convergence(
    path: str | os.PathLike, summary: Any, title: str = "", baselines: Any = None
) -> None:
    """Metrics of ``summary.csv`` (a DataFrame) against the cumulative energy evaluations N:
    KLD (log scale, reference noise floors dotted), ΔF errors (ALDP, reference standard error
    shaded) or max |ΔF| (Müller–Brown), and the number of training points. With a
    ``baselines`` points table, the baselines' std36 KLD and φ > 0 ΔF error are drawn too."""
    df = summary
    N = np.asarray(df["N"], dtype=np.float64)
    fig, axes = plt.subplots(1, 3, figsize=(15.0, 4.2))
    _kld_panel(axes[0], df, N)
    _error_panel(axes[1], df, N)
    baseline_curves(axes[0], baselines, "kld_std36")
    baseline_curves(axes[1], baselines, "dF_phi_pos_err_kT")
    axes[2].plot(N, df["n_train_points"], "o-", label="training CG points")
    axes[2].set_ylabel("CG points")
    for ax in axes:
        ax.set_xlabel("cumulative energy evaluations N")
        ax.set_xscale("log")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    _save(fig, path)


def speedup_curves(
    path: str | os.PathLike, points: Any, targets: Sequence[str], campaign: str = "campaign"
) -> None:
    """KLD (std36 and std100) and |ΔF(φ > 0) error| against energy evaluations for the
    campaign (markers) and every baseline (lines): the median over runs, the range shaded,
    with the targets of the speedup table."""
    wanted = ("kld_std36", "kld_std100", "dF_phi_pos_err_kT")
    metrics = [m for m in wanted if m in points.columns]
    if not metrics:
        raise ValueError(f"the points have none of {', '.join(wanted)}")
    from .baselines import BASELINE_METHODS, parse_target

    fig, axes = plt.subplots(1, len(metrics), figsize=(5.4 * len(metrics), 4.4), squeeze=False)
    axes = axes[0]
    shown = [
        m
        for m in dict.fromkeys(points["method"])
        if m not in BASELINE_METHODS
        and (not m.endswith("(training only)") or m == f"{campaign} (training only)")
    ]
    parsed = [parse_target(t) for t in targets]
    for ax, metric in zip(axes, metrics, strict=True):
        absolute = metric.startswith("dF_")
        for i, name in enumerate(shown):
            style = {"marker": "o", "ms": 3, "color": f"C{i}", "label": name}
            _median_band(ax, points, name, metric, True, absolute, **style)
        baseline_curves(ax, points, metric, absolute=absolute)
        for m, thr in parsed:
            if m == metric:
                ax.axhline(thr, color="k", lw=0.6, ls=":")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("energy evaluations")
        ax.set_ylabel("|ΔF(φ > 0) error| / kT" if absolute else f"{metric} / nat")
        ax.legend(fontsize=7)
    fig.suptitle("campaign vs baselines: median over seeds, range shaded (targets dotted)")
    _save(fig, path)
