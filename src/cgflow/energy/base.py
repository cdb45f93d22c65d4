"""The one batched energy API shared by every backend.

A backend maps a batch of configurations ``x`` (``[B, N, 3]`` in nm for molecules, ``[B, D]`` for
analytic potentials) to potential energies ``U[B]`` (kJ/mol for molecules, the potential's own
unit otherwise) and, on request, forces ``F = -dU/dx`` of the same shape as ``x``.

Contract for every backend:

* Non-finite input never crashes or hangs: a configuration with a NaN/inf coordinate gets a
  NaN energy and NaN forces. Callers count and drop them (:func:`count_invalid`).
* Backends are context managers; ``close()`` releases worker processes and contexts and is
  idempotent.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np


class EnergyBackend(ABC):
    """Batched potential energies (and forces) of one system."""

    #: unit of the returned energies, e.g. ``"kJ/mol"``
    energy_unit: str = "kJ/mol"
    #: unit of the coordinates, e.g. ``"nm"``
    length_unit: str = "nm"

    @abstractmethod
    def energies(self, x: Any) -> Any:
        """Potential energies ``U[B]`` of a batch ``x``."""

    @abstractmethod
    def energies_and_forces(self, x: Any) -> tuple[Any, Any]:
        """Potential energies ``U[B]`` and forces ``-dU/dx`` (shape of ``x``)."""

    def close(self) -> None:  # noqa: B027 - optional hook, a no-op for in-process backends
        """Release resources (idempotent)."""

    def __enter__(self) -> EnergyBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def finite_rows(x: np.ndarray) -> np.ndarray:
    """Boolean mask ``[B]`` of configurations whose coordinates are all finite."""
    x = np.asarray(x)
    return np.isfinite(x.reshape(x.shape[0], -1)).all(axis=1)


def count_invalid(u: Any) -> int:
    """Number of non-finite energies in a batch (numpy or torch)."""
    arr = u.detach().cpu().numpy() if hasattr(u, "detach") else np.asarray(u)
    return int((~np.isfinite(arr)).sum())
