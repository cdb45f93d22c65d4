"""Short MD for starting data: OpenMM Langevin for molecules, Metropolis for analytic systems.

Counted by the rules of :mod:`cgflow.energy.counting`: one evaluation per integration step or
Metropolis proposal and chain (:class:`MDResult.counts`, kinds ``start_md`` and
``minimisation``; the minimisation only when no ``x0`` is given).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .energy.counting import dynamics_evaluations
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
    counts["start_md"] = dynamics_evaluations(equilibration_steps + n_frames * stride)
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
    accepted = 0
    frames = []
    total = equilibration_steps + n_frames * stride
    for step in range(1, total + 1):
        prop = x + step_size * torch.randn(x.shape, generator=gen, dtype=x.dtype)
        u_new = system.reduced_energy(prop).detach()
        log_r = torch.rand(n_chains, generator=gen, dtype=x.dtype).log()
        accept = torch.isfinite(u_new) & (log_r < (u - u_new))
        x = torch.where(accept[:, None], prop, x)
        u = torch.where(accept, u_new, u)
        if step > equilibration_steps:
            accepted += int(accept.sum())
            if (step - equilibration_steps) % stride == 0:
                frames.append(x.numpy().copy())
    counts["start_md"] = dynamics_evaluations(total, n_chains, start_evaluations=n_chains)
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


# ------------------------------------------------------------------ batched Langevin on torch
#: Boltzmann constant in kJ/(mol K)
KB_KJ_PER_MOL_K = 8.314462618e-3


def particle_masses_amu(openmm_system: Any) -> np.ndarray:
    """Masses (amu) of an OpenMM ``System``'s particles."""
    from openmm import unit

    return np.array(
        [
            openmm_system.getParticleMass(i).value_in_unit(unit.dalton)
            for i in range(openmm_system.getNumParticles())
        ]
    )


def hydrogen_mass_repartition(
    masses_amu: np.ndarray, bonds: np.ndarray, hydrogen_mass_amu: float
) -> np.ndarray:
    """Move mass from heavy atoms to their bonded hydrogens until each H weighs ``hydrogen_mass_amu``.

    The total mass is unchanged; masses do not change the configurational distribution, only
    the dynamics (allowing a longer timestep).
    """
    m = np.array(masses_amu, dtype=np.float64)
    hydrogens = m < 1.5
    for i, j in np.asarray(bonds, dtype=np.int64).reshape(-1, 2):
        for h, heavy in ((i, j), (j, i)):
            if hydrogens[h] and not hydrogens[heavy]:
                delta = hydrogen_mass_amu - m[h]
                m[h] += delta
                m[heavy] -= delta
    if (m <= 0).any():
        raise ValueError("hydrogen mass repartitioning left an atom with mass <= 0")
    return m


def openmm_copy_with_masses(system: Any, hydrogen_mass_amu: float) -> Any:
    """A copy of a molecular system's OpenMM ``System`` with hydrogen masses repartitioned to
    ``hydrogen_mass_amu`` (0: the masses as they are)."""
    import openmm as mm
    from openmm import unit

    omm = mm.XmlSerializer.deserialize(mm.XmlSerializer.serialize(system.openmm_system))
    if hydrogen_mass_amu:
        masses = particle_masses_amu(omm)
        bonds = np.array([(b[0].index, b[1].index) for b in system.topology.bonds()])
        for i, m in enumerate(hydrogen_mass_repartition(masses, bonds, hydrogen_mass_amu)):
            omm.setParticleMass(i, m * unit.dalton)
    return omm


@dataclass
class LangevinState:
    """State of ``C`` copies: positions (nm), velocities (nm/ps), energies (kJ/mol), forces."""

    x: torch.Tensor  #: [C, N, 3] float64
    v: torch.Tensor  #: [C, N, 3] float64
    u: torch.Tensor  #: [C] float64
    f: torch.Tensor  #: [C, N, 3] float64
    steps: int = 0


class NonFiniteEnergyError(RuntimeError):
    """A chain's energy or forces became NaN/inf (timestep too large, or a bad start)."""


