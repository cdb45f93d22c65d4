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

import math
from dataclasses import dataclass

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

    def histogram(self, phi_psi: np.ndarray) -> np.ndarray:
        """Counts ``[bins, bins]`` (int64) of standard (φ, ψ) samples on this grid."""
        g = self.coordinates(phi_psi)
        idx = np.floor((g + math.pi) / (2 * math.pi) * self.bins).astype(np.int64)
        idx = np.clip(idx, 0, self.bins - 1)  # wrap() may return exactly -π; guard rounding
        flat = idx[:, 0] * self.bins + idx[:, 1]
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


def phi_positive_fraction_from_counts(counts: np.ndarray, grid: Grid2D) -> float:
    """φ > 0 population (0 < φ < 2.2 rad) from counts on an unshifted grid (bin centres)."""
    if grid.shifted:
        raise ValueError("use an unshifted grid for the φ > 0 population")
    c = grid.centres
    sel = (c > 0) & (c < 2.2)
    return float(counts[sel].sum() / counts.sum())
