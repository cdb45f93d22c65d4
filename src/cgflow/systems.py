"""Physical systems behind one small interface, and a registry so a config can name one.

A :class:`System` knows

* the shape of one configuration (``(N, 3)`` nm for molecules, ``(D,)`` for analytic potentials);
* its thermal energy: ``kT`` in kJ/mol at a temperature in K for molecules, a plain ``beta``
  (inverse energy unit) for dimensionless toy potentials; the reduced energy is
  ``u(x) = beta * U(x)``;
* an invertible map to *internal* coordinates ``z`` with ``log|det dx/dz|`` (a Z-matrix for
  molecules, a constant linear map for analytic systems), the positions of the CG coordinates
  in ``z``, which internal coordinates are circular, and the CG map ``s(x)``;
* how to build energy backends, and a starting configuration (energy-minimised for molecules).

Registered systems: ``mueller_brown``, ``alanine_dipeptide`` and ``analytic`` (a user potential
``module:function`` plus a CG map). :func:`get_system` builds one by name.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .energy.analytic import AnalyticEnergy, EnergyAndGradient, Potential
from .energy.base import EnergyBackend

#: molar gas constant in kJ/(mol K) (CODATA 2018, as in openmm.unit)
R_KJ_PER_MOL_K = 8.314462618e-3


@dataclass(frozen=True)
class CGSpec:
    """The coarse-grained coordinates: names, periodicity and ranges (radians if periodic)."""

    names: tuple[str, ...]
    periodic: tuple[bool, ...]
    bounds: tuple[tuple[float, float], ...]

    def __post_init__(self) -> None:
        n = len(self.names)
        if len(self.periodic) != n or len(self.bounds) != n:
            raise ValueError(
                f"CG spec: {n} names but {len(self.periodic)} periodic flags and "
                f"{len(self.bounds)} bounds"
            )
        for name, (lo, hi) in zip(self.names, self.bounds, strict=True):
            if not hi > lo:
                raise ValueError(f"CG coordinate {name!r}: upper bound {hi} <= lower bound {lo}")

    @property
    def dim(self) -> int:
        return len(self.names)


class System(ABC):
    """A system whose coarse-grained free-energy surface is learned."""

    name: str
    #: shape of one configuration
    config_shape: tuple[int, ...]
    #: inverse thermal energy, in 1/energy_unit
    beta: float
    energy_unit: str
    length_unit: str
    temperature_K: float | None = None
    cg_spec: CGSpec
    #: positions of the CG coordinates in the internal vector
    cg_indices: tuple[int, ...]

    @property
    def kT(self) -> float:
        """Thermal energy in :attr:`energy_unit`."""
        return 1.0 / self.beta

    @property
    def n_internal(self) -> int:
        return int(np.prod(self.config_shape)) - (6 if len(self.config_shape) == 2 else 0)

    @property
    def fg_indices(self) -> tuple[int, ...]:
        """Positions of the fine-grained coordinates in the internal vector."""
        cg = set(self.cg_indices)
        return tuple(i for i in range(self.n_internal) if i not in cg)

    @property
    @abstractmethod
    def internal_circular(self) -> torch.Tensor:
        """Boolean mask over the internal vector: which coordinates are angles on a circle."""

    @abstractmethod
    def energy_backend(self, kind: str = "torch", **options: Any) -> EnergyBackend:
        """A new energy backend of ``kind`` for this system."""

    @abstractmethod
    def to_internal(self, x: torch.Tensor) -> torch.Tensor:
        """Configurations ``[B, *config_shape]`` -> internal coordinates ``[B, n_internal]``."""

    @abstractmethod
    def to_cartesian(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Internal coordinates -> configurations and ``log|det dx/dz|`` ``[B]``."""

    @abstractmethod
    def initial_configuration(self) -> tuple[np.ndarray, int]:
        """A starting configuration and the energy evaluations spent making it."""

    @functools.cached_property
    def _default_backend(self) -> EnergyBackend:
        return self.energy_backend("torch", dtype=torch.float64)

    def energies(self, x: Any) -> torch.Tensor:
        """Potential energies ``U[B]`` in :attr:`energy_unit` (torch float64, differentiable)."""
        return self._default_backend.energies(x)

    def reduced_energy(self, x: Any) -> torch.Tensor:
        """Reduced energies ``u = beta * U`` (dimensionless, in kT)."""
        return self.beta * self.energies(x)

    def cg(self, x: torch.Tensor) -> torch.Tensor:
        """The CG map ``s(x)`` ``[B, n_cg]``."""
        x = torch.as_tensor(x)
        return self.to_internal(x)[:, list(self.cg_indices)]

    def is_l(self, x: torch.Tensor) -> torch.Tensor:
        """Chirality filter: True for configurations to keep (all, unless a system defines it)."""
        x = torch.as_tensor(x)
        return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)

    def log_target(self, z: torch.Tensor) -> torch.Tensor:
        """Unnormalised log density over internal coordinates: ``-u(x(z)) + log|det dx/dz|``."""
        x, log_det = self.to_cartesian(z)
        return -self.reduced_energy(x).to(log_det.dtype) + log_det

    def describe(self) -> dict[str, Any]:
        """Attributes recorded in every file the system's data goes into."""
        out: dict[str, Any] = {"system": self.name, "beta": self.beta}
        if self.temperature_K is not None:
            out["temperature_K"] = self.temperature_K
            out["kT_kJ_per_mol"] = self.kT
        return out


