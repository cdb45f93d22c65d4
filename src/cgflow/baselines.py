"""Baselines and the speedup table: campaign vs plain MD vs metadynamics, same metrics, same counting.

Counting rule: one evaluation is one potential-energy (and force) evaluation. An MD or
metadynamics step is one; a campaign's ``N`` is its cumulative counted evaluations
(``summary.csv``). Every method's curve is a table of *points* ``(method, run, evaluations,
<metric>...)`` with the metrics of :func:`cgflow.metrics.aldp_metrics`:

* **campaign** (and the grid-conditioning variant): one point per iteration, from ``summary.csv``;
* **MD, one trajectory**: each independent trajectory's histogram over its first ``t`` steps
  (``md_single``, one run per trajectory); the MD histogram needs a pseudo-count where the
  trajectory has not been; the smallest KLD over a few pseudo-counts is used, so the baseline
  is given its best case;
* **MD, pooled**: all trajectories together, ``evaluations = trajectories x steps``;
* **metadynamics**: ``F = -γ/(γ-1) V`` from the bias at every snapshot, at bin centres, as the
  campaign's model is evaluated.

:func:`speedup_table` finds, per target (a metric at or below a threshold), the evaluations each
method needs: *measured* where its curve crosses the target (log-log interpolation between the
two points around the first crossing), *extrapolated* from a power law fitted to the last points
of a curve that has not crossed it (its exponent is in the table), or a *lower bound* where no
extrapolation is sensible. Published figures enter as *quoted* rows.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .metrics import (
    DELTA_F_PAIRS,
    GRIDS,
    KLD_GRIDS,
    _pair_masks,
    aldp_metrics,
    delta_F_kT,
    forward_kld,
)

#: metrics kept in the points tables
POINT_METRICS = (
    "kld_std36",
    "kld_std100",
    "kld_shifted100",
    "dF_phi_pos_err_kT",
    "dF_aR_beta_err_kT",
)
#: pseudo-counts per bin tried for MD histograms (the smallest KLD is kept)
MD_PSEUDO_COUNTS = (0.01, 0.03, 0.1, 0.3, 1.0)

#: published figures (method-spec §6.4–6.5), never measured here
QUOTED = (
    {
        "method": "paper (Schopmans & Friederich 2024)",
        "target": "KLD (their grid, threshold not stated)",
        "status": "quoted",
        "note": "speedup 15.9-216.2 vs MD; most likely training evaluations only",
    },
    {
        "method": "FAB (Midgley et al.)",
        "target": "their final model",
        "evaluations": 2.3e8,
        "status": "quoted",
        "note": "about 2-2.6e8 target evaluations, derived from its config; speedup 4.5 vs MD "
        "as quoted by the paper",
    },
)


# ------------------------------------------------------------------------------ points
def _reference_counts(reference: Any) -> dict[str, np.ndarray]:
    return {g: np.asarray(reference[f"counts_{g}"], dtype=np.float64) for g in KLD_GRIDS}


def _keep(metrics: Mapping[str, float]) -> dict[str, float]:
    return {m: float(metrics[m]) for m in POINT_METRICS if m in metrics}


def campaign_points(summary: Any, method: str = "campaign", run: str = "0") -> list[dict]:
    """Points of a finished campaign: one per iteration with metrics, ``evaluations = N``; a
    second method ``<method> (training only)`` counts the training evaluations alone."""
    import pandas as pd

    df = summary if isinstance(summary, pd.DataFrame) else pd.read_csv(summary)
    if "N" not in df.columns:
        raise ValueError("summary has no column 'N' (cumulative counted evaluations)")
    rows = []
    for _, r in df.iterrows():
        metrics = {m: r.get(f"metric_{m}") for m in POINT_METRICS}
        if all(v is None or pd.isna(v) for v in metrics.values()):
            continue
        vals = {m: float(v) for m, v in metrics.items() if v is not None and not pd.isna(v)}
        rows.append({"method": method, "run": run, "evaluations": float(r["N"]), **vals})
        if "cum_evals_training" in df.columns:
            rows.append(
                {
                    "method": f"{method} (training only)",
                    "run": run,
                    "evaluations": float(r["cum_evals_training"]),
                    **vals,
                }
            )
    return rows


def metadynamics_points(
    run_h5: str | Path, reference: Any, method: str = "metadynamics"
) -> list[dict]:
    """Points of one metadynamics run file (:mod:`cgflow.metadynamics`), one per snapshot."""
    import h5py

    from .metadynamics import interpolate_periodic

    with h5py.File(run_h5, "r") as f:
        if f.attrs.get("kind") != "metadynamics":
            raise ValueError(f"{run_h5}: not a metadynamics run file (cgflow baseline metad)")
        steps = f["steps"][()]
        F = f["F_kT"][()]
        run = f"{Path(run_h5).stem} (seed {json.loads(f.attrs['settings'])['seed']})"
        # the minimisation before step 0 (recorded by runs since it is counted)
        n_min = int(f.attrs.get("minimisation_evaluations", 0))
    counts = _reference_counts(reference)
    rows = []
    for k, step in enumerate(steps):
        model = {g: interpolate_periodic(F[k], GRIDS[g].centres_phi_psi()) for g in KLD_GRIDS}
        m = aldp_metrics(model, counts)
        rows.append({"method": method, "run": run, "evaluations": float(step + n_min), **_keep(m)})
    return rows


class _MDScorer:
    """Metrics of MD histograms against the reference counts ``ref[g]``: KLD with the best
    pseudo-count, basin ΔF errors from the raw counts (inf where a region is empty). The
    reference's basin ΔF are computed once."""

    def __init__(self, ref: Mapping[str, np.ndarray]) -> None:
        self.ref = ref
        self.masks = _pair_masks(GRIDS["std100"])
        self.ref_dF = {
            name: delta_F_kT(ref["std100"], self.masks[a], self.masks[b])
            for name, (a, b) in DELTA_F_PAIRS.items()
        }

    def __call__(self, counts: Mapping[str, np.ndarray]) -> dict[str, float]:
        out: dict[str, float] = {}
        for g in KLD_GRIDS:
            out[f"kld_{g}"] = min(forward_kld(self.ref[g], counts[g] + a) for a in MD_PSEUDO_COUNTS)
        for name, (a, b) in DELTA_F_PAIRS.items():
            md = delta_F_kT(counts["std100"], self.masks[a], self.masks[b])
            out[f"dF_{name}_err_kT"] = md - self.ref_dF[name] if math.isfinite(md) else math.inf
        return out


