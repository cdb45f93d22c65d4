"""OPES (on-the-fly probability enhanced sampling, ``OPES_METAD``) on CG coordinates: a baseline.

Invernizzi & Parrinello (2020). The bias is a function of the CG coordinates ``s``,

    V(s) = (1 - 1/γ) kT log(P̃(s) / Z + ε),   ε = exp(-ΔE / ((1 - 1/γ) kT)),

where ``P̃`` is a weighted kernel density estimate of the *unbiased* distribution of ``s``:
every ``pace`` steps a Gaussian is placed at the current ``s`` with the weight ``exp(V(s)/kT)``
(which undoes the bias), its width shrinking with the effective sample size
``σ = σ₀ (N_eff (d+2)/4)^(-1/(d+4))``, and merged into the nearest kernel (moment-preserving)
when it lies within ``compression_threshold`` of that kernel's widths; ``Z`` is the mean of
``P̃`` over the kernel centres, ``ΔE`` the barrier parameter, ``γ`` the bias factor. The free
energy estimate is ``F(s) = -kT log P̃(s)``. One MD step is one energy evaluation, the
campaign's counting rule; the minimisation before the run is counted too.

Written here because neither maintained option fits: PLUMED's ``OPES_METAD`` needs the PLUMED
kernel (pip's ``plumed`` ships only its Python wrapper) and OpenMM has no OPES. The kernel
bookkeeping is numpy (:class:`OPESKernels`); OpenMM sees the bias as a tabulated function of
``s`` on a grid (splines), refreshed after every deposit, and each deposit's weight uses the
bias the dynamics felt (the table's value, read back from OpenMM): for a molecule a
``CustomCompoundBondForce`` of the CG dihedrals' atoms (a ``CustomCVForce``, as
``openmm.app.Metadynamics`` uses, runs an inner context and costs ~5x the dynamics on CPU),
for Müller–Brown a one-particle ``CustomCompoundBondForce`` of ``x - y``. Differences from
PLUMED's defaults: kernels are not truncated, a merge is not followed by further merges, and no
neighbour list is kept (exact sums over all kernels).

Runs resume from their last snapshot (kernels, weights and the OpenMM checkpoint).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .metadynamics import check_run, save_run

FORMAT_VERSION = 1
KIND = "opes"
#: Müller–Brown in OpenMM: temperature, particle mass and the z restraint (kJ/mol/nm²)
MB_TEMPERATURE_K = 300.0
MB_MASS_AMU = 1.0
MB_Z_SPRING = 1000.0
#: OpenMM force group of the bias (its energy at a deposit is the bias the dynamics felt)
BIAS_GROUP = 31


# ------------------------------------------------------------------------------ the estimator
class OPESKernels:
    """The compressed, reweighted kernel density of OPES and its bias, in kT.

    ``sigma0`` are the initial widths per CG coordinate, ``periods`` the period of each one
    (``None``: not periodic), ``axes`` the grid the bias is tabulated on (per coordinate; for
    periodic ones first = last, as OpenMM's periodic tables want).
    """

    def __init__(
        self,
        sigma0: Sequence[float],
        periods: Sequence[float | None],
        barrier_kT: float,
        bias_factor: float,
        axes: Sequence[np.ndarray],
        compression_threshold: float = 1.0,
        shrink_sigma: bool = True,
    ) -> None:
        if not len(sigma0) == len(periods) == len(axes) or len(sigma0) not in (1, 2):
            raise ValueError("OPES needs 1 or 2 CG coordinates with a width, period and axis each")
        if bias_factor <= 1 or barrier_kT <= 0 or min(sigma0) <= 0:
            raise ValueError("OPES needs bias_factor > 1, barrier > 0 and widths > 0")
        self.d = len(sigma0)
        self.sigma0 = np.asarray(sigma0, dtype=np.float64)
        self.periods = tuple(periods)
        self.prefactor = 1.0 - 1.0 / bias_factor
        self.epsilon = math.exp(-barrier_kT / self.prefactor)
        self.threshold2 = float(compression_threshold) ** 2
        self.shrink_sigma = bool(shrink_sigma)
        self.axes = [np.asarray(a, dtype=np.float64) for a in axes]
        self.centres = np.zeros((0, self.d))
        self.sigmas = np.zeros((0, self.d))
        self.heights = np.zeros(0)
        self.sum_w = self.sum_w2 = 0.0
        self.n_deposits = 0
        self._grid = np.zeros([len(a) for a in reversed(self.axes)])  # [.., y, x]
        self._at_centres = np.zeros(0)  # unnormalised density at each kernel centre

    # -- geometry
    def _diff(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """``a - b`` per coordinate (last axis), the shortest way round on periodic ones."""
        d = np.asarray(a, dtype=np.float64) - b
        for i in range(self.d):
            d[..., i] = self._diff_1d(d[..., i], 0.0, i)
        return d

    def _diff_1d(self, a: np.ndarray, b: Any, i: int) -> np.ndarray:
        """``a - b`` along coordinate ``i``."""
        d = np.asarray(a, dtype=np.float64) - b
        p = self.periods[i]
        return (d + p / 2) % p - p / 2 if p else d

    def _sum(self, points: np.ndarray, idx: Any = slice(None)) -> np.ndarray:
        """Unnormalised density ``Σ_k h_k G_k(points)`` over the kernels ``idx``."""
        pts = np.atleast_2d(np.asarray(points, dtype=np.float64))
        c, s, h = self.centres[idx], self.sigmas[idx], self.heights[idx]
        if len(h) == 0:
            return np.zeros(len(pts))
        z = self._diff(pts[:, None, :], c[None]) / s[None]
        return np.exp(-0.5 * (z * z).sum(-1)) @ h

    def _on_axes(self, axes: Sequence[np.ndarray], idx: Any = slice(None)) -> np.ndarray:
        """Unnormalised density on the grid of ``axes`` (shape ``[.., y, x]``), separably."""
        c, s, h = self.centres[idx], self.sigmas[idx], self.heights[idx]
        per_axis = []
        for i, ax in enumerate(axes):
            z = self._diff_1d(np.asarray(ax)[None, :], c[:, i : i + 1], i)
            per_axis.append(np.exp(-0.5 * (z / s[:, i : i + 1]) ** 2))  # [K, n_i]
        if self.d == 1:
            return h @ per_axis[0]
        return (per_axis[1].T * h) @ per_axis[0]

    # -- bias and free energy
    def bias_kT(self, points: np.ndarray) -> np.ndarray:
        """``V(s) / kT`` at ``points [n, d]`` (``-ΔE/kT`` everywhere before the first kernel:
        ``P̃ = 0``)."""
        if len(self.heights) == 0:
            return np.full(len(np.atleast_2d(points)), self.prefactor * math.log(self.epsilon))
        return self.prefactor * np.log(self._sum(points) / self._at_centres.mean() + self.epsilon)

    def bias_grid_kT(self) -> np.ndarray:
        """``V / kT`` on the bias grid ``[.., y, x]``."""
        if len(self.heights) == 0:
            return np.full_like(self._grid, self.prefactor * math.log(self.epsilon))
        v = self.prefactor * np.log(
            np.maximum(self._grid, 0.0) / self._at_centres.mean() + self.epsilon
        )
        for i, p in enumerate(self.periods):  # first = last exactly (rounding of the wrap)
            if p:
                ax = self.d - 1 - i
                idx = [slice(None)] * self.d
                idx[ax], first = -1, [slice(None)] * self.d
                first[ax] = 0
                v[tuple(idx)] = v[tuple(first)]
        return v

    def free_energy_kT(self, axes: Sequence[np.ndarray], cap_kT: float = 100.0) -> np.ndarray:
        """``F = -log P̃`` on the grid of ``axes`` (``[.., y, x]``), min 0, capped at ``cap_kT``
        where the kernels have no mass."""
        p = self._on_axes(axes)
        F = -np.log(np.maximum(p, p.max() * math.exp(-cap_kT)))
        return F - F.min()

    @property
    def n_eff(self) -> float:
        """Effective sample size of the deposits' weights."""
        return self.sum_w**2 / self.sum_w2 if self.sum_w2 else 0.0

    # -- deposits
    def _add(self, k: int, sign: float) -> None:
        """Add (``sign = 1``) or remove (``-1``) kernel ``k``'s share of the running sums."""
        self._grid += sign * self._on_axes(self.axes, [k])
        self._at_centres += sign * self._sum(self.centres, [k])

    def deposit(self, s: Sequence[float], bias_kT: float | None = None) -> float:
        """Add a kernel at ``s`` with the weight ``exp(V(s)/kT)``; returns the weight.

        ``bias_kT`` is the bias the dynamics felt at ``s`` (e.g. a tabulated ``V``); the
        reweighting is exact only with that one (default: :meth:`bias_kT` from the kernels)."""
        s = np.asarray(s, dtype=np.float64).reshape(self.d)
        v = self.bias_kT(s[None])[0] if bias_kT is None else float(bias_kT)
        w = float(np.exp(v))
        self.sum_w += w
        self.sum_w2 += w * w
        self.n_deposits += 1
        sigma = self.sigma0.copy()
        if self.shrink_sigma:
            sigma *= (self.n_eff * (self.d + 2) / 4.0) ** (-1.0 / (self.d + 4))
        h = w * float(np.prod(self.sigma0 / sigma))
        k = -1
        if len(self.heights):
            z = self._diff(s[None], self.centres) / self.sigmas
            d2 = (z * z).sum(-1)
            if d2.min() < self.threshold2:
                k = int(np.argmin(d2))
        if k >= 0:  # merge into kernel k, keeping its mass, mean and variance
            self._add(k, -1.0)
            h1, c1, s1 = self.heights[k], self.centres[k], self.sigmas[k]
            hk = h1 + h
            delta = self._diff(s, c1)
            self.centres[k] = c1 + h / hk * delta
            for i, p in enumerate(self.periods):
                if p:
                    lo = -p / 2
                    self.centres[k, i] = (self.centres[k, i] - lo) % p + lo
            self.sigmas[k] = np.sqrt((h1 * s1**2 + h * sigma**2) / hk + h1 * h / hk**2 * delta**2)
            self.heights[k] = hk
            self._add(k, 1.0)
            self._at_centres[k] = self._sum(self.centres[k][None])[0]
        else:
            self.centres = np.vstack([self.centres, s[None]])
            self.sigmas = np.vstack([self.sigmas, sigma[None]])
            self.heights = np.append(self.heights, h)
            k = len(self.heights) - 1
            self._at_centres = np.append(self._at_centres, 0.0)
            self._add(k, 1.0)
            self._at_centres[k] = self._sum(s[None])[0]
        return w

    def recompute(self) -> None:
        """Rebuild the running sums from the kernels (no accumulated rounding)."""
        self._grid = np.zeros_like(self._grid)
        for start in range(0, len(self.heights), 512):
            self._grid += self._on_axes(self.axes, slice(start, start + 512))
        self._at_centres = (
            np.concatenate(
                [self._sum(self.centres[i : i + 512]) for i in range(0, len(self.heights), 512)]
            )
            if len(self.heights)
            else np.zeros(0)
        )

    def state(self) -> dict[str, Any]:
        """What a resume needs."""
        return {
            "kernel_centres": self.centres,
            "kernel_sigmas": self.sigmas,
            "kernel_heights": self.heights,
            "sum_w": self.sum_w,
            "sum_w2": self.sum_w2,
            "n_deposits": self.n_deposits,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state` and rebuild the sums."""
        self.centres = np.asarray(state["kernel_centres"], dtype=np.float64).reshape(-1, self.d)
        self.sigmas = np.asarray(state["kernel_sigmas"], dtype=np.float64).reshape(-1, self.d)
        self.heights = np.asarray(state["kernel_heights"], dtype=np.float64)
        self.sum_w, self.sum_w2 = float(state["sum_w"]), float(state["sum_w2"])
        self.n_deposits = int(state["n_deposits"])
        self.recompute()


# ------------------------------------------------------------------------------ the run
@dataclass(frozen=True)
class OPESSettings:
    """The authors' alanine-dipeptide settings (``PACE 500``, ``BARRIER 50`` kJ/mol, ``SIGMA
    0.15`` rad, bias factor 10) with the dynamics of the metadynamics baseline (Langevin,
    1 / ps, 1.5 fs, hydrogen masses 3 amu). ``sigma`` is in the CG coordinates' unit."""

    n_steps: int = 4_000_000
    record_every: int = 50_000
    pace: int = 500
    barrier_kJ_per_mol: float = 50.0
    sigma: float = 0.15
    bias_factor: float = 10.0
    compression_threshold: float = 1.0
    shrink_sigma: bool = True
    timestep_fs: float = 1.5
    friction_per_ps: float = 1.0
    hydrogen_mass_amu: float = 3.0
    bias_grid: int = 256
    fes_grid: int = 90
    seed: int = 0
    platform: str = "CPU"
    threads: int = 1

    def __post_init__(self) -> None:
        if min(self.n_steps, self.record_every, self.pace, self.bias_grid, self.fes_grid) <= 0:
            raise ValueError("n_steps, record_every, pace and the grids must be > 0")
        if self.record_every % self.pace or self.n_steps % self.record_every:
            raise ValueError(
                f"record_every ({self.record_every}) must be a multiple of pace ({self.pace}) "
                f"and n_steps ({self.n_steps}) a multiple of record_every"
            )
        if self.bias_factor <= 1 or self.barrier_kJ_per_mol <= 0 or self.sigma <= 0:
            raise ValueError("OPES needs bias_factor > 1, barrier > 0 and sigma > 0")


@dataclass
class _Model:
    """An OpenMM system with the OPES bias table, and how to read the CG coordinates."""

    system: Any  # openmm.System
    positions_nm: np.ndarray
    n_min: int
    temperature_K: float
    cv: Any  # positions [n, 3] (nm) -> s [d]
    bias_force: Any
    periods: tuple[float | None, ...]
    table_range: tuple[tuple[float, float], ...]
    fes_range: tuple[tuple[float, float], ...]
    cv_unit: str


def dihedral_rad(x: np.ndarray, atoms: Sequence[int]) -> float:
    """The dihedral angle of four atoms in ``x [n, 3]``, in (-π, π] (OpenMM's convention)."""
    p = np.asarray(x, dtype=np.float64)[list(atoms)]
    b0, b1, b2 = p[0] - p[1], p[2] - p[1], p[3] - p[2]
    b1 = b1 / np.linalg.norm(b1)
    v, w = b0 - np.dot(b0, b1) * b1, b2 - np.dot(b2, b1) * b1
    return float(math.atan2(np.dot(np.cross(b1, v), w), np.dot(v, w)))


def _table(values_kJ: np.ndarray, ranges: Sequence[tuple[float, float]], periodic: bool) -> Any:
    import openmm as mm

    flat = np.asarray(values_kJ, dtype=np.float64).ravel().tolist()
    if len(ranges) == 1:
        return mm.Continuous1DFunction(flat, *ranges[0], periodic)
    ny, nx = values_kJ.shape
    (x0, x1), (y0, y1) = ranges
    return mm.Continuous2DFunction(nx, ny, flat, x0, x1, y0, y1, periodic)


def _molecular_model(system: Any, settings: OPESSettings, grid: int) -> _Model:
    """The molecule's OpenMM system plus a tabulated bias on its two CG dihedrals."""
    import openmm as mm

    from .md import openmm_copy_with_masses

    omm = openmm_copy_with_masses(system, settings.hydrogen_mass_amu)
    quads = [[int(a) for a in system.zmatrix.dihedral_atoms(i)] for i in system.cg_indices]
    atoms = list(dict.fromkeys(a for q in quads for a in q))
    args = [",".join(f"p{atoms.index(a) + 1}" for a in q) for q in quads]
    force = mm.CustomCompoundBondForce(
        len(atoms), f"opes_bias({', '.join(f'dihedral({a})' for a in args)})"
    )
    force.addBond(atoms, [])
    force.setForceGroup(BIAS_GROUP)
    ranges = ((-math.pi, math.pi),) * 2
    force.addTabulatedFunction("opes_bias", _table(np.zeros((grid, grid)), ranges, True))
    omm.addForce(force)
    x, n_min = system.initial_configuration()
    return _Model(
        system=omm,
        positions_nm=np.asarray(x, dtype=np.float64),
        n_min=int(n_min),
        temperature_K=float(system.temperature_K),
        cv=lambda pos: np.array([dihedral_rad(pos, q) for q in quads]),
        bias_force=force,
        periods=(2 * math.pi, 2 * math.pi),
        table_range=ranges,
        fes_range=ranges,
        cv_unit="rad",
    )


def _mueller_brown_model(system: Any, settings: OPESSettings, grid: int) -> _Model:
    """Müller–Brown as one OpenMM particle (``U/kT = β U_MB(x, y)`` at 300 K, z restrained),
    with a tabulated bias on ``s = x - y``."""
    import openmm as mm

    from .md import KB_KJ_PER_MOL_K
    from .systems import MB_A, MB_X0, MB_Y0, MB_a, MB_b, MB_c

    kT = KB_KJ_PER_MOL_K * MB_TEMPERATURE_K
    terms = "+".join(
        f"({A})*exp(({a})*(x-({x0}))^2+({b})*(x-({x0}))*(y-({y0}))+({c})*(y-({y0}))^2)"
        for A, a, b, c, x0, y0 in zip(MB_A, MB_a, MB_b, MB_c, MB_X0, MB_Y0, strict=True)
    )
    omm = mm.System()
    omm.addParticle(MB_MASS_AMU)
    potential = mm.CustomExternalForce(f"{system.beta * kT}*({terms})+{MB_Z_SPRING / 2}*z^2")
    potential.addParticle(0, [])
    omm.addForce(potential)
    lo, hi = system.cg_spec.bounds[0]
    table = (lo - 1.0, hi + 1.0)  # the walls keep s far inside
    force = mm.CustomCompoundBondForce(1, "opes_bias(x1-y1)")  # external forces have no tables
    force.addBond([0], [])
    force.setForceGroup(BIAS_GROUP)
    force.addTabulatedFunction("opes_bias", _table(np.zeros(grid), (table,), False))
    omm.addForce(force)
    x, n_min = system.initial_configuration()
    return _Model(
        system=omm,
        positions_nm=np.array([[x[0], x[1], 0.0]]),
        n_min=int(n_min),
        temperature_K=MB_TEMPERATURE_K,
        cv=lambda pos: np.array([pos[0, 0] - pos[0, 1]]),
        bias_force=force,
        periods=(None,),
        table_range=(table,),
        fes_range=((lo, hi),),
        cv_unit="nm",
    )


def _model(system: Any, settings: OPESSettings) -> _Model:
    if system.name == "mueller_brown":
        return _mueller_brown_model(system, settings, settings.bias_grid)
    if getattr(system, "openmm_system", None) is None or len(system.cg_spec.names) != 2:
        raise ValueError(
            "OPES runs on Müller–Brown or a molecular system with two dihedral CG coordinates, "
            f"got {system.name!r}"
        )
    return _molecular_model(system, settings, settings.bias_grid)


def _axes(ranges: Sequence[tuple[float, float]], n: int) -> list[np.ndarray]:
    return [np.linspace(lo, hi, n) for lo, hi in ranges]


def run_opes(system: Any, settings: OPESSettings, out: str | Path, log: Any = print) -> Path:
    """Run (or resume) OPES from the energy minimum; write ``out``.

    ``out`` holds ``steps [k]`` (evaluations at each snapshot: MD steps, the minimisation in
    the attribute ``minimisation_evaluations``), ``F_kT [k, ...]`` (``-log P̃`` on the
    ``fes_grid`` of the CG range, ``[ψ, φ]`` for dihedrals, first = last point on periodic
    axes), ``fes_axis_<i>``, ``cv [deposits, d]``, ``n_kernels``/``n_eff [k]``, the kernels and
    the OpenMM checkpoint.
    """
    import openmm as mm
    from openmm import unit

    from .md import KB_KJ_PER_MOL_K

    out = Path(out)
    model = _model(system, settings)
    kT = KB_KJ_PER_MOL_K * model.temperature_K
    kde = OPESKernels(
        [settings.sigma] * len(model.periods),
        model.periods,
        settings.barrier_kJ_per_mol / kT,
        settings.bias_factor,
        _axes(model.table_range, settings.bias_grid),
        settings.compression_threshold,
        settings.shrink_sigma,
    )
    fes_axes = _axes(model.fes_range, settings.fes_grid)
    integ = mm.LangevinMiddleIntegrator(
        model.temperature_K * unit.kelvin,
        settings.friction_per_ps / unit.picosecond,
        settings.timestep_fs * unit.femtosecond,
    )
    integ.setRandomNumberSeed(int(settings.seed) % 2**31 or 1)
    props = {"Threads": str(settings.threads)} if settings.platform == "CPU" else {}
    ctx = mm.Context(model.system, integ, mm.Platform.getPlatformByName(settings.platform), props)
    periodic = model.periods[0] is not None
    table = model.bias_force.getTabulatedFunction(0)

    def push_bias() -> None:
        v = kde.bias_grid_kT() * kT
        if v.ndim == 1:
            table.setFunctionParameters(v.tolist(), *model.table_range[0])
        else:
            (x0, x1), (y0, y1) = model.table_range
            table.setFunctionParameters(v.shape[1], v.shape[0], v.ravel().tolist(), x0, x1, y0, y1)
        model.bias_force.updateParametersInContext(ctx)

    if out.exists():
        with h5py.File(out, "r") as f:
            check_run(f, KIND, FORMAT_VERSION, settings, system.name, kT)
            kde.load_state({k: f[k][()] if k in f else f.attrs[k] for k in kde.state()})
            steps, F, cv = list(f["steps"][()]), list(f["F_kT"][()]), list(f["cv"][()])
            n_kernels, n_eff = list(f["n_kernels"][()]), list(f["n_eff"][()])
            n_min = int(f.attrs["minimisation_evaluations"])
            ctx.loadCheckpoint(f["checkpoint"][()].tobytes())
        step = int(steps[-1])
        push_bias()
        log(f"resumed {out} at step {step}")
    else:
        ctx.setPositions(model.positions_nm)
        ctx.setVelocitiesToTemperature(model.temperature_K * unit.kelvin, int(settings.seed))
        steps, F, cv, n_kernels, n_eff, step, n_min = [], [], [], [], [], 0, model.n_min
    t0, step0 = time.perf_counter(), step
    while step < settings.n_steps:
        for _ in range(settings.record_every // settings.pace):
            integ.step(settings.pace)
            pos = ctx.getState(getPositions=True).getPositions(asNumpy=True)
            s = model.cv(np.asarray(pos.value_in_unit(unit.nanometer)))
            felt = ctx.getState(getEnergy=True, groups={BIAS_GROUP}).getPotentialEnergy()
            kde.deposit(s, felt.value_in_unit(unit.kilojoule_per_mole) / kT)
            cv.append(s.astype(np.float32))
            push_bias()
        step += settings.record_every
        kde.recompute()  # and the table from it, as a resume from this snapshot has it
        push_bias()
        steps.append(step)
        F.append(kde.free_energy_kT(fes_axes).astype(np.float32))
        n_kernels.append(len(kde.heights))
        n_eff.append(kde.n_eff)
        arrays = {
            "steps": (np.asarray(steps, dtype=np.int64), "1"),
            "F_kT": (np.stack(F), "kT"),
            "cv": (np.stack(cv), model.cv_unit),
            "n_kernels": (np.asarray(n_kernels, dtype=np.int64), "1"),
            "n_eff": (np.asarray(n_eff, dtype=np.float64), "1"),
            "checkpoint": (np.frombuffer(ctx.createCheckpoint(), dtype=np.uint8), "1"),
            **{f"fes_axis_{i}": (ax, model.cv_unit) for i, ax in enumerate(fes_axes)},
        }
        for k, v in kde.state().items():
            if isinstance(v, np.ndarray):
                arrays[k] = (v, "1" if k == "kernel_heights" else model.cv_unit)
        attrs = {
            "system": system.name,
            "kT_kJ_per_mol": kT,
            "evaluations_per_step": 1,
            "minimisation_evaluations": n_min,
            "periodic": periodic,
            **{k: v for k, v in kde.state().items() if not isinstance(v, np.ndarray)},
        }
        save_run(out, KIND, FORMAT_VERSION, settings, arrays, attrs)
        rate = (step - step0) / max(time.perf_counter() - t0, 1e-9)
        log(f"step {step}: {len(kde.heights)} kernels, N_eff {kde.n_eff:.0f}, {rate:.0f} steps/s")
    return out


def exact_pmf_errors(run_h5: str | Path, system: Any, max_F_kT: float = 10.0) -> list[dict]:
    """Per snapshot of a run on a system with an exact PMF (Müller–Brown): evaluations and the
    max |ΔF| (kT) where the exact F ≤ ``max_F_kT``, on the run's free-energy grid."""
    from .metrics import exact_pmf_metrics

    with h5py.File(run_h5, "r") as f:
        if f.attrs.get("kind") != KIND or f.attrs.get("system") != system.name:
            raise ValueError(f"{run_h5}: not an OPES run of {system.name!r}")
        s, F, steps = f["fes_axis_0"][()], f["F_kT"][()], f["steps"][()]
        n_min = int(f.attrs["minimisation_evaluations"])
    exact = system.exact_pmf(s)
    return [
        {
            "evaluations": float(n + n_min),
            **exact_pmf_metrics(Fk, exact, np.zeros(1), max_F_kT=max_F_kT),
        }
        for n, Fk in zip(steps, F, strict=True)
    ]
