"""Short MD for starting data: OpenMM Langevin for molecules, Metropolis for analytic systems.

Every integration step, Metropolis proposal and minimisation evaluation is one potential-energy
evaluation and is counted (:class:`MDResult.counts`, kinds ``start_md`` and ``minimisation``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .systems import AnalyticSystem, MolecularSystem, System


@dataclass
class MDResult:
    """Frames of a run and what they cost."""

    frames: np.ndarray  #: ``[F, *config_shape]`` (nm for molecules)
    stride: int  #: steps between saved frames
    counts: dict[str, int] = field(default_factory=dict)  #: energy evaluations by kind
    acceptance: float | None = None  #: Metropolis acceptance rate (analytic systems)


def langevin_md(
    system: MolecularSystem,
    n_frames: int,
    stride: int,
    seed: int,
    x0: np.ndarray | None = None,
    timestep_fs: float = 1.0,
    friction_per_ps: float = 1.0,
    temperature_K: float | None = None,
    equilibration_steps: int = 0,
    platform: str | None = "CPU",
) -> MDResult:
    """LangevinMiddle MD with OpenMM from ``x0`` (default: the minimised structure).

    Velocities are drawn from Maxwell–Boltzmann with ``seed``; the integrator is seeded with
    ``seed`` too, so a run is reproducible on the same platform. Returns ``n_frames`` frames,
    one every ``stride`` steps after ``equilibration_steps``.
    """
    import openmm
    from openmm import unit

    from .energy.openmm_backend import choose_platform

    if n_frames < 1 or stride < 1 or equilibration_steps < 0:
        raise ValueError(
            f"need n_frames >= 1, stride >= 1, equilibration_steps >= 0; got {n_frames}, "
            f"{stride}, {equilibration_steps}"
        )
    counts = {"start_md": 0, "minimisation": 0}
    if x0 is None:
        x0, counts["minimisation"] = system.initial_configuration()
    temperature = system.temperature_K if temperature_K is None else temperature_K
    integrator = openmm.LangevinMiddleIntegrator(
        temperature * unit.kelvin, friction_per_ps / unit.picosecond, timestep_fs * unit.femtosecond
    )
    integrator.setRandomNumberSeed(int(seed) % (2**31 - 1) or 1)
    name = choose_platform(platform)
    props = {"Threads": "1"} if name == "CPU" else {}
    context = openmm.Context(
        system.openmm_system, integrator, openmm.Platform.getPlatformByName(name), props
    )
    context.setPositions(np.asarray(x0, dtype=np.float64))
    context.setVelocitiesToTemperature(temperature * unit.kelvin, int(seed) % (2**31 - 1) or 1)
    if equilibration_steps:
        integrator.step(equilibration_steps)
    frames = np.empty((n_frames, *system.config_shape))
    for i in range(n_frames):
        integrator.step(stride)
        state = context.getState(getPositions=True)
        frames[i] = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    counts["start_md"] = equilibration_steps + n_frames * stride
    del context, integrator
    return MDResult(frames=frames, stride=stride, counts=counts)


def metropolis(
    system: AnalyticSystem,
    n_frames: int,
    stride: int,
    seed: int,
    x0: np.ndarray | None = None,
    step_size: float = 0.1,
    n_chains: int = 1,
    equilibration_steps: int = 0,
) -> MDResult:
    """Metropolis random-walk chains on ``exp(-beta U)``; frames ``[n_frames * n_chains, D]``.

    Gaussian proposals of width ``step_size`` per coordinate; one energy evaluation per
    proposal and chain (plus one for each chain's start).
    """
    if n_frames < 1 or stride < 1 or n_chains < 1 or step_size <= 0:
        raise ValueError(
            f"need n_frames, stride, n_chains >= 1 and step_size > 0; got {n_frames}, "
            f"{stride}, {n_chains}, {step_size}"
        )
    gen = torch.Generator().manual_seed(int(seed))
    counts = {"start_md": 0, "minimisation": 0}
    if x0 is None:
        x0, counts["minimisation"] = system.initial_configuration()
    x = torch.as_tensor(np.asarray(x0, dtype=np.float64)).expand(n_chains, -1).clone()
    u = system.reduced_energy(x).detach()
    n_evals = n_chains
    accepted = 0
    frames = []
    total = equilibration_steps + n_frames * stride
    for step in range(1, total + 1):
        prop = x + step_size * torch.randn(x.shape, generator=gen, dtype=x.dtype)
        u_new = system.reduced_energy(prop).detach()
        n_evals += n_chains
        log_r = torch.rand(n_chains, generator=gen, dtype=x.dtype).log()
        accept = torch.isfinite(u_new) & (log_r < (u - u_new))
        x = torch.where(accept[:, None], prop, x)
        u = torch.where(accept, u_new, u)
        if step > equilibration_steps:
            accepted += int(accept.sum())
            if (step - equilibration_steps) % stride == 0:
                frames.append(x.numpy().copy())
    counts["start_md"] = n_evals
    out = np.stack(frames, axis=1).reshape(n_chains * n_frames, -1)
    return MDResult(
        frames=out,
        stride=stride,
        counts=counts,
        acceptance=accepted / (n_chains * n_frames * stride),
    )


def short_run(system: System, n_frames: int, stride: int, seed: int, **options) -> MDResult:
    """Starting data for any system: Langevin MD for molecules, Metropolis otherwise."""
    if isinstance(system, MolecularSystem):
        return langevin_md(system, n_frames, stride, seed, **options)
    if isinstance(system, AnalyticSystem):
        return metropolis(system, n_frames, stride, seed, **options)
    raise TypeError(f"no short-run sampler for system type {type(system).__name__}")
