"""Energy backend for potentials given as batched torch callables (toy systems, user models)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .base import EnergyBackend

Potential = Callable[[torch.Tensor], torch.Tensor]


class AnalyticEnergy(EnergyBackend):
    """Wrap ``potential(x[B, D]) -> U[B]``; forces by autograd.

    Non-finite rows give NaN energy and forces; they are not passed to the potential.
    """

    energy_unit = "potential units"
    length_unit = "1"

    def __init__(self, potential: Potential, dim: int, dtype: torch.dtype = torch.float64) -> None:
        self.potential = potential
        self.dim = dim
        self.dtype = dtype

    def _as_tensor(self, x: Any) -> torch.Tensor:
        x = torch.as_tensor(x, dtype=self.dtype) if not torch.is_tensor(x) else x.to(self.dtype)
        if x.ndim == 1:
            x = x[None]
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(
                f"expected configurations of shape [B, {self.dim}], got {tuple(x.shape)}"
            )
        return x

    def energies(self, x: Any) -> torch.Tensor:
        x = self._as_tensor(x)
        ok = torch.isfinite(x).all(dim=1)
        if bool(ok.all()):
            return self.potential(x)
        safe = torch.where(ok[:, None], x, torch.zeros_like(x))
        u = self.potential(safe)
        return torch.where(ok, u, torch.full_like(u, float("nan")))

    def energies_and_forces(self, x: Any) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._as_tensor(x).detach().requires_grad_(True)
        with torch.enable_grad():
            u = self.energies(x)
            (grad,) = torch.autograd.grad(u.sum(), x)
        f = -grad
        f[~torch.isfinite(u)] = float("nan")
        return u.detach(), f.detach()
