"""Well-tempered metadynamics on the CG dihedrals: a baseline for the campaign (issue 6).

Runs ``openmm.app.Metadynamics`` (shipped with OpenMM) on a molecular system's CG dihedrals
and snapshots the free-energy estimate from the bias, ``F = -γ/(γ-1) V`` on OpenMM's grid,
every ``record_every`` steps. One MD step is one energy/force evaluation, the counting rule of
the campaign. Runs resume from their last snapshot: the snapshot keeps the positions,
velocities, step and the bias grid.

Resuming restores the bias grid into the ``Metadynamics`` object. OpenMM has no public call for
that, so :func:`_restore_bias` sets its bias arrays and refreshes the tabulated force (checked
against OpenMM 8.x; an incompatible OpenMM fails with a message instead of silently restarting
the bias).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .data import atomic_path

FORMAT_VERSION = 1


@dataclass(frozen=True)
class MetadSettings:
    """Published alanine-dipeptide settings (Gaussian width 0.35 rad, initial height
    1.2 kJ/mol, bias factor 6–10, a deposit every 500 steps); the dynamics are those of the
    plain-MD baseline (Langevin, 1 / ps, 1.5 fs, hydrogen masses 3 amu)."""

    n_steps: int = 2_000_000
    record_every: int = 25_000
    sigma_rad: float = 0.35
    height_kJ_per_mol: float = 1.2
    bias_factor: float = 8.0
    deposit_every: int = 500
    timestep_fs: float = 1.5
    friction_per_ps: float = 1.0
    hydrogen_mass_amu: float = 3.0
    grid_width: int = 90
    seed: int = 0
    platform: str = "CPU"
    threads: int = 1

    def __post_init__(self) -> None:
        if self.n_steps <= 0 or self.record_every <= 0 or self.deposit_every <= 0:
            raise ValueError("n_steps, record_every and deposit_every must be > 0")
        if self.record_every % self.deposit_every:
            raise ValueError(
                f"record_every ({self.record_every}) must be a multiple of deposit_every "
                f"({self.deposit_every})"
            )
        if self.n_steps % self.record_every:
            raise ValueError(
                f"n_steps ({self.n_steps}) must be a multiple of record_every ({self.record_every})"
            )
        if self.bias_factor <= 1:
            raise ValueError(f"bias_factor must be > 1, got {self.bias_factor}")


def _cv_forces(system: Any) -> list[Any]:
    """One ``CustomTorsionForce`` per CG dihedral (atoms from the Z-matrix)."""
    import openmm as mm

    forces = []
    for idx in system.cg_indices:
        atoms = system.zmatrix.dihedral_atoms(idx)
        f = mm.CustomTorsionForce("theta")
        f.addTorsion(*[int(a) for a in atoms])
        forces.append(f)
    return forces


def _build(system: Any, settings: MetadSettings) -> tuple[Any, Any]:
    """OpenMM Simulation with the metadynamics bias, and the Metadynamics object."""
    import openmm as mm
    from openmm import app, unit

    from .md import openmm_copy_with_masses

    omm = openmm_copy_with_masses(system, settings.hydrogen_mass_amu)
    variables = [
        app.BiasVariable(f, -math.pi, math.pi, settings.sigma_rad, True, settings.grid_width)
        for f in _cv_forces(system)
    ]
    meta = app.Metadynamics(
        omm,
        variables,
        system.temperature_K * unit.kelvin,
        settings.bias_factor,
        settings.height_kJ_per_mol * unit.kilojoule_per_mole,
        settings.deposit_every,
    )
    integ = mm.LangevinMiddleIntegrator(
        system.temperature_K * unit.kelvin,
        settings.friction_per_ps / unit.picosecond,
        settings.timestep_fs * unit.femtosecond,
    )
    integ.setRandomNumberSeed(int(settings.seed) % 2**31 or 1)
    props = {"Threads": str(settings.threads)} if settings.platform == "CPU" else {}
    platform = mm.Platform.getPlatformByName(settings.platform)
    sim = app.Simulation(system.topology, omm, integ, platform, props)
    return sim, meta


def _restore_bias(meta: Any, sim: Any, bias_kJ: np.ndarray) -> None:
    """Put a saved bias grid back into ``meta`` (see the module docstring)."""
    for name in ("_selfBias", "_totalBias", "_table", "_widths", "_limits", "_force"):
        if not hasattr(meta, name):
            raise RuntimeError(
                f"cannot resume: this OpenMM's Metadynamics has no {name!r}; delete the run "
                "file to start over"
            )
    if meta._totalBias.shape != bias_kJ.shape:
        raise ValueError(f"saved bias grid {bias_kJ.shape} != {meta._totalBias.shape}")
    meta._selfBias = np.array(bias_kJ, dtype=np.float64)
    meta._totalBias = np.array(bias_kJ, dtype=np.float64)
    meta._table.setFunctionParameters(*meta._widths, meta._totalBias.flatten(), *meta._limits)
    meta._force.updateParametersInContext(sim.context)


def free_energy_kT(bias_kJ: np.ndarray, bias_factor: float, kT_kJ: float) -> np.ndarray:
    """Well-tempered estimate ``F = -γ/(γ-1) V`` in kT, shifted to min 0, on the bias grid."""
    F = -bias_factor / (bias_factor - 1.0) * np.asarray(bias_kJ, dtype=np.float64) / kT_kJ
    return F - F.min()


def interpolate_periodic(F_grid: np.ndarray, phi_psi: np.ndarray) -> np.ndarray:
    """Bilinear interpolation of a periodic metadynamics grid at standard (φ, ψ) ``[..., 2]``.

    OpenMM's grid has ``n`` points per axis at ``-π + i 2π/(n-1)`` (first = last) and is
    indexed ``[ψ, φ]`` (the variables in reverse order).
    """
    n = F_grid.shape[0]
    G = np.asarray(F_grid, dtype=np.float64)[: n - 1, : n - 1]  # drop the duplicated end
    m = n - 1
    pts = np.asarray(phi_psi, dtype=np.float64)
    u = ((pts[..., 0] + math.pi) % (2 * math.pi)) / (2 * math.pi) * m  # φ → column
    v = ((pts[..., 1] + math.pi) % (2 * math.pi)) / (2 * math.pi) * m  # ψ → row
    i0, j0 = np.floor(v).astype(int) % m, np.floor(u).astype(int) % m
    i1, j1 = (i0 + 1) % m, (j0 + 1) % m
    fv, fu = v - np.floor(v), u - np.floor(u)
    return (
        G[i0, j0] * (1 - fv) * (1 - fu)
        + G[i0, j1] * (1 - fv) * fu
        + G[i1, j0] * fv * (1 - fu)
        + G[i1, j1] * fv * fu
    )


def save_run(
    path: Path,
    kind: str,
    format_version: int,
    settings: Any,
    arrays: dict[str, tuple[np.ndarray, str]],
    attrs: dict[str, Any],
) -> None:
    """Write a baseline run file atomically: ``kind``, format version and the settings (a
    dataclass) as attributes, ``arrays`` as datasets ``name: (array, units)``."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["kind"] = kind
        f.attrs["format_version"] = format_version
        f.attrs["settings"] = json.dumps(asdict(settings), sort_keys=True)
        for k, v in attrs.items():
            f.attrs[k] = v
        for name, (arr, unit) in arrays.items():
            d = f.create_dataset(name, data=arr, compression="gzip" if arr.size > 64 else None)
            d.attrs["units"] = unit


