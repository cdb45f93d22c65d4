"""Energy backend for potentials given as batched torch callables (toy systems, user models)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .base import EnergyBackend

Potential = Callable[[torch.Tensor], torch.Tensor]
EnergyAndGradient = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class AnalyticEnergy(EnergyBackend):
    """Wrap ``potential(x[B, D]) -> U[B]``; forces from ``energy_and_gradient(x) -> (U, dU/dx)``
    when given, else by autograd through ``potential``.

    Non-finite rows give NaN energy and forces; they are not passed to the potential.
    """

    energy_unit = "potential units"
    length_unit = "1"

    def __init__(
        self,
        potential: Potential,
        dim: int,
        dtype: torch.dtype = torch.float64,
        energy_and_gradient: EnergyAndGradient | None = None,
    ) -> None:
        self.potential = potential
        self.energy_and_gradient = energy_and_gradient
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

    @staticmethod
    def _finite_rows(x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The mask of finite rows (None when all are) and ``x`` with the others set to 0, so
        that no NaN or inf reaches the potential."""
        ok = torch.isfinite(x).all(dim=1)
        if bool(ok.all()):
            return None, x
        return ok, torch.where(ok[:, None], x, torch.zeros_like(x))

    def energies(self, x: Any) -> torch.Tensor:
        ok, safe = self._finite_rows(self._as_tensor(x))
        u = self.potential(safe)
        return u if ok is None else torch.where(ok, u, torch.full_like(u, float("nan")))

    def energies_and_forces(self, x: Any) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._as_tensor(x).detach()
        if self.energy_and_gradient is not None:
            ok, safe = self._finite_rows(x)
            out = self.energy_and_gradient(safe)
            if (
                not isinstance(out, tuple)
                or len(out) != 2
                or tuple(out[0].shape) != (len(x),)
                or tuple(out[1].shape) != tuple(x.shape)
            ):
                raise ValueError(
                    "energy_and_gradient must return (U [B], dU/dx [B, D]) for x of shape "
                    f"{tuple(x.shape)}, got {type(out).__name__}"
                    + (
                        f" of shapes {[tuple(t.shape) for t in out]}"
                        if isinstance(out, tuple)
                        else ""
                    )
                )
            u, grad = out
            f = -grad
            if ok is not None:
                u = torch.where(ok, u, float("nan"))
        else:
            x.requires_grad_(True)
            with torch.enable_grad():
                u = self.energies(x)
                (grad,) = torch.autograd.grad(u.sum(), x)
            u, f = u.detach(), -grad
        f[~torch.isfinite(u)] = float("nan")
        return u, f
