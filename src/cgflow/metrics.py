"""Evaluation grids, histograms and divergences of CG free-energy surfaces.

Alanine dipeptide grids (all over a full period in each dihedral):

* ``std100``: 100 x 100 bins over [-π, π)² in standard (φ, ψ) (mdtraj convention);
* ``shifted100``: the original code's grid, 100 x 100 bins over [-π, π)² in its shifted, sign-
  flipped coordinates φ' = wrap(-φ - 2.520397), ψ' = wrap(-ψ + 2.766145) (method-spec §6.1),
  kept for comparability with published numbers;
* ``std36``: 36 x 36 bins (10°) in standard (φ, ψ);
* ``fine360``: 360 x 360 bins (1°) in standard (φ, ψ), for plots.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

#: offsets of the original code's shifted CG coordinates (method-spec §1.2), radians
SHIFT_PHI = 2.520397
SHIFT_PSI = 2.766145


def wrap(a: np.ndarray) -> np.ndarray:
    """Angles wrapped to [-π, π)."""
    return (np.asarray(a) + math.pi) % (2 * math.pi) - math.pi


@dataclass(frozen=True)
class Grid2D:
    """A regular periodic grid over a pair of dihedrals."""

    name: str
    bins: int
    shifted: bool = False  # evaluate in the original code's (φ', ψ') instead of (φ, ψ)

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(-math.pi, math.pi, self.bins + 1)

    @property
    def centres(self) -> np.ndarray:
        e = self.edges
        return 0.5 * (e[1:] + e[:-1])

    def coordinates(self, phi_psi: np.ndarray) -> np.ndarray:
        """Map standard (φ, ψ) ``[n, 2]`` to this grid's coordinates."""
        phi_psi = np.asarray(phi_psi, dtype=np.float64)
        if not self.shifted:
            return wrap(phi_psi)
        return np.stack(
            [wrap(-phi_psi[:, 0] - SHIFT_PHI), wrap(-phi_psi[:, 1] + SHIFT_PSI)], axis=1
        )

    def centres_phi_psi(self) -> np.ndarray:
        """Standard (φ, ψ) of the bin centres, ``[bins, bins, 2]`` (first axis = first coordinate)."""
        c = self.centres
        a, b = np.meshgrid(c, c, indexing="ij")
        if not self.shifted:
            return np.stack([a, b], axis=-1)
        return np.stack([wrap(-a - SHIFT_PHI), wrap(-(b - SHIFT_PSI))], axis=-1)

    def flat_index(self, phi_psi: np.ndarray) -> np.ndarray:
        """Bin of each standard (φ, ψ) sample ``[n, 2]`` as a flat index into ``[bins, bins]``."""
        g = self.coordinates(phi_psi)
        idx = np.floor((g + math.pi) / (2 * math.pi) * self.bins).astype(np.int64)
        idx = np.clip(idx, 0, self.bins - 1)  # wrap() may return exactly -π; guard rounding
        return idx[:, 0] * self.bins + idx[:, 1]

    def histogram(self, phi_psi: np.ndarray) -> np.ndarray:
        """Counts ``[bins, bins]`` (int64) of standard (φ, ψ) samples on this grid."""
        flat = self.flat_index(phi_psi)
        return np.bincount(flat, minlength=self.bins * self.bins).reshape(self.bins, self.bins)


GRIDS: dict[str, Grid2D] = {
    g.name: g
    for g in (
        Grid2D("std100", 100),
        Grid2D("shifted100", 100, shifted=True),
        Grid2D("std36", 36),
        Grid2D("fine360", 360),
    )
}


def forward_kld(p_ref: np.ndarray, p_model: np.ndarray) -> float:
    """KL(p_ref || p_model) in nats over bins where ``p_ref > 0`` (both normalised here)."""
    p = np.asarray(p_ref, dtype=np.float64).ravel()
    q = np.asarray(p_model, dtype=np.float64).ravel()
    if p.shape != q.shape:
        raise ValueError(f"histograms differ in shape: {p.shape} vs {q.shape}")
    p = p / p.sum()
    q = q / q.sum()
    m = p > 0
    if np.any(q[m] <= 0):
        return math.inf
    return float(np.sum(p[m] * np.log(p[m] / q[m])))


def phi_positive_fraction(phi: np.ndarray) -> float:
    """Population of the φ > 0 basins (αL / C7ax): 0 < φ < 2.2 rad."""
    phi = np.asarray(phi)
    return float(np.mean((phi > 0) & (phi < 2.2)))