def check_run(
    f: h5py.File, kind: str, format_version: int, settings: Any, system_name: str, kT: float
) -> None:
    """Refuse to resume a run file of another kind, format, system, temperature or settings
    (all but ``n_steps``, ``platform`` and ``threads``, which a resume may change)."""
    path = f.filename
    if f.attrs.get("kind") != kind:
        raise ValueError(f"{path}: not a {kind} run file")
    saved = json.loads(f.attrs["settings"])
    diff = {
        k: (saved.get(k), v)
        for k, v in asdict(settings).items()
        if k not in ("n_steps", "platform", "threads") and saved.get(k) != v
    }
    if diff:
        raise ValueError(f"{path}: was run with other settings (saved, now): {diff}")
    if f.attrs.get("format_version") != format_version:
        raise ValueError(
            f"{path}: format version {f.attrs.get('format_version')} != {format_version}"
        )
    if f.attrs.get("system") != system_name or not math.isclose(f.attrs["kT_kJ_per_mol"], kT):
        raise ValueError(
            f"{path}: was run for system {f.attrs.get('system')!r} at kT "
            f"{f.attrs.get('kT_kJ_per_mol')} kJ/mol, not {system_name!r} at {kT}"
        )


def _load(
    path: Path, settings: MetadSettings, system_name: str, kT: float
) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        check_run(f, "metadynamics", FORMAT_VERSION, settings, system_name, kT)
        out = {k: f[k][()] for k in f.keys()}
        out["minimisation_evaluations"] = np.int64(f.attrs.get("minimisation_evaluations", 0))
        return out


