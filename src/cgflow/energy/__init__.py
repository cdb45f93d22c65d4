"""Batched energies for every backend: ``energies(x) -> U`` and ``energies_and_forces(x)``.

Backends: :class:`~cgflow.energy.openmm_backend.OpenMMEnergy` (reference, workflow energy
batches), :class:`~cgflow.energy.torch_backend.TorchEnergy` (batched, differentiable, CPU/GPU),
:class:`~cgflow.energy.analytic.AnalyticEnergy` (torch callables).
"""

from __future__ import annotations

from typing import Any

from .base import EnergyBackend, count_invalid, finite_rows
from .counting import COUNTED_KINDS, UNCOUNTED_KINDS, EvaluationCounter

BACKENDS = ("openmm", "torch")

__all__ = [
    "BACKENDS",
    "COUNTED_KINDS",
    "UNCOUNTED_KINDS",
    "EnergyBackend",
    "EvaluationCounter",
    "count_invalid",
    "finite_rows",
    "make_backend",
]


def make_backend(kind: str, openmm_system: Any, **options: Any) -> EnergyBackend:
    """Build an energy backend of ``kind`` (``"openmm"`` or ``"torch"``) for an OpenMM System.

    ``options`` go to the backend: ``platform, n_workers, chunk_size, platform_properties`` for
    openmm; ``device, dtype`` for torch.
    """
    if kind == "openmm":
        from .openmm_backend import OpenMMEnergy

        return OpenMMEnergy(openmm_system, **options)
    if kind == "torch":
        from .torch_backend import TorchEnergy

        return TorchEnergy.from_openmm(openmm_system, **options)
    raise ValueError(f"unknown energy backend {kind!r}; choose one of {BACKENDS}")
