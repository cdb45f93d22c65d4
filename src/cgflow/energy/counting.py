"""Counting potential-energy evaluations by kind: the two rules every part of cgflow follows.

1. **Energy calls.** One evaluation = one potential-energy (with or without forces)
   evaluation of the target for one configuration. Every backend a campaign uses is wrapped in
   :class:`CountingBackend`, which counts each configuration it is asked for, so no call site
   can forget to count.
2. **Dynamics.** An integrator that evaluates forces inside its own engine (OpenMM Langevin,
   metadynamics, batched BAOAB) or a Metropolis chain costs one evaluation per step and copy:
   :func:`dynamics_evaluations`.

The cost N of a campaign is the sum over all *counted* kinds; kinds that are recorded for
information only (flow draws before the chirality filter) are listed in :data:`UNCOUNTED_KINDS`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from .base import EnergyBackend

#: kinds that make up the cost N of a campaign
COUNTED_KINDS = ("start_md", "minimisation", "training", "labels")
#: kinds recorded beside the counted ones but not part of N
UNCOUNTED_KINDS = ("training_draws",)


class EvaluationCounter:
    """Energy evaluations by kind; add, merge, total."""

    def __init__(self, counts: Mapping[str, int] | None = None) -> None:
        self._counts: Counter[str] = Counter()
        for kind, n in (counts or {}).items():
            self.add(kind, n)

    def add(self, kind: str, n: int) -> None:
        if kind not in COUNTED_KINDS and kind not in UNCOUNTED_KINDS:
            raise ValueError(
                f"unknown evaluation kind {kind!r}; known: {COUNTED_KINDS + UNCOUNTED_KINDS}"
            )
        if n < 0:
            raise ValueError(f"evaluation count must be >= 0, got {n} for {kind!r}")
        self._counts[kind] += int(n)

    def merge(self, others: Iterable[Mapping[str, int]]) -> EvaluationCounter:
        for other in others:
            for kind, n in other.items():
                self.add(kind, n)
        return self

    @property
    def total(self) -> int:
        """The cost N: the sum over :data:`COUNTED_KINDS`."""
        return sum(self._counts[k] for k in COUNTED_KINDS)

    def as_dict(self) -> dict[str, int]:
        return {k: int(v) for k, v in sorted(self._counts.items())}

    def __getitem__(self, kind: str) -> int:
        return int(self._counts[kind])

    def __repr__(self) -> str:
        return f"EvaluationCounter({self.as_dict()}, total={self.total})"


def dynamics_evaluations(n_steps: int, n_copies: int = 1, start_evaluations: int = 0) -> int:
    """Evaluations of ``n_steps`` steps of ``n_copies`` copies (one per step and copy), plus
    ``start_evaluations`` made before the first step (a Metropolis chain's starting energy)."""
    if n_steps < 0 or n_copies < 0 or start_evaluations < 0:
        raise ValueError(f"negative step or copy count: {n_steps}, {n_copies}, {start_evaluations}")
    return int(n_steps) * int(n_copies) + int(start_evaluations)


class CountingBackend(EnergyBackend):
    """``backend`` with every configuration it evaluates counted as ``kind`` in ``counter``."""

    def __init__(self, backend: EnergyBackend, counter: EvaluationCounter, kind: str) -> None:
        if kind not in COUNTED_KINDS:
            raise ValueError(
                f"energy calls must be counted as one of {COUNTED_KINDS}, not {kind!r}"
            )
        self.inner = backend
        self.counter = counter
        self.kind = kind
        for unit in ("energy_unit", "length_unit"):  # the wrapped backend's, where it names them
            if hasattr(backend, unit):
                setattr(self, unit, getattr(backend, unit))

    def energies(self, x: Any) -> Any:
        self.counter.add(self.kind, len(x))
        return self.inner.energies(x)

    def energies_and_forces(self, x: Any) -> tuple[Any, Any]:
        self.counter.add(self.kind, len(x))
        return self.inner.energies_and_forces(x)

    def close(self) -> None:
        self.inner.close()


def counted(backend: EnergyBackend, counter: EvaluationCounter, kind: str) -> CountingBackend:
    """``backend`` counted as ``kind`` in ``counter`` (as is if it already is)."""
    if isinstance(backend, CountingBackend) and backend.counter is counter and backend.kind == kind:
        return backend
    return CountingBackend(backend, counter, kind)
