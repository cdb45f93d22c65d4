"""The validated configuration of one campaign and what derives from it: the system, energy
backends (every call counted), per-stage seeds and the provenance of each file."""

from __future__ import annotations

import os
from typing import Any

import torch
import yaml

from .. import config as cfgmod
from ..data import Provenance, config_hash
from ..energy.counting import CountingBackend, EvaluationCounter

#: stage numbers for seed derivation (stable: changing them changes every result)
STAGES = {
    "start": 0,
    "initial_points": 2,
    "finetune": 3,
    "sample": 4,
    "ensemble": 5,
    "walkers": 6,
    "select_fps": 7,
    "select_spread": 8,
    "select_split": 9,
    "backmap": 10,
}


def check_given(iteration: int, needed: bool, given: bool, setting: str, what: str) -> None:
    """Refuse an optional input that the config needs but is missing, or does not need but is
    given (``setting``: the config keys that decide it, with their values)."""
    if needed != given:
        raise ValueError(
            f"iteration {iteration}: with {setting} the previous {what} must "
            f"{'' if needed else 'not '}be given"
        )


def stage_seed(base: int, iteration: int, stage: str, shard: int = 0) -> int:
    """The seed of one stage (and shard) of one iteration of a campaign seeded ``base``."""
    return (base * 1_000_003 + iteration * 101 + STAGES[stage] + 7919 * shard) % (2**31 - 1)


class Settings:
    """A campaign's configuration, validated against the schema (defaults filled in), plus the
    objects every step derives from it."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        full = cfgmod.validated(cfg)
        self.cfg = cfgmod.snapshot(full)
        self.hash = config_hash(self.cfg)
        self.seed = int(full["seed"])
        self._system = None

    @classmethod
    def load(cls, path: str | os.PathLike) -> Settings:
        """The settings of a config snapshot (``results/<campaign>/config.yaml``)."""
        with open(path) as fh:
            return cls(yaml.load(fh, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)))

    def __getitem__(self, key: str) -> Any:
        return self.cfg[key]

    @property
    def system(self) -> Any:
        if self._system is None:
            from ..systems import get_system

            spec = self["system"]
            self._system = get_system(spec["name"], **spec["options"])
        return self._system

    @property
    def grid_mode(self) -> bool:
        """The grid-conditioning variant (``mode: grid``) instead of active learning."""
        return self["mode"] == "grid"

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self["dtype"])

    @property
    def cg_units(self) -> str:
        return "rad" if all(self.system.cg_spec.periodic) else "1"

    def stage_seed(self, iteration: int, stage: str, shard: int = 0) -> int:
        return stage_seed(self.seed, iteration, stage, shard)

    def provenance(self, iteration: int, seed: int | None = None) -> Provenance:
        s = self.system
        return Provenance(
            system=s.name,
            iteration=iteration,
            seed=self.seed if seed is None else seed,
            config_hash=self.hash,
            kT_kJ_per_mol=s.kT if s.temperature_K is not None else None,
            beta=None if s.temperature_K is not None else s.beta,
        )

    def training_backend(self, counter: EvaluationCounter) -> CountingBackend:
        """The differentiable backend of reverse-KL training, counted as ``training``."""
        from ..systems import AnalyticSystem

        b = dict(self["backend"])
        kind = b.pop("kind")
        b["dtype"] = getattr(torch, b["dtype"])
        if isinstance(self.system, AnalyticSystem):  # a torch callable: only the precision applies
            backend = self.system.energy_backend("torch", dtype=b["dtype"])
        else:
            backend = self.system.energy_backend(kind, **b)
        return CountingBackend(backend, counter, "training")

    def label_backend(self, counter: EvaluationCounter) -> tuple[CountingBackend, dict[str, Any]]:
        """The backend of the label energy batches, counted as ``labels``, and its options."""
        e = self["energy"]
        kind = e["backend"]
        opts: dict[str, Any] = {}
        if kind == "openmm":
            opts = {"platform": e["platform"], "n_workers": int(e["n_workers"])}
        elif kind == "torch":
            opts = {"dtype": getattr(torch, e["torch_dtype"])}
        return CountingBackend(self.system.energy_backend(kind, **opts), counter, "labels"), opts