# ------------------------------------------------------------------------------ model on a grid
def grid_values(predict: Callable[[Any], Any], points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ensemble ``predict(s) -> (mean_kT, std_kT)`` at ``points`` ``[..., d]``, as float64 arrays
    of shape ``points.shape[:-1]``."""
    import torch

    pts = np.asarray(points, dtype=np.float64)
    with torch.no_grad():
        mean, std = predict(torch.as_tensor(pts.reshape(-1, pts.shape[-1])))
    shape = pts.shape[:-1]
    return (
        np.asarray(mean.detach().cpu(), dtype=np.float64).reshape(shape),
        np.asarray(std.detach().cpu(), dtype=np.float64).reshape(shape),
    )


def model_probabilities(F_kT: np.ndarray) -> np.ndarray:
    """Bin probabilities ``exp(-F) / Σ exp(-F)`` of free energies at bin centres (kT)."""
    F = np.asarray(F_kT, dtype=np.float64)
    if not np.isfinite(F).all():
        raise ValueError("model free energies must be finite on every bin")
    w = np.exp(-(F - F.min()))
    return w / w.sum()


def free_energy_from_counts(counts: np.ndarray) -> np.ndarray:
    """``F = -log p`` (kT) of histogram counts, shifted to min 0; NaN where a bin is empty."""
    c = np.asarray(counts, dtype=np.float64)
    if c.sum() <= 0 or (c < 0).any():
        raise ValueError("counts must be non-negative with a positive total")
    with np.errstate(divide="ignore"):
        F = -np.log(c / c.sum())
    F[c == 0] = np.nan
    return F - np.nanmin(F)


# ----------------------------------------------------------------------------- basins and ΔF
#: φ range of the φ > 0 basins (αL, C7ax), radians (open interval)
PHI_POSITIVE_RAD = (0.0, 2.2)
#: ψ band of αR outside the φ > 0 range, radians (open interval); β is the rest (wraps past ±π)
ALPHA_R_PSI_RAD = (-2.1, 1.0)


def basin_masks(grid: Grid2D) -> dict[str, np.ndarray]:
    """Boolean ``[bins, bins]`` masks of the basins, by bin centre (a partition of the grid).

    * ``phi_pos``: 0 < φ < 2.2 rad (αL and C7ax);
    * ``alpha_R``: φ outside (0, 2.2) and −2.1 < ψ < 1.0 rad;
    * ``beta``: φ outside (0, 2.2) and ψ outside that band (β / C5 and PII, across ψ = ±π).
    """
    if grid.shifted:
        raise ValueError("basins are defined on an unshifted (φ, ψ) grid")
    c = grid.centres_phi_psi()
    phi, psi = c[..., 0], c[..., 1]
    pos = (phi > PHI_POSITIVE_RAD[0]) & (phi < PHI_POSITIVE_RAD[1])
    band = (psi > ALPHA_R_PSI_RAD[0]) & (psi < ALPHA_R_PSI_RAD[1])
    return {"phi_pos": pos, "alpha_R": ~pos & band, "beta": ~pos & ~band}


def region_free_energy_kT(p: np.ndarray, mask: np.ndarray) -> float:
    """``-log Σ_{b in mask} p_b`` of normalised bin probabilities (inf for an empty region)."""
    total = float(np.asarray(p, dtype=np.float64)[mask].sum())
    return math.inf if total <= 0 else -math.log(total)


def delta_F_kT(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """``F(a) - F(b)`` in kT of two regions (boolean masks) of bin probabilities ``p``."""
    p = np.asarray(p, dtype=np.float64)
    p = p / p.sum()
    return region_free_energy_kT(p, a) - region_free_energy_kT(p, b)


def delta_F_stderr_kT(ladder_counts: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Standard error of ``F(a) - F(b)`` from independent chains' counts ``[L, bins, bins]``.

    Linearised about the pooled populations P_a, P_b: ``δΔF ≈ δP_b/P_b − δP_a/P_a``, with the
    spread of the per-chain values (chains may have empty regions).
    """
    c = np.asarray(ladder_counts, dtype=np.float64)
    if c.ndim != 3 or len(c) < 2:
        raise ValueError("need counts [chains >= 2, bins, bins]")
    n = c.reshape(len(c), -1).sum(axis=1)
    pa, pb = c[:, a].sum(axis=1) / n, c[:, b].sum(axis=1) / n
    pa_all, pb_all = c[:, a].sum() / n.sum(), c[:, b].sum() / n.sum()
    x = pb / pb_all - pa / pa_all
    return float(np.std(x, ddof=1) / math.sqrt(len(c)))


def rmse_free_energy_kT(
    F_model_kT: np.ndarray, counts_ref: np.ndarray, min_count: int = 20
) -> float:
    """RMSE (kT) of ``F = -log p`` per bin, model vs reference, over bins with at least
    ``min_count`` reference counts, after removing the best constant shift (mean difference)."""
    c = np.asarray(counts_ref, dtype=np.float64)
    sel = c >= min_count
    if not sel.any():
        raise ValueError(f"no bin has >= {min_count} reference counts")
    d = -np.log(model_probabilities(F_model_kT)[sel]) + np.log(c[sel] / c.sum())
    return float(np.sqrt(np.mean((d - d.mean()) ** 2)))


# -------------------------------------------------------------------- alanine dipeptide metrics
#: grids of the forward KLD; std100 also gives the basin ΔF, std36 the RMSE
KLD_GRIDS = ("std100", "shifted100", "std36")
#: basin pairs (a, b) whose F(a) − F(b) is reported, by metric name
DELTA_F_PAIRS = {"phi_pos": ("phi_pos", "not_phi_pos"), "aR_beta": ("alpha_R", "beta")}
#: reference bins with fewer counts are left out of the RMSE
RMSE_MIN_COUNT = 20


def _pair_masks(grid: Grid2D) -> dict[str, np.ndarray]:
    m = basin_masks(grid)
    return {**m, "not_phi_pos": ~m["phi_pos"]}


def aldp_metrics(
    model_F_kT: Mapping[str, np.ndarray],
    ref_counts: Mapping[str, np.ndarray],
    kld_floors: Mapping[str, float] | None = None,
    ref_ladder_counts_std100: np.ndarray | None = None,
    rmse_min_count: int = RMSE_MIN_COUNT,
) -> dict[str, float]:
    """KLD per grid (with the reference's noise floor), basin ΔF (model, reference, error, and
    the reference's standard error if chain counts are given) and the RMSE of F on std36.

    ``model_F_kT[g]`` are the model's free energies at the bin centres of grid ``g`` (as
    :meth:`Grid2D.centres_phi_psi`), ``ref_counts[g]`` the reference counts on ``g``.
    """
    out: dict[str, float] = {}
    for g in KLD_GRIDS:
        out[f"kld_{g}"] = forward_kld(ref_counts[g], model_probabilities(model_F_kT[g]))
    out.update({f"kld_floor_{k}": float(v) for k, v in (kld_floors or {}).items()})
    masks = _pair_masks(GRIDS["std100"])
    p_model = model_probabilities(model_F_kT["std100"])
    p_ref = np.asarray(ref_counts["std100"], dtype=np.float64)
    for name, (a, b) in DELTA_F_PAIRS.items():
        model = delta_F_kT(p_model, masks[a], masks[b])
        ref = delta_F_kT(p_ref, masks[a], masks[b])
        out[f"dF_{name}_kT"] = model
        out[f"dF_{name}_ref_kT"] = ref
        out[f"dF_{name}_err_kT"] = model - ref
        if ref_ladder_counts_std100 is not None:
            out[f"dF_{name}_ref_stderr_kT"] = delta_F_stderr_kT(
                ref_ladder_counts_std100, masks[a], masks[b]
            )
    out["rmse_F_std36_kT"] = rmse_free_energy_kT(
        model_F_kT["std36"], ref_counts["std36"], rmse_min_count
    )
    return out


def aldp_evaluation(predict: Callable[[Any], Any], reference: Any) -> dict[str, float]:
    """:func:`aldp_metrics` of an ensemble's ``predict`` against a reference file's content
    (``cgflow.reference.load_reference``: counts per grid, per-chain counts, summary)."""
    model = {g: grid_values(predict, GRIDS[g].centres_phi_psi())[0] for g in KLD_GRIDS}
    counts = {g: reference[f"counts_{g}"] for g in KLD_GRIDS}
    floors = json.loads(reference.attrs.get("summary", "{}")).get("kld_noise_floor", {})
    ladders = reference.arrays.get("ladder_counts_std100")
    return aldp_metrics(model, counts, floors, ladders)


# ------------------------------------------------------------------ systems with an exact PMF
def exact_pmf_metrics(
    F_model_kT: np.ndarray, F_exact_kT: np.ndarray, std_kT: np.ndarray, max_F_kT: float = 10.0
) -> dict[str, float]:
    """Model vs exact PMF at bin centres: max |ΔF| where the exact F <= ``max_F_kT`` (model
    aligned at the exact minimum), forward KLD of the bin probabilities, largest ensemble std."""
    f = np.asarray(F_model_kT, dtype=np.float64)
    exact = np.asarray(F_exact_kT, dtype=np.float64)
    i_min = int(np.argmin(exact))
    f = f - f[i_min] + exact[i_min]
    sel = exact <= exact[i_min] + max_F_kT
    return {
        "max_abs_dF_kT": float(np.abs(f - exact)[sel].max()),
        "kld": forward_kld(np.exp(-(exact - exact.min())), model_probabilities(f)),
        "max_std_kT": float(np.max(std_kT)),
    }