# --------------------------------------------------------------------------- analytic systems


class AnalyticSystem(System):
    """An n-D potential ``U(x[B, D]) -> [B]`` given as a torch callable, with a CG map.

    ``energy_and_gradient`` (optional): ``x -> (U, dU/dx)`` in closed form, used for forces
    instead of autograd through ``potential`` (several times faster for tiny batches).

    Internal coordinates are ``z = x @ A.T`` for an invertible ``A`` (identity by default), so
    ``log|det dx/dz| = -log|det A|`` is constant; the CG coordinates are ``z[cg_indices]``.
    """

    energy_unit = "1"
    length_unit = "1"

    def __init__(
        self,
        name: str,
        potential: Potential,
        dim: int,
        beta: float,
        cg_indices: Sequence[int],
        cg_spec: CGSpec,
        transform: Sequence[Sequence[float]] | None = None,
        x0: Sequence[float] | None = None,
        energy_and_gradient: EnergyAndGradient | None = None,
    ) -> None:
        if dim < 2:
            raise ValueError(f"analytic system {name!r}: dim must be >= 2, got {dim}")
        if beta <= 0:
            raise ValueError(f"analytic system {name!r}: beta must be > 0, got {beta}")
        bad = [i for i in cg_indices if not 0 <= i < dim]
        if bad or len(set(cg_indices)) != len(cg_indices) or not cg_indices:
            raise ValueError(
                f"analytic system {name!r}: cg_indices {list(cg_indices)} must be distinct "
                f"indices in [0, {dim})"
            )
        if cg_spec.dim != len(cg_indices):
            raise ValueError(
                f"analytic system {name!r}: {len(cg_indices)} CG indices but the CG spec has "
                f"{cg_spec.dim} coordinates"
            )
        a = (
            torch.eye(dim, dtype=torch.float64)
            if transform is None
            else torch.tensor(transform, dtype=torch.float64)
        )
        if a.shape != (dim, dim):
            raise ValueError(f"analytic system {name!r}: transform must be {dim}x{dim}")
        det = float(torch.linalg.det(a))
        if abs(det) < 1e-12:
            raise ValueError(f"analytic system {name!r}: transform is singular")
        self.name = name
        self.potential = potential
        self.energy_and_gradient = energy_and_gradient
        self.config_shape = (dim,)
        self.beta = float(beta)
        self.cg_indices = tuple(int(i) for i in cg_indices)
        self.cg_spec = cg_spec
        self._a = a
        self._a_inv = torch.linalg.inv(a)
        self._log_det_inv = -math.log(abs(det))
        self._x0 = None if x0 is None else np.asarray(x0, dtype=np.float64)
        if self._x0 is not None and self._x0.shape != (dim,):
            raise ValueError(f"analytic system {name!r}: x0 must have {dim} entries")

    @property
    def internal_circular(self) -> torch.Tensor:
        mask = torch.zeros(self.config_shape[0], dtype=torch.bool)
        for i, periodic in zip(self.cg_indices, self.cg_spec.periodic, strict=True):
            mask[i] = periodic
        return mask

    @property
    def n_internal(self) -> int:
        return self.config_shape[0]

    def energy_backend(self, kind: str = "torch", **options: Any) -> EnergyBackend:
        if kind not in ("torch", "analytic"):
            raise ValueError(
                f"system {self.name!r} is analytic: only the 'torch' energy backend applies, "
                f"not {kind!r}"
            )
        return AnalyticEnergy(
            self.potential,
            self.config_shape[0],
            energy_and_gradient=self.energy_and_gradient,
            **options,
        )

    def to_internal(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x)
        return x @ self._a.to(x).T

    def to_cartesian(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.as_tensor(z)
        x = z @ self._a_inv.to(z).T
        return x, torch.full(z.shape[:1], self._log_det_inv, dtype=z.dtype, device=z.device)

    def initial_configuration(self, n_starts: int = 8, seed: int = 0) -> tuple[np.ndarray, int]:
        """``x0`` if given, else the lowest of ``n_starts`` minimisations from seeded N(0, 1)
        starts (all their energy evaluations counted)."""
        if self._x0 is not None:
            return self._x0.copy(), 0
        from .energy.minimize import minimize_energy

        starts = np.random.default_rng(seed).normal(size=(n_starts, *self.config_shape))
        results = [minimize_energy(self._default_backend, x, gtol=1e-6) for x in starts]
        best = min(results, key=lambda r: r.energy)
        return best.x, sum(r.n_evaluations for r in results)

    def quadrature_pmf(
        self, s: np.ndarray, fg_ranges: Sequence[Sequence[float]], n_points: int
    ) -> np.ndarray:
        """Exact PMF ``F(s)`` in kT (min 0) at CG points ``s [P, n_cg]``: ``−log ∫ p̃(z) dz_FG``
        on a regular grid of ``n_points`` per fine-grained coordinate over ``fg_ranges``
        (``[low, high]`` each; one or two fine-grained coordinates)."""
        fg = list(self.fg_indices)
        if len(fg) not in (1, 2):
            raise ValueError(
                f"analytic system {self.name!r}: quadrature needs 1 or 2 fine-grained "
                f"coordinates, it has {len(fg)}; give evaluation.reference_csv instead"
            )
        if len(fg_ranges) != len(fg) or any(len(r) != 2 or r[0] >= r[1] for r in fg_ranges):
            raise ValueError(
                f"evaluation.fg_range must give [low, high] with low < high for each of the "
                f"{len(fg)} fine-grained coordinates; got {fg_ranges}"
            )
        axes = [torch.linspace(lo, hi, int(n_points), dtype=torch.float64) for lo, hi in fg_ranges]
        fg_grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(fg))
        pts = np.asarray(s, dtype=np.float64).reshape(len(s), -1)
        z = torch.zeros(len(fg_grid), self.n_internal, dtype=torch.float64)
        z[:, fg] = fg_grid
        out = np.empty(len(pts))
        with torch.no_grad():
            for k, si in enumerate(pts):
                z[:, list(self.cg_indices)] = torch.as_tensor(si)
                out[k] = -float(torch.logsumexp(self.log_target(z), dim=0))
        return out - out.min()