class BatchedLangevin:
    """BAOAB Langevin dynamics for ``C`` copies of a molecule, each at its own temperature.

    State is float64 (positions accumulate small increments); energies and forces come from
    ``energy`` in its own precision (e.g. float32 torch) and are promoted. Units: nm, ps, amu,
    kJ/mol (force/mass is then nm/ps²). No centre-of-mass motion removal: all 3N degrees of
    freedom are thermalised.
    """

    def __init__(
        self,
        energy: Any,
        masses_amu: np.ndarray,
        temperatures_K: np.ndarray,
        timestep_fs: float = 1.0,
        friction_per_ps: float = 1.0,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        temps = np.asarray(temperatures_K, dtype=np.float64).reshape(-1)
        if (temps <= 0).any():
            raise ValueError("temperatures must be > 0 K")
        if timestep_fs <= 0 or friction_per_ps < 0:
            raise ValueError("timestep must be > 0 and friction >= 0")
        self.energy = energy
        self.device = torch.device(device)
        self.masses = torch.as_tensor(np.asarray(masses_amu, dtype=np.float64), device=self.device)
        self.n_atoms = self.masses.numel()
        self.dt = timestep_fs * 1e-3
        self.friction = friction_per_ps
        self.set_temperatures(temps)
        self.generator = torch.Generator(device=self.device).manual_seed(int(seed))

    @property
    def n_chains(self) -> int:
        return self.temperatures.numel()

    def set_temperatures(self, temperatures_K: np.ndarray) -> None:
        self.temperatures = torch.as_tensor(
            np.asarray(temperatures_K, dtype=np.float64), device=self.device
        )
        kt = KB_KJ_PER_MOL_K * self.temperatures  # [C]
        # velocity noise scale sqrt(kT/m), [C, N, 1]
        self._sigma_v = torch.sqrt(kt[:, None] / self.masses[None, :])[..., None]
        self._c1 = math.exp(-self.friction * self.dt)
        self._c2 = math.sqrt(1.0 - self._c1**2)

    def _forces(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u, f = self.energy.energies_and_forces(x)
        return u.to(torch.float64), f.to(torch.float64).reshape(x.shape)

    def init_state(self, x0: np.ndarray | torch.Tensor) -> LangevinState:
        """Start every chain from ``x0`` (``[N, 3]`` or ``[C, N, 3]``), Maxwell–Boltzmann velocities."""
        x = torch.as_tensor(np.asarray(x0), dtype=torch.float64, device=self.device)
        if x.ndim == 2:
            x = x.expand(self.n_chains, -1, -1)
        if x.shape != (self.n_chains, self.n_atoms, 3):
            raise ValueError(
                f"x0 must be [N, 3] or [{self.n_chains}, {self.n_atoms}, 3], got {tuple(x.shape)}"
            )
        x = x.clone()
        v = self._sigma_v * torch.randn(
            x.shape, generator=self.generator, device=self.device, dtype=x.dtype
        )
        u, f = self._forces(x)
        self._check(u, f, 0)
        return LangevinState(x=x, v=v, u=u, f=f)

    def _check(self, u: torch.Tensor, f: torch.Tensor, steps: int) -> None:
        bad = ~(torch.isfinite(u) & torch.isfinite(f).flatten(1).all(dim=1))
        if bool(bad.any()):
            chains = torch.nonzero(bad).flatten().tolist()[:10]
            raise NonFiniteEnergyError(
                f"non-finite energy/forces in chain(s) {chains} at step {steps} "
                f"(timestep {self.dt * 1e3:g} fs): reduce the timestep or check the start"
            )

    def step(self, state: LangevinState, n_steps: int = 1, check_every: int = 100) -> LangevinState:
        """Advance all chains by ``n_steps`` BAOAB steps (in place; returns ``state``)."""
        dt, c1, c2 = self.dt, self._c1, self._c2
        inv_m = (1.0 / self.masses)[None, :, None]
        x, v, f, u = state.x, state.v, state.f, state.u
        for k in range(n_steps):
            v = v + (0.5 * dt) * f * inv_m  # B
            x = x + (0.5 * dt) * v  # A
            noise = torch.randn(
                x.shape, generator=self.generator, device=self.device, dtype=x.dtype
            )
            v = c1 * v + c2 * self._sigma_v * noise  # O
            x = x + (0.5 * dt) * v  # A
            u, f = self._forces(x)
            v = v + (0.5 * dt) * f * inv_m  # B
            if (k + 1) % check_every == 0 or k + 1 == n_steps:
                self._check(u, f, state.steps + k + 1)
        state.x, state.v, state.f, state.u = x, v, f, u
        state.steps += n_steps
        return state

    def kinetic_temperature(self, state: LangevinState) -> torch.Tensor:
        """Instantaneous kinetic temperature per chain (K), 3N degrees of freedom."""
        ke = 0.5 * (self.masses[None, :, None] * state.v**2).sum(dim=(1, 2))
        return 2.0 * ke / (3 * self.n_atoms * KB_KJ_PER_MOL_K)


class ParallelTempering:
    """Replica exchange across ``K`` temperatures for ``M`` independent ladders.

    Chains are laid out ``[K, M]`` (chain ``k * M + m`` is temperature ``k`` of ladder ``m``);
    every ``exchange_every`` steps neighbouring temperatures swap configurations with the
    Metropolis criterion ``min(1, exp((β_k - β_{k+1}) (U_k - U_{k+1})))``, alternating even
    and odd pairs. Velocities are rescaled by ``sqrt(T_new / T_old)``. ``K = 1`` is plain MD.
    """

    def __init__(
        self,
        engine: BatchedLangevin,
        temperatures_K: np.ndarray,
        n_ladders: int,
        exchange_every: int,
        seed: int = 0,
    ) -> None:
        temps = np.asarray(temperatures_K, dtype=np.float64)
        if temps.ndim != 1 or len(temps) < 1 or np.any(np.diff(temps) <= 0):
            raise ValueError("temperatures must be a strictly increasing 1-D list")
        if engine.n_chains != len(temps) * n_ladders:
            raise ValueError(
                f"engine has {engine.n_chains} chains, need {len(temps)} x {n_ladders}"
            )
        if exchange_every < 1:
            raise ValueError("exchange_every must be >= 1")
        self.engine = engine
        self.temps = temps
        self.k, self.m = len(temps), n_ladders
        self.exchange_every = exchange_every
        self.beta = torch.as_tensor(1.0 / (KB_KJ_PER_MOL_K * temps), device=engine.device)
        self.generator = torch.Generator(device=engine.device).manual_seed(int(seed) + 7919)
        self.attempts = np.zeros(max(self.k - 1, 0), dtype=np.int64)
        self.accepts = np.zeros(max(self.k - 1, 0), dtype=np.int64)
        # which starting chain's configuration sits in each slot, [K, M]
        self.replica = torch.arange(self.k * n_ladders, device=engine.device).reshape(
            self.k, self.m
        )
        self._round = 0

    @staticmethod
    def temperature_ladder(t_min: float, t_max: float, k: int) -> np.ndarray:
        """Geometric ladder of ``k`` temperatures from ``t_min`` to ``t_max``."""
        if k == 1:
            return np.array([t_min], dtype=np.float64)
        return t_min * (t_max / t_min) ** (np.arange(k) / (k - 1))

    def exchange(self, state: LangevinState) -> None:
        """One round of neighbour swaps (even pairs, then odd pairs on the next call)."""
        if self.k < 2:
            return
        parity = self._round % 2
        self._round += 1
        lo = torch.arange(parity, self.k - 1, 2, device=self.engine.device)
        if lo.numel() == 0:
            return
        hi = lo + 1
        shape = (self.k, self.m)
        u = state.u.reshape(shape)
        delta = (self.beta[lo] - self.beta[hi])[:, None] * (u[lo] - u[hi])  # [P, M]
        log_r = torch.rand(
            delta.shape, generator=self.generator, device=delta.device, dtype=delta.dtype
        ).log()
        acc = log_r < delta
        for p, k in enumerate(lo.tolist()):
            self.attempts[k] += self.m
            self.accepts[k] += int(acc[p].sum())
        # permutation of slots within each ladder: swap k <-> k+1 where accepted
        perm = torch.arange(self.k, device=delta.device)[:, None].expand(shape).clone()
        perm[lo] = torch.where(acc, hi[:, None], lo[:, None])
        perm[hi] = torch.where(acc, lo[:, None], hi[:, None])
        ladder = torch.arange(self.m, device=delta.device)[None, :].expand(shape)
        src = (perm * self.m + ladder).reshape(-1)  # source chain of each slot
        t = self.engine.temperatures
        scale = torch.sqrt(t / t[src])[:, None, None]
        state.x = state.x[src]
        state.v = state.v[src] * scale
        state.u = state.u[src]
        state.f = state.f[src]
        self.replica = self.replica.reshape(-1)[src].reshape(shape)

    def run(
        self, state: LangevinState, n_steps: int, callback: Any = None, every: int = 0
    ) -> LangevinState:
        """Advance ``n_steps`` with exchanges; ``callback(state)`` every ``every`` steps."""
        if every and self.exchange_every % every and every % self.exchange_every:
            raise ValueError("'every' must divide or be a multiple of exchange_every")
        block = min(self.exchange_every, every) if every else self.exchange_every
        done = 0
        while done < n_steps:
            n = min(block, n_steps - done)
            self.engine.step(state, n)
            done += n
            if state.steps % self.exchange_every == 0:
                self.exchange(state)
            if callback is not None and every and state.steps % every == 0:
                callback(state)
        return state

    @property
    def acceptance(self) -> np.ndarray:
        """Exchange acceptance rate per neighbour pair (NaN where never attempted)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.accepts / self.attempts