def md_points(
    series_phi_psi: np.ndarray, steps_per_frame: int, reference: Any, n_points: int = 25
) -> list[dict]:
    """Points of plain MD from trajectories' φ/ψ series ``[chains, frames, 2]`` (standard rad,
    a frame every ``steps_per_frame`` steps): ``md_single`` per trajectory and ``md_pooled``
    (all trajectories, evaluations = chains x steps), at ``n_points`` log-spaced lengths."""
    series = np.asarray(series_phi_psi, dtype=np.float64)
    if series.ndim != 3 or series.shape[2] != 2:
        raise ValueError(f"series_phi_psi must be [chains, frames, 2], got {series.shape}")
    n_chains, n_frames, _ = series.shape
    ref = _reference_counts(reference)
    score = _MDScorer(ref)
    frames = np.unique(np.geomspace(1, n_frames, n_points).astype(np.int64))
    flat = {g: np.stack([GRIDS[g].flat_index(s) for s in series]) for g in KLD_GRIDS}
    size = {g: GRIDS[g].bins ** 2 for g in KLD_GRIDS}
    rows = []
    for t in frames:
        pooled = {g: np.zeros(size[g]) for g in KLD_GRIDS}
        for c in range(n_chains):
            counts = {
                g: np.bincount(flat[g][c, :t], minlength=size[g]).astype(float) for g in KLD_GRIDS
            }
            for g in KLD_GRIDS:
                pooled[g] += counts[g]
            shaped = {g: counts[g].reshape(ref[g].shape) for g in KLD_GRIDS}
            rows.append(
                {
                    "method": "md_single",
                    "run": str(c),
                    "evaluations": float(t * steps_per_frame),
                    **score(shaped),
                }
            )
        shaped = {g: pooled[g].reshape(ref[g].shape) for g in KLD_GRIDS}
        rows.append(
            {
                "method": "md_pooled",
                "run": "all",
                "evaluations": float(t * steps_per_frame * n_chains),
                **score(shaped),
            }
        )
    return rows