def run_metadynamics(
    system: Any, settings: MetadSettings, out: str | Path, log: Any = print
) -> Path:
    """Run (or resume) well-tempered metadynamics from the energy minimum; write ``out``.

    ``out`` holds ``steps [k]`` (MD steps = energy evaluations at each snapshot),
    ``F_kT [k, n, n]`` (free energy from the bias, OpenMM grid, ``[ψ, φ]``), ``cv [k', 2]``
    (φ, ψ every deposit), the last ``bias_kJ`` grid, positions and velocities.
    """
    from openmm import unit

    out = Path(out)
    if getattr(system, "openmm_system", None) is None or len(system.cg_spec.names) != 2:
        raise ValueError(
            "metadynamics needs a molecular system with two dihedral CG coordinates, got "
            f"{system.name!r}"
        )
    sim, meta = _build(system, settings)
    kT = float(system.kT)  # kJ/mol
    if out.exists():
        saved = _load(out, settings, system.name, kT)
        step = int(saved["steps"][-1])
        try:  # positions, velocities, step and the integrator's random state (same platform)
            sim.context.loadCheckpoint(saved["checkpoint"].tobytes())
        except Exception:  # older file or another platform: the state without the RNG
            sim.context.setPositions(saved["positions_nm"])
            sim.context.setVelocities(saved["velocities_nm_per_ps"])
            # a fresh noise stream, not a replay of the first one
            sim.integrator.setRandomNumberSeed((int(settings.seed) * 1_000_003 + step) % 2**31 or 1)
        sim.currentStep = step
        _restore_bias(meta, sim, saved["bias_kJ"])
        steps, F, cv = list(saved["steps"]), list(saved["F_kT"]), list(saved["cv_rad"])
        n_min = int(saved.get("minimisation_evaluations", 0))
        log(f"resumed {out} at step {step}")
    else:
        x, n_min = system.initial_configuration()  # counted with the run (file attribute)
        sim.context.setPositions(x)
        sim.context.setVelocitiesToTemperature(system.temperature_K * unit.kelvin, settings.seed)
        steps, F, cv, step = [], [], [], 0
    t0, step0 = time.perf_counter(), step
    while step < settings.n_steps:
        for _ in range(settings.record_every // settings.deposit_every):
            meta.step(sim, settings.deposit_every)
            cv.append(np.asarray(meta.getCollectiveVariables(sim), dtype=np.float32))
        step = int(sim.currentStep)
        bias = np.asarray(meta._totalBias, dtype=np.float64)
        steps.append(step)
        F.append(free_energy_kT(bias, settings.bias_factor, kT).astype(np.float32))
        st = sim.context.getState(getPositions=True, getVelocities=True)
        save_run(
            out,
            "metadynamics",
            FORMAT_VERSION,
            settings,
            {
                "steps": (np.asarray(steps, dtype=np.int64), "1"),
                "F_kT": (np.stack(F), "kT"),
                "cv_rad": (np.stack(cv), "rad"),
                "bias_kJ": (bias, "kJ/mol"),
                "checkpoint": (np.frombuffer(sim.context.createCheckpoint(), dtype=np.uint8), "1"),
                "positions_nm": (
                    np.asarray(st.getPositions(asNumpy=True).value_in_unit(unit.nanometer)),
                    "nm",
                ),
                "velocities_nm_per_ps": (
                    np.asarray(
                        st.getVelocities(asNumpy=True).value_in_unit(
                            unit.nanometer / unit.picosecond
                        )
                    ),
                    "nm/ps",
                ),
            },
            {
                "system": system.name,
                "kT_kJ_per_mol": kT,
                "evaluations_per_step": 1,
                "minimisation_evaluations": n_min,
            },
        )
        rate = (step - step0) / max(time.perf_counter() - t0, 1e-9)
        log(f"step {step}: {rate:.0f} steps/s since start of this call")
    return out
