"""Baselines and the speedup table: campaign vs plain MD, metadynamics and OPES, same metrics,
same counting.

Counting rule: one evaluation is one potential-energy (and force) evaluation. An MD,
metadynamics or OPES step is one; a campaign's ``N`` is its cumulative counted evaluations
(``summary.csv``). Every method's curve is a table of *points* ``(method, run, evaluations,
<metric>...)`` with the metrics of :func:`cgflow.metrics.aldp_metrics`; a *run* is a seed (or
one MD trajectory):

* **campaign**: one point per iteration, from each seed's ``summary.csv``;
* **MD, one trajectory**: each independent trajectory's histogram over its first ``t`` steps
  (``md_single``); the histogram needs a pseudo-count where the trajectory has not been; the
  smallest KLD over a few pseudo-counts is used, so this scoring is given its best case;
* **MD, pooled**: all trajectories together, ``evaluations = trajectories x steps``;
* **MD as a smooth surface** (``md_kde_single``, ``md_kde_pooled``): the same frames as a
  periodic kernel density whose width is chosen by blocked cross-validation on the frames
  (:class:`PeriodicKDE`), evaluated at bin centres like a campaign's model;
* **metadynamics**, **OPES**: the free energy of each snapshot of a run, at bin centres.

:func:`speedup_table` finds, per target (a metric at or below a threshold) and run, the
evaluations from which on the curve stays at or below the target to the end of the run over
at least two points (:func:`evaluations_to_reach`, never extrapolated), then the median and
range over runs (:func:`combine_runs`: a run that does not reach it counts as "more than its
length", and the median is a lower bound where half or more did not). Ratios to the campaign
are given only where both medians are reached. Published figures enter as *quoted* rows.
"""

from __future__ import annotations

import itertools
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
    wrap,
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


def biased_run_points(run_h5: str | Path, reference: Any, method: str | None = None) -> list[dict]:
    """Points of one metadynamics (:mod:`cgflow.metadynamics`) or OPES (:mod:`cgflow.opes`)
    run file, one per free-energy snapshot; ``method`` defaults to ``metadynamics`` / ``opes``."""
    import h5py

    from .metadynamics import interpolate_periodic

    with h5py.File(run_h5, "r") as f:
        kind = f.attrs.get("kind")
        if kind not in ("metadynamics", "opes") or f.attrs.get("system") != "alanine_dipeptide":
            raise ValueError(
                f"{run_h5}: not an alanine-dipeptide metadynamics or OPES run file "
                "(cgflow baseline metad / opes)"
            )
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
        rows.append(
            {"method": method or kind, "run": run, "evaluations": float(step + n_min), **_keep(m)}
        )
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


#: the MD kernel density: fine bins per axis, bandwidths tried (rad), cross-validation blocks
KDE_BINS = 180
KDE_BANDWIDTHS_RAD = tuple(float(h) for h in np.geomspace(0.035, 0.7, 10))
KDE_BLOCKS = 10
#: density floor per fine bin (a held-out frame where the rest has no mass, an unvisited bin)
KDE_FLOOR = 1e-9