# ------------------------------------------------------------------------------ the table
def mean_curve(points: Any, method: str, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(evaluations, mean, std)`` of ``metric`` over the runs of ``method`` (per distinct
    evaluation count; |value| for ΔF errors; runs with inf make the mean inf)."""
    if metric not in points.columns:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    df = points[points["method"] == method]
    df = df[np.isfinite(df["evaluations"])].dropna(subset=[metric])
    if df.empty:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    vals = df[metric].abs() if metric.startswith("dF_") else df[metric]
    g = vals.groupby(df["evaluations"])
    std = g.std(ddof=0).fillna(0.0).to_numpy()
    return g.mean().index.to_numpy(dtype=float), g.mean().to_numpy(dtype=float), std


def power_law_fit(n: np.ndarray, y: np.ndarray, last: int = 6) -> tuple[float, float]:
    """``y ≈ A n^b`` fitted (least squares in log-log) to the last ``last`` finite points;
    returns ``(log A, b)``."""
    n, y = np.asarray(n, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(y) & (y > 0) & (n > 0)
    n, y = n[ok][-last:], y[ok][-last:]
    if len(n) < 3:
        raise ValueError("a power-law fit needs at least 3 finite points")
    b, logA = np.polyfit(np.log(n), np.log(y), 1)
    return float(logA), float(b)


#: extrapolations further than this factor beyond the last point run are not reported
MAX_EXTRAPOLATION = 30.0


def evaluations_to_reach(
    n: np.ndarray, y: np.ndarray, threshold: float, fit_last: int = 6, extrapolate: bool = True
) -> dict[str, Any]:
    """Evaluations from which on the curve ``y(n)`` stays at ``y <= threshold`` (a noisy curve
    that dips below and comes back up has not reached it).

    *measured*: log-log interpolation between the last point above and the next one; *at
    most*: already below at the first point run. Otherwise, for a KLD, *extrapolated* from
    :func:`power_law_fit` if the curve is falling (exponent < -0.3, reported) and the crossing
    lies beyond the run but within :data:`MAX_EXTRAPOLATION` times its length; else a *lower
    bound* (the largest ``n`` run).
    """
    n, y = np.asarray(n, dtype=float), np.asarray(y, dtype=float)
    if len(n) == 0:
        return {"evaluations": math.nan, "status": "not run"}
    above = np.flatnonzero(~(y <= threshold))
    if len(above) < len(y) and (len(above) == 0 or above[-1] < len(y) - 1):
        i = 0 if len(above) == 0 else int(above[-1]) + 1
        if i == 0:
            return {
                "evaluations": float(n[0]),
                "status": "at most",
                "note": "already reached at the first point run",
            }
        if not np.isfinite(y[i - 1]):
            return {"evaluations": float(n[i]), "status": "measured"}
        t = (math.log(y[i - 1]) - math.log(threshold)) / (
            math.log(y[i - 1]) - math.log(max(y[i], 1e-300))
        )
        return {
            "evaluations": float(
                math.exp(math.log(n[i - 1]) + t * (math.log(n[i]) - math.log(n[i - 1])))
            ),
            "status": "measured",
        }
    why = "not reached within the run" + ("" if extrapolate else " (not extrapolated)")
    if extrapolate:
        try:
            logA, b = power_law_fit(n, y, fit_last)
        except ValueError:
            logA, b = math.nan, math.nan
        at = math.exp((math.log(threshold) - logA) / b) if math.isfinite(b) and b < 0 else math.inf
        if b < -0.3 and n.max() < at <= MAX_EXTRAPOLATION * n.max():
            return {
                "evaluations": float(at),
                "status": "extrapolated",
                "note": f"power law n^{b:.2f} fitted to the last {min(fit_last, len(n))} points",
            }
        why += (
            "; no falling trend to extrapolate"
            if not b < -0.3
            else f"; a power-law fit (n^{b:.2f}) does not cross it within "
            f"{MAX_EXTRAPOLATION:g}x the run"
        )
    return {"evaluations": float(n.max()), "status": "lower bound", "note": why}


def parse_target(target: str) -> tuple[str, float]:
    """``"kld_std36<=0.05"`` → ``("kld_std36", 0.05)``; ΔF targets are on |error|."""
    if "<=" not in target:
        raise ValueError(f"target {target!r} must look like 'metric<=threshold'")
    metric, thr = target.split("<=")
    metric = metric.strip()
    if metric not in POINT_METRICS:
        raise ValueError(f"target metric {metric!r} is not one of {POINT_METRICS}")
    value = float(thr)
    if not value > 0:
        raise ValueError(f"target {target!r}: the threshold must be > 0")
    return metric, value


def speedup_table(points: Any, targets: Sequence[str], reference_method: str = "campaign") -> Any:
    """Long table: per target and method the evaluations needed (status: measured /
    extrapolated / lower bound), and the ratio to ``reference_method`` (``method /
    reference``: the speedup of the campaign over that method); quoted rows appended."""
    import pandas as pd

    if len(points) == 0 or "method" not in points.columns:
        raise ValueError(
            "no points with alanine-dipeptide metrics (is the summary from an alanine-dipeptide "
            "campaign?)"
        )
    rows = []
    methods = list(dict.fromkeys(points["method"]))
    for target in targets:
        metric, thr = parse_target(target)
        found = {}
        for m in methods:
            n, y, _ = mean_curve(points, m, metric)
            # a power law describes a KLD's decay, not a basin's ΔF error: no extrapolation
            reach = evaluations_to_reach(n, y, thr, extrapolate=metric.startswith("kld_"))
            found[m] = {"target": target, "method": m, **reach}
        ref = found.get(reference_method, {}).get("evaluations", math.nan)
        ref_status = found.get(reference_method, {}).get("status")
        for m, r in found.items():
            ratio = r["evaluations"] / ref if ref and math.isfinite(ref) else math.nan
            if r["status"] in ("lower bound", "at most") and m != reference_method:
                bound = "a lower" if r["status"] == "lower bound" else "an upper"
                r["note"] = r.get("note", "") + f"; the ratio is {bound} bound too"
            if ref_status != "measured" and m != reference_method:
                r["note"] = (r.get("note", "") + f"; {reference_method} {ref_status}").strip("; ")
            rows.append({**r, f"ratio_to_{reference_method}": ratio})
    rows.extend(dict(q) for q in QUOTED)
    cols = ["target", "method", "evaluations", "status", f"ratio_to_{reference_method}", "note"]
    return pd.DataFrame(rows).reindex(columns=cols)


def markdown_table(table: Any) -> str:
    """The speedup table as a Markdown table (evaluations in scientific notation)."""
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in table.iterrows():
        cells = []
        for c in cols:
            v = r[c]
            if isinstance(v, float):
                cells.append(
                    "" if math.isnan(v) else (f"{v:.2e}" if c == "evaluations" else f"{v:.2f}")
                )
            else:
                cells.append("" if v is None else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ one call
#: default targets: KLD thresholds well above the shipped reference's floors (std36 0.00037,
#: 100 x 100 0.0011) and the φ > 0 basin free energy to 0.3 kT
DEFAULT_TARGETS = (
    "kld_std36<=0.1",
    "kld_std36<=0.05",
    "kld_std36<=0.03",
    "kld_std36<=0.02",
    "kld_shifted100<=0.1",
    "kld_shifted100<=0.05",
    "kld_shifted100<=0.02",
    "dF_phi_pos_err_kT<=0.3",
)


def check_targets(targets: Sequence[str], reference: Any, factor: float = 3.0) -> None:
    """Every KLD threshold must be at least ``factor`` x the reference's noise floor on its
    grid (below that the reference cannot tell methods apart)."""
    floors = json.loads(reference.attrs.get("summary", "{}")).get("kld_noise_floor", {})
    for t in targets:
        metric, thr = parse_target(t)
        grid = metric.removeprefix("kld_")
        if metric.startswith("kld_") and grid in floors and thr < factor * floors[grid]:
            raise ValueError(
                f"target {t!r}: threshold below {factor:g} x the reference's noise floor "
                f"({floors[grid]:.2g} nat on {grid})"
            )


def build_speedup(
    out_dir: str | Path,
    campaigns: Mapping[str, str | Path],
    md_h5: str | Path | None = None,
    metad_h5: Sequence[str | Path] = (),
    targets: Sequence[str] = DEFAULT_TARGETS,
    reference: Any = None,
) -> Any:
    """Points of every method, the speedup table, its Markdown form and the curves, in
    ``out_dir`` (``points.csv``, ``speedup.csv``, ``speedup.md``, ``curves.png``).

    ``campaigns`` maps a method name to a ``summary.csv`` (the first is the one ratios refer
    to; name a grid-conditioning run ``grid``); ``md_h5`` is a plain-MD file with
    ``series_phi_psi`` (``data/baselines/md_300K/merged.h5``), ``metad_h5`` metadynamics run
    files.
    """
    import h5py
    import pandas as pd

    from .reference import load_reference

    if not campaigns:
        raise ValueError("need at least one campaign summary.csv")
    reference = reference if reference is not None else load_reference()
    check_targets(targets, reference)
    rows: list[dict] = []
    for name, path in campaigns.items():
        rows += campaign_points(path, method=name)
    if md_h5 is not None:
        with h5py.File(md_h5, "r") as f:
            if "series_phi_psi" not in f:
                raise ValueError(
                    f"{md_h5}: no series_phi_psi (run the MD baseline with --series-every)"
                )
            series = f["series_phi_psi"][()]
            every = int(json.loads(f.attrs["settings"])["series_every"])
        rows += md_points(series, every, reference)
    for path in metad_h5:
        rows += metadynamics_points(path, reference)
    points = pd.DataFrame(rows)
    first = next(iter(campaigns))
    table = speedup_table(points, targets, reference_method=first)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    points.to_csv(out / "points.csv", index=False)
    table.to_csv(out / "speedup.csv", index=False)
    (out / "speedup.md").write_text(markdown_table(table))
    from .plots import speedup_curves

    speedup_curves(out / "curves.png", points, targets, campaign=first)
    return table


#: methods of a points table that are baselines (drawn and compared next to a campaign), with
#: their labels in plots
BASELINE_LABELS = {
    "md_single": "MD, one trajectory",
    "md_pooled": "MD, all trajectories pooled",
    "metadynamics": "metadynamics",
    "grid": "grid conditioning",
}
BASELINE_METHODS = tuple(BASELINE_LABELS)


def campaign_speedup(
    summary: Any, baseline_points: Any, targets: Sequence[str] = DEFAULT_TARGETS
) -> tuple[Any, Any]:
    """The speedup table of one campaign (its ``summary.csv``) against the baselines of a
    shipped points table (``points.csv`` of :func:`build_speedup`); returns (table, points)."""
    import pandas as pd

    base = baseline_points
    if not isinstance(base, pd.DataFrame):
        base = pd.read_csv(base)
    missing = {"method", "evaluations"} - set(base.columns)
    if missing:
        raise ValueError(f"baseline points lack column(s) {sorted(missing)}")
    base = base[base["method"].isin(BASELINE_METHODS)]
    points = pd.concat([pd.DataFrame(campaign_points(summary)), base], ignore_index=True)
    return speedup_table(points, targets), points
