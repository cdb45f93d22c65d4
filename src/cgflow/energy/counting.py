"""Counting potential-energy evaluations by kind.

One evaluation = one potential-energy (with or without forces) evaluation of the target for
one configuration. The cost N of a campaign is the sum over all *counted* kinds; kinds that are
recorded for information only (e.g. flow draws before the chirality filter) are listed in
:data:`UNCOUNTED_KINDS`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

#: kinds that make up the cost N of a campaign
COUNTED_KINDS = ("start_md", "minimisation", "training", "diagnostics", "labels")
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