# Müller–Brown parameters (method-spec §1.5)
MB_A = (-200.0, -100.0, -170.0, 15.0)
MB_a = (-1.0, -1.0, -6.5, 0.7)
MB_b = (0.0, 0.0, 11.0, 0.6)
MB_c = (-10.0, -10.0, -6.5, 0.7)
MB_X0 = (1.0, 0.0, -0.5, -1.0)
MB_Y0 = (0.0, 0.5, 1.5, 1.0)


#: the parameters as rows A, a, b, c, x0, y0 (one column per Gaussian term)
_MB_TABLE = torch.tensor((MB_A, MB_a, MB_b, MB_c, MB_X0, MB_Y0), dtype=torch.float64)


def _mueller_brown_terms(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The four terms ``A_k exp(...)`` ``[..., 4]`` and the offsets dx, dy ``[..., 4]``."""
    A, a, b, c, x0, y0 = _MB_TABLE.to(x)
    dx, dy = x[..., :1] - x0, x[..., 1:] - y0
    return A * torch.exp(dx * (a * dx + b * dy) + c * dy * dy), dx, dy


def mueller_brown_potential(x: torch.Tensor) -> torch.Tensor:
    """The Müller–Brown potential ``U(x, y)`` for a batch ``x[B, 2]`` (dimensionless)."""
    return _mueller_brown_terms(x)[0].sum(dim=-1)


def mueller_brown_energy_and_gradient(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``U(x) [B]`` and its gradient ``dU/dx [B, 2]`` in closed form (no autograd graph)."""
    terms, dx, dy = _mueller_brown_terms(x)
    _, a, b, c, _, _ = _MB_TABLE.to(x)
    grad_x = (terms * (2.0 * a * dx + b * dy)).sum(dim=-1)
    grad_y = (terms * (b * dx + 2.0 * c * dy)).sum(dim=-1)
    return terms.sum(dim=-1), torch.stack((grad_x, grad_y), dim=-1)


class MuellerBrown(AnalyticSystem):
    """Müller–Brown at ``beta = 0.1``; CG ``s = x - y``, fine-grained ``s_perp = x + y``."""

    def __init__(self, beta: float = 0.1, bounds: tuple[float, float] = (-2.5, 1.1)) -> None:
        super().__init__(
            name="mueller_brown",
            potential=mueller_brown_potential,
            energy_and_gradient=mueller_brown_energy_and_gradient,
            dim=2,
            beta=beta,
            cg_indices=(0,),
            cg_spec=CGSpec(names=("s",), periodic=(False,), bounds=(tuple(bounds),)),
            transform=((1.0, -1.0), (1.0, 1.0)),
            x0=(-0.558, 1.442),  # the deepest minimum
        )

    def exact_pmf(
        self,
        s: Sequence[float] | np.ndarray,
        s_perp_range: tuple[float, float] = (-4.0, 8.0),
        n_nodes: int = 4001,
    ) -> np.ndarray:
        """Exact PMF ``F(s)`` in kT by quadrature over ``s_perp``, shifted to min 0.

        ``F(s) = -log ∫ exp(-beta U(x, y)) ds_perp`` with ``x = (s + s_perp)/2``,
        ``y = (s_perp - s)/2``: :meth:`quadrature_pmf` on ``n_nodes`` nodes over
        ``s_perp_range``. For this smooth, rapidly decaying integrand it agrees with adaptive
        quadrature to ~1e-14 kT (a test checks 1e-9 kT).
        """
        s = np.asarray(s, dtype=np.float64)
        if s.ndim != 1 or not np.isfinite(s).all():
            raise ValueError("exact_pmf needs a 1-D array of finite CG values")
        return self.quadrature_pmf(s[:, None], [s_perp_range], n_nodes)


# -------------------------------------------------------------------------- molecular systems
class MolecularSystem(System):
    """A molecule given as an OpenMM ``System`` + Z-matrix + CG dihedrals, at a temperature.

    The path to other peptides: build the OpenMM System (any supported force field), write its
    Z-matrix, name the CG dihedrals' positions in the internal vector, and register a factory.
    """

    energy_unit = "kJ/mol"
    length_unit = "nm"

    def __init__(
        self,
        name: str,
        openmm_system: Any,
        positions_nm: np.ndarray,
        zmatrix: Any,
        cg_indices: Sequence[int],
        cg_names: Sequence[str],
        circular: frozenset[int],
        temperature_K: float,
        topology: Any = None,
        chirality_atoms: dict[str, int] | None = None,
    ) -> None:
        if temperature_K <= 0:
            raise ValueError(f"system {name!r}: temperature must be > 0 K, got {temperature_K}")
        zmatrix.validate()
        n = openmm_system.getNumParticles()
        if zmatrix.n_atoms != n:
            raise ValueError(
                f"system {name!r}: Z-matrix covers {zmatrix.n_atoms} atoms, system has {n}"
            )
        self.name = name
        self.openmm_system = openmm_system
        self.positions_nm = np.asarray(positions_nm, dtype=np.float64)
        self.zmatrix = zmatrix
        self.config_shape = (n, 3)
        self.temperature_K = float(temperature_K)
        self.beta = 1.0 / (R_KJ_PER_MOL_K * self.temperature_K)
        self.cg_indices = tuple(int(i) for i in cg_indices)
        self.cg_spec = CGSpec(
            names=tuple(cg_names),
            periodic=(True,) * len(cg_names),
            bounds=((-math.pi, math.pi),) * len(cg_names),
        )
        self._circular = frozenset(circular)
        self.topology = topology
        self.chirality_atoms = chirality_atoms

    @property
    def n_atoms(self) -> int:
        return self.config_shape[0]

    @property
    def internal_circular(self) -> torch.Tensor:
        from .coordinates import circular_mask

        return circular_mask(self.zmatrix, self._circular)

    def energy_backend(self, kind: str = "torch", **options: Any) -> EnergyBackend:
        from .energy import make_backend

        return make_backend(kind, self.openmm_system, **options)

    def to_internal(self, x: torch.Tensor) -> torch.Tensor:
        return self.zmatrix.to_internal(torch.as_tensor(x))

    def to_cartesian(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.zmatrix.to_cartesian(torch.as_tensor(z))

    def is_l(self, x: torch.Tensor) -> torch.Tensor:
        """Chirality filter at C-alpha: True for the L form (all True if not defined)."""
        x = torch.as_tensor(x)
        if not self.chirality_atoms:
            return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        from .coordinates import is_l_chiral

        return is_l_chiral(x, **self.chirality_atoms)

    @functools.cached_property
    def _minimised(self) -> tuple[np.ndarray, int]:
        from .energy.minimize import minimize_energy
        from .energy.openmm_backend import OpenMMEnergy

        # double precision (Reference): the CPU platform's mixed-precision energies stall
        # L-BFGS at |F| ~ 1 kJ/mol/nm; a one-off of a few hundred evaluations
        with OpenMMEnergy(self.openmm_system, platform="Reference") as backend:
            res = minimize_energy(backend, self.positions_nm, gtol=1e-2)
        return res.x, res.n_evaluations

    def initial_configuration(self) -> tuple[np.ndarray, int]:
        """The energy-minimised structure (L-BFGS, |F| < 0.01 kJ/mol/nm) and its evaluation count."""
        x, n = self._minimised
        return x.copy(), n


def _openmmtools_testsystem(name: str, **kwargs: Any) -> Any:
    with contextlib.redirect_stdout(io.StringIO()):  # pymbar prints a banner on import
        from openmmtools import testsystems
    return getattr(testsystems, name)(**kwargs)


class AlanineDipeptide(MolecularSystem):
    """Alanine dipeptide, Amber ff96 + OBC1 implicit solvent, no constraints, 300 K; CG = (φ, ψ).

    openmmtools ``AlanineDipeptideImplicit(constraints=None)``: NoCutoff, OBC1 GBSA (mbondi2),
    all bonds flexible. φ = dihedral(4, 6, 8, 14), ψ = dihedral(6, 8, 14, 16) (mdtraj
    convention), at internal positions 17 and 44 of the Z-matrix.
    """

    def __init__(self, temperature_K: float = 300.0, solvent: str = "implicit") -> None:
        from .coordinates import (
            ALDP_CG_INDICES,
            ALDP_CHIRAL_ATOMS,
            ALDP_CIRCULAR,
            ALDP_ZMATRIX,
        )

        names = {"implicit": "AlanineDipeptideImplicit", "vacuum": "AlanineDipeptideVacuum"}
        if solvent not in names:
            raise ValueError(
                f"alanine_dipeptide: solvent must be one of {sorted(names)}, got {solvent!r}"
            )
        from openmm import unit

        ts = _openmmtools_testsystem(names[solvent], constraints=None)
        super().__init__(
            name="alanine_dipeptide" if solvent == "implicit" else "alanine_dipeptide_vacuum",
            openmm_system=ts.system,
            positions_nm=np.asarray(ts.positions.value_in_unit(unit.nanometer)),
            zmatrix=ALDP_ZMATRIX,
            cg_indices=ALDP_CG_INDICES,
            cg_names=("phi", "psi"),
            circular=ALDP_CIRCULAR,
            temperature_K=temperature_K,
            topology=ts.topology,
            chirality_atoms=dict(ALDP_CHIRAL_ATOMS),
        )


# ---------------------------------------------------------------------------------- registry
_REGISTRY: dict[str, Callable[..., System]] = {}


def register_system(name: str) -> Callable[[Callable[..., System]], Callable[..., System]]:
    """Decorator: make a system factory available to :func:`get_system` under ``name``."""

    def deco(factory: Callable[..., System]) -> Callable[..., System]:
        if name in _REGISTRY:
            raise ValueError(f"a system named {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return deco


def available_systems() -> list[str]:
    return sorted(_REGISTRY)


def get_system(name: str, **options: Any) -> System:
    """Build the system registered as ``name`` with ``options`` (from a config)."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown system {name!r}; available: {available_systems()}") from None
    try:
        return factory(**options)
    except TypeError as exc:
        raise ValueError(f"bad options for system {name!r}: {exc}") from None


def load_callable(spec: str) -> Callable[..., Any]:
    """Import ``"package.module:function"``."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected 'module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import module {module_name!r} of {spec!r}: {exc}") from None
    try:
        fn = getattr(module, attr)
    except AttributeError:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not callable(fn):
        raise ValueError(f"{spec!r} is not callable")
    return fn


@register_system("analytic")
def _analytic(
    potential: str | Potential,
    dim: int,
    beta: float,
    cg_indices: Sequence[int],
    cg_periodic: Sequence[bool] | None = None,
    cg_bounds: Sequence[Sequence[float]] | None = None,
    cg_names: Sequence[str] | None = None,
    transform: Sequence[Sequence[float]] | None = None,
    x0: Sequence[float] | None = None,
    name: str = "analytic",
    energy_and_gradient: str | EnergyAndGradient | None = None,
) -> AnalyticSystem:
    fn = load_callable(potential) if isinstance(potential, str) else potential
    if isinstance(energy_and_gradient, str):
        energy_and_gradient = load_callable(energy_and_gradient)
    n = len(cg_indices)
    periodic = tuple(bool(p) for p in (cg_periodic or [False] * n))
    if cg_bounds is None:
        raise ValueError(
            "analytic system: cg_bounds (a [low, high] range per CG coordinate) is required"
        )
    bounds = tuple((float(lo), float(hi)) for lo, hi in cg_bounds)
    names = tuple(cg_names or [f"s{i}" for i in range(n)])
    return AnalyticSystem(
        name=name,
        potential=fn,
        dim=int(dim),
        beta=float(beta),
        cg_indices=cg_indices,
        cg_spec=CGSpec(names=names, periodic=periodic, bounds=bounds),
        transform=transform,
        x0=x0,
        energy_and_gradient=energy_and_gradient,
    )


register_system("mueller_brown")(MuellerBrown)
register_system("alanine_dipeptide")(AlanineDipeptide)
