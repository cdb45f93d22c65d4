"""Local energy minimisation over any backend, counting every evaluation.

OpenMM's ``LocalEnergyMinimizer`` does not report how many energy evaluations it made, and the
counting rule of a campaign needs that number, so minimisation runs scipy's L-BFGS-B on the
backend's ``energies_and_forces`` through :class:`~cgflow.energy.counting.CountingBackend` and
returns the exact count. BLAS runs on one thread inside (threadpoolctl): L-BFGS-B's sums
otherwise depend on the number of BLAS threads, so the same structure would minimise to a
slightly different minimum, with another count, in a Snakemake job (one thread) and in an
interactive process.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

from .base import EnergyBackend
from .counting import CountingBackend, EvaluationCounter


@dataclass(frozen=True)
class MinimisationResult:
    x: np.ndarray  #: minimised configuration (same shape as the start)
    energy: float  #: its potential energy (backend units)
    n_evaluations: int  #: energy+force evaluations made
    converged: bool


def minimize_energy(
    backend: EnergyBackend, x0: np.ndarray, gtol: float = 1e-3, max_iterations: int = 5000
) -> MinimisationResult:
    """Minimise the potential energy from ``x0`` with L-BFGS-B.

    Args:
        gtol: stop when the largest force component is below this (backend units per length).
    """
    x0 = np.asarray(x0, dtype=np.float64)
    shape = x0.shape
    counter = EvaluationCounter()
    counted = CountingBackend(backend, counter, "minimisation")

    def fun(flat: np.ndarray) -> tuple[float, np.ndarray]:
        u, f = counted.energies_and_forces(flat.reshape(1, *shape))
        u = np.asarray(u.detach().cpu() if hasattr(u, "detach") else u, dtype=np.float64)
        f = np.asarray(f.detach().cpu() if hasattr(f, "detach") else f, dtype=np.float64)
        if not np.isfinite(u[0]):
            return np.inf, np.zeros_like(flat)
        return float(u[0]), -f.reshape(-1)

    with threadpool_limits(limits=1, user_api="blas"):
        res = minimize(
            fun,
            x0.reshape(-1),
            jac=True,
            method="L-BFGS-B",
            options={"gtol": gtol, "maxiter": max_iterations, "ftol": 0.0, "maxcor": 30},
        )
    return MinimisationResult(
        x=res.x.reshape(shape),
        energy=float(res.fun),
        n_evaluations=counter["minimisation"],
        converged=bool(res.success),
    )
