"""Backmapping: all-atom structures drawn from the flow at fixed CG points, as trajectories.

The flow generates the fine-grained internal coordinates given the CG coordinates, so every
structure has exactly the requested CG values; only draws that pass the system's chirality
filter (and are finite) are kept. Trajectories are written for mdtraj/VMD: a PDB with the
topology and the first frame, and a DCD with all frames.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .data import atomic_path


@dataclass
class Backmapped:
    """Kept structures at one CG point and how many draws it took."""

    s: tuple[float, ...]  #: the CG point (rad for dihedrals)
    x_nm: np.ndarray  #: [n_kept, n_atoms, 3] Cartesian coordinates, nm
    n_drawn: int


def backmap_point(
    flow: torch.nn.Module,
    system: Any,
    s: Sequence[float],
    n_structures: int,
    generator: torch.Generator,
    max_draws: int | None = None,
) -> Backmapped:
    """Draw from ``q(x_FG | s)`` in batches of ``n_structures`` until that many pass the
    filter or ``max_draws`` (default 10 x ``n_structures``) draws were made."""
    from .training import draw

    if n_structures < 1:
        raise ValueError(f"n_structures must be >= 1, got {n_structures}")
    if len(s) != system.cg_spec.dim:
        raise ValueError(
            f"CG point {list(s)} has {len(s)} values, system needs {system.cg_spec.dim}"
        )
    max_draws = 10 * n_structures if max_draws is None else max_draws
    dtype = next(flow.parameters()).dtype
    point = torch.tensor([list(s)], dtype=dtype)
    kept: list[torch.Tensor] = []
    n_kept = n_drawn = 0
    with torch.no_grad():
        while n_kept < n_structures and n_drawn < max_draws:
            d = draw(flow, system, point.repeat(n_structures, 1), generator)
            x, _ = system.to_cartesian(d.z.to(torch.float64))
            kept.append(x[d.kept])
            n_kept += int(d.kept.sum())
            n_drawn += n_structures
    x_all = torch.cat(kept)[:n_structures].reshape(-1, *system.config_shape)
    return Backmapped(tuple(float(v) for v in s), x_all.numpy(), n_drawn)


def mdtraj_topology(system: Any) -> Any:
    """The system's topology as an mdtraj ``Topology`` (from its OpenMM topology)."""
    import mdtraj

    top = getattr(system, "topology", None)
    if top is None:
        raise ValueError(f"system {system.name!r} has no all-atom topology to write structures")
    return mdtraj.Topology.from_openmm(top)


def write_trajectory(
    x_nm: np.ndarray, topology: Any, pdb_out: str | os.PathLike, dcd_out: str | os.PathLike
) -> None:
    """Write frames ``[n, n_atoms, 3]`` (nm) as a PDB (first frame) and a DCD (all frames)."""
    import mdtraj

    x = np.asarray(x_nm, dtype=np.float32)
    if len(x) == 0:
        raise ValueError("no structure to write (every draw failed the chirality filter)")
    traj = mdtraj.Trajectory(x, topology)
    with atomic_path(pdb_out) as tmp:
        traj[0].save_pdb(str(tmp))
    with atomic_path(dcd_out) as tmp:
        traj.save_dcd(str(tmp))
