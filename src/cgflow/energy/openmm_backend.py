"""OpenMM energy backend: the trusted reference and the engine of the energy batches.

* One ``Context`` per process (the caller's, or each worker's), created once and reused;
  positions are set as numpy arrays (twice as fast as lists of ``Vec3``).
* Platform: ``CUDA > OpenCL > CPU`` unless named. The ``Reference`` platform is only used when
  asked for by name (tests); for Amber OBC1 it is ~7x slower than ``CPU``. The CPU platform
  runs with ``Threads=1`` per context unless ``platform_properties`` say otherwise.
* ``n_workers > 0`` spreads chunks over spawned worker processes (spawn-safe: each worker
  rebuilds the ``System`` from its XML in its initializer). ``close()`` shuts them down.
* Non-finite configurations are never sent to OpenMM: they get NaN energy and NaN forces, as do
  configurations for which OpenMM raises.
"""

from __future__ import annotations

import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np

from .base import EnergyBackend, finite_rows

PLATFORM_ORDER = ("CUDA", "OpenCL", "CPU")


def available_platforms() -> list[str]:
    """Names of the OpenMM platforms that load on this machine."""
    import openmm

    return [
        openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())
    ]


def choose_platform(name: str | None = None) -> str:
    """``name`` if given (checked), else the fastest of CUDA > OpenCL > CPU that loads."""
    names = available_platforms()
    if name is not None:
        if name not in names:
            raise ValueError(f"OpenMM platform {name!r} is not available here; available: {names}")
        return name
    for candidate in PLATFORM_ORDER:
        if candidate in names:
            return candidate
    raise RuntimeError(f"none of the OpenMM platforms {PLATFORM_ORDER} is available: {names}")


def _make_context(system_xml: str, platform: str, properties: dict[str, str]) -> Any:
    import openmm

    system = openmm.XmlSerializer.deserialize(system_xml)
    integrator = openmm.VerletIntegrator(0.001)
    plat = openmm.Platform.getPlatformByName(platform)
    props = dict(properties)
    if platform == "CPU":
        props.setdefault("Threads", "1")
    return openmm.Context(system, integrator, plat, props)


def _evaluate(context: Any, x: np.ndarray, forces: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Energies (kJ/mol) and optionally forces (kJ/mol/nm) of a chunk, one config at a time."""
    import openmm
    from openmm import unit

    n = x.shape[0]
    u = np.full(n, np.nan)
    f = np.full(x.shape, np.nan) if forces else None
    ok = finite_rows(x)
    kj = unit.kilojoule_per_mole
    kj_nm = unit.kilojoule_per_mole / unit.nanometer
    for i in np.flatnonzero(ok):
        try:
            context.setPositions(x[i])
            state = context.getState(getEnergy=True, getForces=forces)
        except openmm.OpenMMException:
            continue
        u[i] = state.getPotentialEnergy().value_in_unit(kj)
        if forces:
            f[i] = state.getForces(asNumpy=True).value_in_unit(kj_nm)
    return u, f


# --- worker-process state (one Context per worker, built once) -------------------------------
_WORKER_CONTEXT: Any = None


def _worker_init(system_xml: str, platform: str, properties: dict[str, str]) -> None:
    global _WORKER_CONTEXT
    _WORKER_CONTEXT = _make_context(system_xml, platform, properties)


def _worker_evaluate(x: np.ndarray, forces: bool) -> tuple[np.ndarray, np.ndarray | None]:
    return _evaluate(_WORKER_CONTEXT, x, forces)


class OpenMMEnergy(EnergyBackend):
    """Batched energies through OpenMM Contexts.

    Args:
        system: an ``openmm.System`` or its XML serialisation.
        platform: OpenMM platform name; ``None`` picks CUDA > OpenCL > CPU.
        n_workers: 0 evaluates in this process; ``k > 0`` uses ``k`` spawned worker processes,
            each with its own Context (e.g. several Contexts per GPU).
        chunk_size: configurations per task sent to a worker.
        platform_properties: e.g. ``{"Precision": "double"}`` or ``{"DeviceIndex": "1"}``.
    """

    def __init__(
        self,
        system: Any,
        platform: str | None = None,
        n_workers: int = 0,
        chunk_size: int = 256,
        platform_properties: dict[str, str] | None = None,
    ) -> None:
        if n_workers < 0:
            raise ValueError(f"n_workers must be >= 0, got {n_workers}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if isinstance(system, str):
            xml = system
        else:
            import openmm

            xml = openmm.XmlSerializer.serialize(system)
        self.platform = choose_platform(platform)
        self.properties = dict(platform_properties or {})
        self.n_workers = n_workers
        self.chunk_size = chunk_size
        self._xml = xml
        self._context: Any = None
        self._pool: ProcessPoolExecutor | None = None
        self._closed = False
        if n_workers == 0:
            self._context = _make_context(xml, self.platform, self.properties)
            self.n_atoms = self._context.getSystem().getNumParticles()
        else:
            import openmm

            self.n_atoms = openmm.XmlSerializer.deserialize(xml).getNumParticles()
            self._pool = ProcessPoolExecutor(
                max_workers=n_workers,
                mp_context=mp.get_context("spawn"),
                initializer=_worker_init,
                initargs=(xml, self.platform, self.properties),
            )

    def _check(self, x: Any) -> np.ndarray:
        if self._closed:
            raise RuntimeError("OpenMMEnergy is closed")
        if hasattr(x, "detach"):
            x = x.detach().cpu().numpy()
        x = np.asarray(x, dtype=np.float64)
        if x.ndim == 2:
            x = x[None]
        if x.ndim != 3 or x.shape[1:] != (self.n_atoms, 3):
            raise ValueError(
                f"expected positions of shape [B, {self.n_atoms}, 3] in nm, got {x.shape}"
            )
        return x

    def _run(self, x: np.ndarray, forces: bool) -> tuple[np.ndarray, np.ndarray | None]:
        if self._pool is None:
            return _evaluate(self._context, x, forces)
        chunks = [x[i : i + self.chunk_size] for i in range(0, len(x), self.chunk_size)]
        results = list(self._pool.map(_worker_evaluate, chunks, [forces] * len(chunks)))
        u = np.concatenate([r[0] for r in results]) if results else np.empty(0)
        f = np.concatenate([r[1] for r in results]) if (forces and results) else None
        if forces and f is None:
            f = np.empty((0, self.n_atoms, 3))
        return u, f

    def energies(self, x: Any) -> np.ndarray:
        """Potential energies in kJ/mol, float64 ``[B]``; NaN where invalid."""
        return self._run(self._check(x), forces=False)[0]

    def energies_and_forces(self, x: Any) -> tuple[np.ndarray, np.ndarray]:
        """Energies (kJ/mol) and forces (kJ/mol/nm); NaN rows where invalid."""
        u, f = self._run(self._check(x), forces=True)
        assert f is not None
        return u, f

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._context = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