class PeriodicKDE:
    """A Gaussian kernel density on the (φ, ψ) torus from binned samples: counts on a
    ``bins x bins`` grid (index ``[φ, ψ]``) convolved (FFT) with a wrapped Gaussian of width
    ``h``. The bandwidth is chosen by blocked cross-validation on the samples alone: the
    trajectory is cut into ``blocks`` contiguous blocks (frames are correlated, so single
    frames left out would favour too small a width), each block's frames are scored under the
    density of the others, and the ``h`` with the largest held-out log-likelihood wins."""

    def __init__(
        self,
        bins: int = KDE_BINS,
        bandwidths: Sequence[float] = KDE_BANDWIDTHS_RAD,
        blocks: int = KDE_BLOCKS,
    ) -> None:
        self.bins, self.blocks = int(bins), int(blocks)
        self.bandwidths = tuple(float(h) for h in bandwidths)
        step = 2 * math.pi / self.bins
        d = np.minimum(np.arange(self.bins), self.bins - np.arange(self.bins)) * step
        self._kernel_ft = {}
        for h in self.bandwidths:
            k = np.exp(-0.5 * (d / h) ** 2)
            k2 = np.outer(k, k)
            self._kernel_ft[h] = np.fft.rfft2(k2 / k2.sum())

    def counts(self, phi_psi: np.ndarray) -> np.ndarray:
        """Counts ``[bins, bins]`` of standard (φ, ψ) samples ``[n, 2]``."""
        idx = np.floor((wrap(phi_psi) + math.pi) / (2 * math.pi) * self.bins).astype(np.int64)
        idx = np.clip(idx, 0, self.bins - 1)
        flat = idx[:, 0] * self.bins + idx[:, 1]
        return np.bincount(flat, minlength=self.bins**2).reshape(self.bins, self.bins).astype(float)

    def _smooth_ft(self, counts_ft: np.ndarray, h: float) -> np.ndarray:
        return np.fft.irfft2(counts_ft * self._kernel_ft[h], s=(self.bins, self.bins))

    def bandwidth(self, block_counts: Sequence[np.ndarray]) -> float:
        """The width with the largest blocked held-out log-likelihood (the largest width when
        there are fewer than two non-empty blocks)."""
        blocks = [c for c in block_counts if c.sum() > 0]
        if len(blocks) < 2:
            return self.bandwidths[-1]
        total = sum(blocks)
        fts = [np.fft.rfft2(c) for c in blocks]
        total_ft = sum(fts)
        best, best_ll = self.bandwidths[-1], -math.inf
        for h in self.bandwidths:
            ll = 0.0
            for c, ft in zip(blocks, fts, strict=True):
                rest = self._smooth_ft(total_ft - ft, h) / (total.sum() - c.sum())
                nz = c > 0
                ll += float((c[nz] * np.log(np.maximum(rest[nz], KDE_FLOOR))).sum())
            if ll > best_ll:
                best, best_ll = h, ll
        return best

    def density(self, counts: np.ndarray, h: float) -> np.ndarray:
        """Normalised density per fine bin of ``counts`` smoothed with width ``h``."""
        p = self._smooth_ft(np.fft.rfft2(counts), h)
        return np.maximum(p / counts.sum(), KDE_FLOOR)

    def free_energy_at(self, density: np.ndarray, phi_psi: np.ndarray) -> np.ndarray:
        """``-log`` of the density at standard (φ, ψ) points ``[..., 2]`` (periodic bilinear
        interpolation between fine-bin centres)."""
        from .metadynamics import interpolate_periodic

        # interpolate_periodic wants [ψ, φ] with node i at -π + i 2π/(n-1), first = last
        nodes = density.T
        m = self.bins
        half = math.pi / m  # fine-bin centres sit half a bin above the nodes
        grid = np.empty((m + 1, m + 1))
        grid[:m, :m] = nodes
        grid[m, :] = grid[0, :]
        grid[:, m] = grid[:, 0]
        pts = np.asarray(phi_psi, dtype=np.float64) - half
        return -np.log(interpolate_periodic(grid, pts))


def md_kde_points(
    series_phi_psi: np.ndarray,
    steps_per_frame: int,
    reference: Any,
    n_points: int = 25,
    kde: PeriodicKDE | None = None,
) -> list[dict]:
    """Plain MD scored as a smooth surface, like a campaign's model: at the lengths of
    :func:`md_points`, the :class:`PeriodicKDE` of each trajectory (``md_kde_single``) and of
    all together (``md_kde_pooled``, blocks in time across the trajectories), its bandwidth
    (``bandwidth_rad``) by blocked cross-validation on the frames so far, ``F = -log p`` at
    the bin centres of every KLD grid, scored with :func:`cgflow.metrics.aldp_metrics`."""
    series = np.asarray(series_phi_psi, dtype=np.float64)
    if series.ndim != 3 or series.shape[2] != 2:
        raise ValueError(f"series_phi_psi must be [chains, frames, 2], got {series.shape}")
    kde = kde or PeriodicKDE()
    n_chains, n_frames, _ = series.shape
    ref = _reference_counts(reference)
    centres = {g: GRIDS[g].centres_phi_psi() for g in KLD_GRIDS}
    frames = np.unique(np.geomspace(1, n_frames, n_points).astype(np.int64))

    def score(block_counts: list[np.ndarray]) -> dict[str, float]:
        h = kde.bandwidth(block_counts)
        p = kde.density(sum(block_counts), h)
        model = {g: kde.free_energy_at(p, centres[g]) for g in KLD_GRIDS}
        return {**_keep(aldp_metrics(model, ref)), "bandwidth_rad": h}

    rows = []
    for t in frames:
        cuts = np.linspace(0, t, min(kde.blocks, t) + 1).astype(np.int64)
        pooled = [np.zeros((kde.bins, kde.bins)) for _ in cuts[1:]]
        for c in range(n_chains):
            blocks = [kde.counts(series[c, a:b]) for a, b in itertools.pairwise(cuts)]
            for i, b in enumerate(blocks):
                pooled[i] += b
            rows.append(
                {
                    "method": "md_kde_single",
                    "run": str(c),
                    "evaluations": float(t * steps_per_frame),
                    **score(blocks),
                }
            )
        rows.append(
            {
                "method": "md_kde_pooled",
                "run": "all",
                "evaluations": float(t * steps_per_frame * n_chains),
                **score(pooled),
            }
        )
    return rows


# ------------------------------------------------------------------------------ the table
def run_curves(
    points: Any, method: str, metric: str, absolute: bool | None = None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each run's curve of ``method``: ``run -> (evaluations, values)`` in increasing
    evaluations, ``|value|`` if ``absolute`` (default: for ΔF errors); points without the
    metric are left out."""
    if metric not in points.columns:
        return {}
    df = points[(points["method"] == method) & np.isfinite(points["evaluations"])]
    df = df.dropna(subset=[metric]).sort_values("evaluations")
    out = {}
    for run, d in df.groupby(df["run"].astype(str), sort=False):
        y = (
            d[metric].abs()
            if (absolute is None and metric.startswith("dF_")) or absolute
            else d[metric]
        )
        out[str(run)] = (d["evaluations"].to_numpy(float), y.to_numpy(float))
    return out


def median_curve(
    points: Any, method: str, metric: str, n_grid: int = 60, absolute: bool | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(evaluations, median, min, max)`` of ``metric`` over the runs of ``method``: each run
    interpolated (log-log) onto a common grid between the largest first and the smallest last
    evaluation count of the runs; a single run, or runs on one set of counts, as they are.
    Where a run is not finite (a ΔF of a basin not visited yet) the median may be inf."""
    curves = run_curves(points, method, metric, absolute)
    if not curves:
        return (np.zeros(0),) * 4
    ns = [n for n, _ in curves.values()]
    if all(len(n) == len(ns[0]) and np.array_equal(n, ns[0]) for n in ns):
        grid = ns[0]
        ys = np.stack([y for _, y in curves.values()])
    else:
        lo, hi = max(n[0] for n in ns), min(n[-1] for n in ns)
        if not lo < hi:
            return (np.zeros(0),) * 4
        grid = np.geomspace(lo, hi, n_grid)
        ys = []
        for n, y in curves.values():  # log-log where positive, linear in n otherwise
            if np.all(y > 0):
                ys.append(np.exp(np.interp(np.log(grid), np.log(n), np.log(y))))
            else:
                ys.append(np.interp(np.log(grid), np.log(n), y))
        ys = np.stack(ys)
    with np.errstate(invalid="ignore"):
        return grid, np.median(ys, axis=0), ys.min(axis=0), ys.max(axis=0)


def evaluations_to_reach(n: np.ndarray, y: np.ndarray, threshold: float) -> dict[str, Any]:
    """Evaluations from which on one run's curve ``y(n)`` stays at ``y <= threshold`` to the
    end of the run, over at least two consecutive points (a curve that dips below and comes
    back up, or crosses at its last point, has not reached it).

    *measured*: log-log interpolation between the last point above and the next one; *at
    most*: below from the first point on; else *not reached* (``evaluations`` is the run's
    length). Never extrapolated. ``best`` is the tightest threshold the run reaches by the same
    rule: the larger of its last two values (a single low point does not count).
    """
    n, y = np.asarray(n, dtype=float), np.asarray(y, dtype=float)
    if len(n) == 0:
        return {"evaluations": math.nan, "status": "not run", "best": math.nan}
    best = float(np.max(y[-2:]))
    above = np.flatnonzero(~(y <= threshold))
    i = 0 if len(above) == 0 else int(above[-1]) + 1  # first point of the final run below
    if i > len(y) - 2:
        return {"evaluations": float(n.max()), "status": "not reached", "best": best}
    if i == 0:
        return {"evaluations": float(n[0]), "status": "at most", "best": best}
    if not np.isfinite(y[i - 1]):
        return {"evaluations": float(n[i]), "status": "measured", "best": best}
    f = (math.log(y[i - 1]) - math.log(threshold)) / (
        math.log(y[i - 1]) - math.log(max(y[i], 1e-300))
    )
    at = math.exp(math.log(n[i - 1]) + f * (math.log(n[i]) - math.log(n[i - 1])))
    return {"evaluations": at, "status": "measured", "best": best}


def combine_runs(per_run: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Median and range over runs of :func:`evaluations_to_reach`. A run that did not reach
    the target counts as "more than its length": with fewer than half of the runs short, the
    median is that of the runs ordered with those last (*reached*); otherwise it is a lower
    bound (*not reached*, the median with each short run at its length). The range's upper
    end is marked ``>`` when a run is short."""
    runs = [r for r in per_run if r["status"] != "not run"]
    if not runs:
        return {"runs": 0, "reached": 0, "evaluations": math.nan, "status": "not run"}
    short = [r["status"] == "not reached" for r in runs]
    vals = np.array([r["evaluations"] for r in runs])
    best = float(np.median([r["best"] for r in runs]))
    k = len(runs)
    lo, hi = float(vals.min()), float(vals.max())
    rng = f"{lo:.2g}-{'>' if any(short) else ''}{hi:.2g}" if k > 1 else ""
    if 2 * sum(short) < k:
        order = np.sort(np.where(short, math.inf, vals))
        med = float(np.median(order))
        status = "reached"
    else:
        med, status = float(np.median(vals)), "not reached"
    out = {
        "runs": k,
        "reached": k - sum(short),
        "evaluations": med,
        "status": status,
        "range": rng,
        "best": best,
    }
    firsts = sum(r["status"] == "at most" for r in runs)
    if firsts:
        out["note"] = f"{firsts} run(s) below it from their first point (an upper bound)"
    return out


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
    """Long table: per target and method the median evaluations over its runs to reach the
    target, the range over runs, how many runs reached it (:func:`combine_runs`), the median
    of each run's best (the tightest threshold it reaches), and the ratio to ``reference_method`` (``method / reference``:
    the speedup of the campaign over that method), given only where both reached it; quoted
    rows appended."""
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
            per_run = [
                evaluations_to_reach(n, y, thr) for n, y in run_curves(points, m, metric).values()
            ]
            found[m] = {"target": target, "method": m, **combine_runs(per_run)}
        ref = found.get(reference_method, {})
        for r in found.values():
            both = r["status"] == "reached" and ref.get("status") == "reached"
            r[f"ratio_to_{reference_method}"] = (
                r["evaluations"] / ref["evaluations"] if both else math.nan
            )
            rows.append(r)
    rows.extend(dict(q) for q in QUOTED)
    cols = [
        "target",
        "method",
        "runs",
        "reached",
        "evaluations",
        "status",
        "range",
        "best",
        f"ratio_to_{reference_method}",
        "note",
    ]
    return pd.DataFrame(rows).reindex(columns=cols)


def markdown_table(table: Any) -> str:
    """The speedup table as a Markdown table (evaluations in scientific notation, "> n" where
    the median is a lower bound)."""
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in table.iterrows():
        cells = []
        for c in cols:
            v = r[c]
            if isinstance(v, float):
                if math.isnan(v):
                    cells.append("")
                elif c == "evaluations":
                    cells.append((">" if r.get("status") == "not reached" else "") + f"{v:.2e}")
                elif c in ("runs", "reached"):
                    cells.append(f"{v:.0f}")
                elif c == "best" and math.isfinite(v) and r.get("status") == "not reached":
                    cells.append(_level(v, parse_target(r["target"])[1]))
                else:
                    cells.append(f"{v:.2g}" if c == "best" else f"{v:.2f}")
            else:
                cells.append("" if v is None else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _label(method: str) -> str:
    return BASELINE_LABELS.get(method, method)


def _level(value: float, threshold: float) -> str:
    """A level a run holds, with as many digits (2 to 4) as it takes not to print a value
    above ``threshold`` as if it were at or below it; ``no finite value`` for inf/NaN."""
    if not math.isfinite(value):
        return "no finite value"
    for digits in (2, 3, 4):
        text = f"{value:.{digits}g}"
        if float(text) > threshold:
            break
    return text


def target_sentences(table: Any, reference_method: str = "campaign") -> list[str]:
    """One sentence per target of a speedup table: who reaches it with the fewest evaluations
    (medians over runs), by what factor over the next method or the campaign, and who does
    not reach it (with the median of the tightest threshold each run reaches). Counting
    variants (``... (training only)``) are left out."""
    out = []
    rows = table[table["status"].isin(["reached", "not reached"])]
    rows = rows[~rows["method"].str.endswith("(training only)")]
    for target, g in rows.groupby("target", sort=False):
        metric, thr = parse_target(target)
        head = f"**{metric} ≤ {thr:g}**: "
        reached = g[g["status"] == "reached"].sort_values("evaluations")
        short = g[g["status"] != "reached"].sort_values("best")

        def who(r: Any) -> str:
            return (
                f"{_label(r.method)} at {r.evaluations:.2g} ({r.reached:.0f} of {r.runs:.0f} runs)"
            )

        if reached.empty:
            text = "no method reaches it"
        else:
            w = reached.iloc[0]
            ref = g[g["method"] == reference_method]
            ref = ref.iloc[0] if len(ref) else None
            if len(reached) > 1:
                n = reached.iloc[1]
                text = (
                    f"{who(w)} first, {n.evaluations / w.evaluations:.1f}x fewer than the next, "
                    f"{who(n)}"
                )
                if (
                    ref is not None
                    and ref.status == "reached"
                    and reference_method not in (w.method, n.method)
                ):
                    text += (
                        f"; the campaign at {ref.evaluations:.2g} "
                        f"({ref.evaluations / w.evaluations:.1f}x)"
                    )
            else:
                text = f"only {who(w)}"
        if len(short):
            names = ", ".join(
                f"{_label(r.method)} {_level(r.best, thr)}" for r in short.itertuples()
            )
            text += f"; not reached by (the tightest level each holds, median) {names}"
        out.append(head + text + ".")
    return out


# ------------------------------------------------------------------------------ one call
#: default targets: KLD thresholds down to about 3x the shipped reference's noise floors
#: (100 x 100: 0.00111, 36 x 36: 0.00037) and the φ > 0 basin free energy to 0.3 kT (the
#: reference's own standard error there is 0.09 kT)
DEFAULT_TARGETS = (
    "kld_std100<=0.02",
    "kld_std100<=0.01",
    "kld_std100<=0.005",
    "kld_std100<=0.0035",
    "kld_std36<=0.02",
    "kld_std36<=0.01",
    "kld_std36<=0.005",
    "kld_std36<=0.0012",
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
    campaigns: Mapping[str, str | Path | Sequence[str | Path]],
    md_h5: str | Path | None = None,
    metad_h5: Sequence[str | Path] = (),
    opes_h5: Sequence[str | Path] = (),
    targets: Sequence[str] = DEFAULT_TARGETS,
    reference: Any = None,
) -> Any:
    """Points of every method, the speedup table, its Markdown form and the curves, in
    ``out_dir`` (``points.csv``, ``speedup.csv``, ``speedup.md``, ``curves.png``).

    ``campaigns`` maps a method name to the ``summary.csv`` of each of its runs (seeds; the
    first method is the one ratios refer to); ``md_h5`` is a plain-MD file with
    ``series_phi_psi`` (``data/baselines/md_300K/merged.h5``), scored from histograms and as a
    kernel density; ``metad_h5`` and ``opes_h5`` are run files, one per seed.
    """
    import h5py
    import pandas as pd

    from .reference import load_reference

    if not campaigns:
        raise ValueError("need at least one campaign summary.csv")
    reference = reference if reference is not None else load_reference()
    check_targets(targets, reference)
    rows: list[dict] = []
    for name, paths in campaigns.items():
        paths = [Path(paths)] if isinstance(paths, str | Path) else [Path(p) for p in paths]
        stems = [p.stem for p in paths]
        unique = len(set(stems)) == len(stems)
        for path in paths:  # a run is named by its file (its path where names repeat)
            rows += campaign_points(path, method=name, run=path.stem if unique else str(path))
    if md_h5 is not None:
        with h5py.File(md_h5, "r") as f:
            if "series_phi_psi" not in f:
                raise ValueError(
                    f"{md_h5}: no series_phi_psi (run the MD baseline with --series-every)"
                )
            series = f["series_phi_psi"][()]
            every = int(json.loads(f.attrs["settings"])["series_every"])
        rows += md_points(series, every, reference)
        rows += md_kde_points(series, every, reference)
    for path in metad_h5:
        rows += biased_run_points(path, reference, method="metadynamics")
    for path in opes_h5:
        rows += biased_run_points(path, reference, method="opes")
    points = pd.DataFrame(rows)
    first = next(iter(campaigns))
    table = speedup_table(points, targets, reference_method=first)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    points.to_csv(out / "points.csv", index=False)
    table.to_csv(out / "speedup.csv", index=False)
    sentences = "\n".join(f"* {s}" for s in target_sentences(table, reference_method=first))
    (out / "speedup.md").write_text(markdown_table(table) + "\n" + sentences + "\n")
    from .plots import speedup_curves

    speedup_curves(out / "curves.png", points, targets, campaign=first)
    return table


#: methods of a points table that are baselines (drawn and compared next to a campaign), with
#: their labels in plots
BASELINE_LABELS = {
    "md_single": "MD, one trajectory (histogram)",
    "md_pooled": "MD, all trajectories pooled (histogram)",
    "md_kde_single": "MD, one trajectory (kernel density)",
    "md_kde_pooled": "MD, all trajectories pooled (kernel density)",
    "metadynamics": "metadynamics",
    "opes": "OPES",
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
