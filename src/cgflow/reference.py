"""Ground truth for alanine dipeptide: replica-exchange Langevin on the torch backend.

The generation runs in resumable chunks:

1. :func:`export_engine` writes everything the generator needs (torch force-field parameters,
   masses, bonds, start structures) to one file, so chunks also run where only torch is
   installed (a GPU node without OpenMM).
2. :func:`run_chunk` advances ``K`` temperatures x ``M`` ladders by a fixed number of steps
   from the previous chunk's final state (or from the start structures) and writes the 300 K
   (φ, ψ) histogram counts of every ladder on every evaluation grid (:data:`cgflow.metrics.GRIDS`),
   per-ladder φ/ψ time series at a coarse stride, exchange statistics, and the final state.
3. :func:`merge_chunks` adds the chunks into the shipped reference file with the effective
   sample size, the φ > 0 population with its error, and the forward-KLD noise floor per grid.

Half the ladders start in the β basin (the energy minimum), half in αL, so the φ > 0
population of both groups can be compared (a check of mixing).
"""

from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .coordinates import ALDP_PHI_ATOMS, ALDP_PSI_ATOMS, dihedral
from .data import Provenance, read_h5, write_h5
from .md import BatchedLangevin, ParallelTempering, hydrogen_mass_repartition
from .metrics import GRIDS, phi_positive_fraction

ENGINE_FORMAT = "cgflow-engine-1"
#: grids whose counts are kept per ladder (the fine plotting grid is pooled only)
PER_LADDER_GRIDS = ("std100", "shifted100", "std36")
#: the shipped reference inside the package
REFERENCE_DIR = Path(__file__).parent / "references"
ALDP_REFERENCE = REFERENCE_DIR / "aldp_ff96_obc1_300K.h5"


# ---------------------------------------------------------------------------------- engine file
#: atoms moved when φ / ψ of alanine dipeptide are set (the N- and C-terminal caps)
ALDP_PHI_SIDE = (0, 1, 2, 3, 4, 5, 7)
ALDP_PSI_SIDE = (15, 16, 17, 18, 19, 20, 21)


def set_dihedral(
    x: np.ndarray, atoms: tuple[int, int, int, int], value: float, moving: tuple[int, ...]
) -> np.ndarray:
    """Rotate ``moving`` atoms about the bond ``atoms[1]``–``atoms[2]`` so the dihedral is ``value``.

    Only the moving group turns, so the chirality at the bond's atoms is unchanged (setting φ
    in internal coordinates would carry HA and CB along and invert C-alpha).
    """
    x = np.array(x, dtype=np.float64)
    t = torch.as_tensor(x)
    current = float(dihedral(*(t[None, i] for i in atoms))[0])
    b, c = x[atoms[1]], x[atoms[2]]
    axis = (c - b) / np.linalg.norm(c - b)
    angle = value - current
    # Rodrigues rotation about the axis through b; the sign makes the dihedral increase by angle
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    for sign in (1.0, -1.0):
        rot = np.eye(3) + np.sin(sign * angle) * k + (1 - np.cos(sign * angle)) * k @ k
        y = x.copy()
        y[list(moving)] = (x[list(moving)] - b) @ rot.T + b
        got = float(dihedral(*(torch.as_tensor(y)[None, i] for i in atoms))[0])
        if abs(math.remainder(got - value, 2 * math.pi)) < 1e-6:
            return y
    raise RuntimeError("could not set the dihedral")  # pragma: no cover


def alpha_l_start(system: Any, phi: float = 1.0, psi: float = 0.6) -> tuple[np.ndarray, int]:
    """A start structure in the αL basin (L-alanine): rotate the caps to (φ, ψ), then minimise.

    Returns the structure and the energy evaluations of its minimisation.
    """
    from .energy.minimize import minimize_energy
    from .energy.openmm_backend import OpenMMEnergy

    x0, _ = system.initial_configuration()
    x = set_dihedral(x0, ALDP_PHI_ATOMS, phi, ALDP_PHI_SIDE)
    x = set_dihedral(x, ALDP_PSI_ATOMS, psi, ALDP_PSI_SIDE)
    with OpenMMEnergy(system.openmm_system, platform="Reference") as be:
        res = minimize_energy(be, x, gtol=1e-2)
    return res.x, res.n_evaluations


def export_engine(system: Any, path: str | Path) -> Path:
    """Write the torch force field, masses, bonds and start structures of ``system``."""
    from .energy.torch_backend import TorchEnergy
    from .md import particle_masses_amu

    te = TorchEnergy.from_openmm(system.openmm_system, dtype=torch.float64)
    masses = particle_masses_amu(system.openmm_system)
    x_beta, _ = system.initial_configuration()
    x_alpha_l, _ = alpha_l_start(system)
    starts = torch.as_tensor(np.stack([x_beta, x_alpha_l]))
    if not bool(system.is_l(starts).all()):
        raise RuntimeError("a start structure is not the L form")
    blob = {
        "format": ENGINE_FORMAT,
        "system": system.name,
        "energy_params": te.params,
        "masses_amu": torch.as_tensor(masses),
        "x_beta_nm": torch.as_tensor(x_beta),
        "x_alpha_l_nm": torch.as_tensor(x_alpha_l),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(blob, path)
    return path


def load_engine(path: str | Path) -> dict[str, Any]:
    """Read an engine file (needs torch only)."""
    blob = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != ENGINE_FORMAT:
        raise ValueError(f"{path}: not a cgflow engine file (expected format {ENGINE_FORMAT!r})")
    return blob


# ----------------------------------------------------------------------------------- chunks
@dataclass(frozen=True)
class ChunkSettings:
    """Parameters of the generation; all recorded in every chunk file."""

    temperatures_K: tuple[float, ...] = (300.0, 354.0, 418.0, 494.0, 583.0, 700.0)
    n_ladders: int = 32
    steps: int = 50_000  #: steps per chunk (all chains)
    timestep_fs: float = 2.0
    friction_per_ps: float = 1.0
    hydrogen_mass_amu: float = 3.0  #: 0 = no repartitioning
    exchange_every: int = 50
    sample_every: int = 10  #: histogram stride (steps)
    series_every: int = 500  #: time-series stride (steps)
    equilibration_steps: int = 10_000  #: run before sampling, first chunk only
    seed: int = 2024
    device: str = "cpu"
    dtype: str = "float32"
    #: start structures: "both" = half the ladders in β (the minimum), half in αL (the reference);
    #: "minimum" = all in β (independent plain-MD trajectories with a single 300 K temperature)
    start: str = "both"

    def validate(self) -> None:
        if self.temperatures_K[0] != 300.0:
            raise ValueError("the first temperature of the ladder must be 300 K (the target)")
        for name in ("steps", "exchange_every", "sample_every", "series_every", "n_ladders"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in ("sample_every", "series_every"):
            every = getattr(self, name)
            aligned = every % self.exchange_every == 0 or self.exchange_every % every == 0
            if self.steps % every or not aligned:
                raise ValueError(
                    f"{name} must divide steps and divide or be a multiple of exchange_every"
                )
        if self.steps % self.exchange_every:
            raise ValueError("exchange_every must divide steps")
        if self.start not in ("both", "minimum"):
            raise ValueError(f"start must be 'both' or 'minimum', got {self.start!r}")
        if self.start == "both" and self.n_ladders % 2:
            raise ValueError("n_ladders must be even (half start in β, half in αL)")


def chunk_seed(seed: int, index: int) -> int:
    """Seed of chunk ``index``, derived from the run's seed."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:4], "little")


def phi_psi(x: torch.Tensor) -> torch.Tensor:
    """Standard (φ, ψ) of Cartesian frames ``[B, 22, 3]`` -> ``[B, 2]`` radians."""
    p = [x[:, i] for i in ALDP_PHI_ATOMS]
    q = [x[:, i] for i in ALDP_PSI_ATOMS]
    return torch.stack([dihedral(*p), dihedral(*q)], dim=1)


def run_chunk(
    engine_path: str | Path,
    out: str | Path,
    index: int,
    previous: str | Path | None,
    settings: ChunkSettings,
    command: str = "",
) -> Path:
    """Run chunk ``index`` (from ``previous``'s final state, or from the start structures)."""
    settings.validate()
    if (index == 0) != (previous is None):
        raise ValueError(
            "chunk 0 starts from the engine's structures; chunk k > 0 needs the previous chunk"
        )
    blob = load_engine(engine_path)
    from .energy.torch_backend import TorchEnergy

    dtype = getattr(torch, settings.dtype)
    energy = TorchEnergy(blob["energy_params"], device=settings.device, dtype=dtype)
    masses = blob["masses_amu"].numpy()
    if settings.hydrogen_mass_amu > 0:
        bonds = blob["energy_params"]["bond_index"].numpy().reshape(-1, 2)
        masses = hydrogen_mass_repartition(masses, bonds, settings.hydrogen_mass_amu)
    temps = np.asarray(settings.temperatures_K, dtype=np.float64)
    k, m = len(temps), settings.n_ladders
    seed = chunk_seed(settings.seed, index)
    engine = BatchedLangevin(
        energy,
        masses,
        np.repeat(temps, m),
        timestep_fs=settings.timestep_fs,
        friction_per_ps=settings.friction_per_ps,
        seed=seed,
        device=settings.device,
    )
    pt = ParallelTempering(engine, temps, m, settings.exchange_every, seed=seed)
    if previous is None:
        starts = torch.stack([blob["x_beta_nm"], blob["x_alpha_l_nm"]])  # [2, N, 3]
        ladder_start = (torch.arange(m) >= m // 2).long()  # 0 = β, 1 = αL
        if settings.start == "minimum":
            ladder_start = torch.zeros(m, dtype=torch.long)
        x0 = starts[ladder_start].repeat(k, 1, 1)
        state = engine.init_state(x0)
        if settings.equilibration_steps:
            pt.run(state, settings.equilibration_steps)
        state.steps = 0
        prev_steps, replica = 0, pt.replica.cpu().numpy()
        ladder_origin = ladder_start.numpy()
    else:
        prev = read_h5(previous, "histogram")
        if int(prev.attrs["chunk_index"]) != index - 1:
            raise ValueError(
                f"{previous} is chunk {prev.attrs['chunk_index']}, expected {index - 1}"
            )
        _check_same_settings(prev.attrs, settings)
        state = engine.init_state(prev["final_x_nm"])
        state.v = torch.as_tensor(
            prev["final_v_nm_per_ps"], dtype=torch.float64, device=engine.device
        )
        prev_steps = int(prev.attrs["total_steps"])
        replica = prev["replica"]
        ladder_origin = prev["ladder_start_basin"]
        pt.replica = torch.as_tensor(replica, device=engine.device)

    grids = {name: GRIDS[name] for name in GRIDS}
    per_ladder = {
        name: np.zeros((m, g.bins, g.bins), dtype=np.int64)
        for name, g in grids.items()
        if name in PER_LADDER_GRIDS
    }
    pooled_fine = np.zeros((grids["fine360"].bins,) * 2, dtype=np.int64)
    series: list[np.ndarray] = []
    n_samples = 0

    def record(st: Any) -> None:
        nonlocal n_samples, pooled_fine
        if st.steps % settings.sample_every == 0:
            ang = phi_psi(st.x[:m]).cpu().numpy()  # the 300 K slot of every ladder
            for name, counts in per_ladder.items():
                flat = grids[name].flat_index(ang)
                np.add.at(counts.reshape(m, -1), (np.arange(m), flat), 1)  # a view: adds in place
            pooled_fine += grids["fine360"].histogram(ang)
            n_samples += 1
            if st.steps % settings.series_every == 0:
                series.append(ang.astype(np.float32))

    step_every = math.gcd(settings.sample_every, settings.series_every)
    pt.run(state, settings.steps, callback=record, every=step_every)
    t_kin = engine.kinetic_temperature(state).reshape(k, m).mean(dim=1).cpu().numpy()
    u_mean = state.u.reshape(k, m).mean(dim=1).cpu().numpy()
    arrays = {f"counts_{name}": c.astype(np.int32) for name, c in per_ladder.items()}
    arrays["counts_fine360"] = pooled_fine
    arrays["series_phi_psi"] = (
        np.stack(series, axis=1) if series else np.zeros((m, 0, 2), np.float32)
    )
    arrays["exchange_attempts"] = pt.attempts
    arrays["exchange_accepts"] = pt.accepts
    arrays["temperatures_K"] = temps
    arrays["masses_amu"] = masses
    arrays["final_x_nm"] = state.x.cpu().numpy()
    arrays["final_v_nm_per_ps"] = state.v.cpu().numpy()
    arrays["replica"] = pt.replica.cpu().numpy()
    arrays["ladder_start_basin"] = np.asarray(ladder_origin)
    arrays["final_kinetic_temperature_K"] = t_kin
    arrays["final_mean_energy_kJ_per_mol"] = u_mean
    units = {name: "1" for name in arrays}
    units.update(
        temperatures_K="K",
        masses_amu="amu",
        final_x_nm="nm",
        final_v_nm_per_ps="nm/ps",
        series_phi_psi="rad",
        final_kinetic_temperature_K="K",
        final_mean_energy_kJ_per_mol="kJ/mol",
    )
    attrs = {
        "chunk_index": index,
        "chunk_seed": seed,
        "samples_per_ladder": n_samples,
        "steps": settings.steps,
        "total_steps": prev_steps + settings.steps,
        "command": command or " ".join(sys.argv),
        "settings": settings.__dict__,
        "grids": {name: {"bins": g.bins, "shifted": g.shifted} for name, g in grids.items()},
        "series_axes": "ladder, time, (phi, psi)",
        "counts_axes": "ladder, first coordinate bin, second coordinate bin",
        "ladder_start_basin_codes": "0 = beta (minimum), 1 = alphaL",
    }
    prov = Provenance(
        system=str(blob["system"]), seed=settings.seed, kT_kJ_per_mol=300.0 * 8.314462618e-3
    )
    return write_h5(out, "histogram", arrays, units, prov, attrs=attrs)


def _mean_or_nan(a: np.ndarray) -> float:
    return float(a.mean()) if a.size else float("nan")


def _check_same_settings(prev_attrs: dict[str, Any], settings: ChunkSettings) -> None:
    import json

    prev = json.loads(prev_attrs["settings"])
    mine = json.loads(json.dumps(settings.__dict__))
    mine_defaults = json.loads(json.dumps(ChunkSettings().__dict__))
    for key in (
        "temperatures_K",
        "n_ladders",
        "timestep_fs",
        "friction_per_ps",
        "hydrogen_mass_amu",
        "exchange_every",
        "sample_every",
        "series_every",
        "seed",
        "start",
    ):
        # a key missing from an older chunk's settings had the field's default there
        theirs = prev.get(key, mine_defaults.get(key))
        if theirs != mine.get(key):
            raise ValueError(
                f"setting {key!r} differs from the previous chunk: {theirs} vs {mine.get(key)}"
            )


# ------------------------------------------------------------------------------ statistics
def integrated_autocorrelation_time(series: np.ndarray, max_lag: int | None = None) -> float:
    """Integrated autocorrelation time (in samples) of ``series[chains, time]``.

    Chain-averaged autocorrelation with Sokal's self-consistent window (c = 5).
    """
    x = np.asarray(series, dtype=np.float64)
    x = x - x.mean()
    n = x.shape[1]
    var = (x * x).mean()
    if var == 0 or n < 4:
        return 1.0
    max_lag = max_lag or n // 2
    f = np.fft.rfft(x, n=2 * n, axis=1)
    acf = np.fft.irfft(f * np.conj(f), axis=1)[:, :n].mean(axis=0) / (n - np.arange(n)) / var
    tau = 1.0
    for lag in range(1, max_lag):
        tau = 1.0 + 2.0 * acf[1 : lag + 1].sum()
        if lag >= 5 * tau:
            break
    return float(max(tau, 1.0))


def effective_sample_size(series_phi_psi: np.ndarray) -> dict[str, float]:
    """ESS of the time series ``[ladders, time, 2]`` for several observables (min is reported)."""
    phi, psi = series_phi_psi[..., 0], series_phi_psi[..., 1]
    observables = {
        "sin_phi": np.sin(phi),
        "cos_phi": np.cos(phi),
        "sin_psi": np.sin(psi),
        "cos_psi": np.cos(psi),
        "phi_positive": ((phi > 0) & (phi < 2.2)).astype(np.float64),
    }
    n = phi.size
    out = {}
    for name, obs in observables.items():
        out[name] = n / integrated_autocorrelation_time(obs)
    out["min"] = min(out.values())
    return out


def kld_noise_floor(per_ladder_counts: np.ndarray) -> float:
    """Expected forward KLD of an exact model against the pooled histogram (nats).

    Asymptotically ``E[KL(P̂ || P)] ≈ ½ Σ_b Var(P̂_b) / P_b``. The ladders are independent
    Markov chains with equal sample counts, so ``Var(P̂_b) = s_b² / G`` with ``s_b²`` the
    variance of the ``G`` per-ladder histograms (batch means): correlation within a ladder is
    accounted for.
    """
    c = np.asarray(per_ladder_counts, dtype=np.float64).reshape(per_ladder_counts.shape[0], -1)
    g = c.shape[0]
    if g < 2:
        raise ValueError("the noise floor needs at least 2 independent ladders")
    p_g = c / c.sum(axis=1, keepdims=True)
    p = p_g.mean(axis=0)
    var = p_g.var(axis=0, ddof=1) / g
    m = p > 0
    return float(0.5 * (var[m] / p[m]).sum())


# ------------------------------------------------------------------------------------ merge
def merge_chunks(chunks: Sequence[str | Path], out: str | Path, discard: int = 0) -> Path:
    """Add the chunk files into the reference file (counts, statistics, provenance).

    Args:
        discard: the first ``discard`` chunks are equilibration (burn-in): they must exist
            but are left out of the counts and statistics.
    """
    if not chunks:
        raise ValueError("no chunk files to merge")
    data = sorted(
        (read_h5(p, "histogram") for p in chunks), key=lambda d: int(d.attrs["chunk_index"])
    )
    indices = [int(d.attrs["chunk_index"]) for d in data]
    if indices != list(range(len(indices))):
        raise ValueError(f"chunks must be 0..n-1 without gaps, got {indices}")
    if not 0 <= discard < len(data):
        raise ValueError(
            f"cannot discard {discard} of {len(data)} chunks: at least one must remain"
        )
    data = data[discard:]
    for d in data[1:]:
        if d.attrs["settings"] != data[0].attrs["settings"]:
            raise ValueError(
                f"chunk {d.attrs['chunk_index']} was run with other settings than chunk 0"
            )
    arrays: dict[str, np.ndarray] = {}
    units: dict[str, str] = {}
    for name in (*PER_LADDER_GRIDS, "fine360"):
        key = f"counts_{name}"
        per = sum(d[key].astype(np.int64) for d in data)
        arrays[f"counts_{name}"] = per.sum(axis=0) if per.ndim == 3 else per
        units[f"counts_{name}"] = "1"
        if per.ndim == 3:
            arrays[f"ladder_counts_{name}"] = per.astype(np.int32)
            units[f"ladder_counts_{name}"] = "1"
    series = np.concatenate([d["series_phi_psi"] for d in data], axis=1)
    arrays["series_phi_psi"] = series
    units["series_phi_psi"] = "rad"
    attempts = sum(d["exchange_attempts"] for d in data)
    accepts = sum(d["exchange_accepts"] for d in data)
    arrays["exchange_acceptance"] = accepts / np.maximum(attempts, 1)
    units["exchange_acceptance"] = "1"
    arrays["temperatures_K"] = data[0]["temperatures_K"]
    units["temperatures_K"] = "K"
    arrays["ladder_start_basin"] = data[0]["ladder_start_basin"]
    units["ladder_start_basin"] = "1"

    ess = effective_sample_size(series)
    ladder_phi_pos = np.array(
        [phi_positive_fraction(series[g, :, 0]) for g in range(series.shape[0])]
    )
    std36 = arrays["ladder_counts_std36"]
    c = GRIDS["std36"].centres
    sel = (c > 0) & (c < 2.2)
    per_ladder_pos = std36[:, sel, :].sum(axis=(1, 2)) / std36.sum(axis=(1, 2))
    pos = float(arrays["counts_std36"][sel].sum() / arrays["counts_std36"].sum())
    pos_se = float(per_ladder_pos.std(ddof=1) / math.sqrt(len(per_ladder_pos)))
    start = arrays["ladder_start_basin"]
    summary = {
        "chunks": len(data),
        "discarded_chunks": discard,
        "steps_per_chain": int(data[-1].attrs["total_steps"]),
        "sampled_steps_per_chain": int(sum(int(d.attrs["steps"]) for d in data)),
        "samples_300K": int(arrays["counts_std100"].sum()),
        "ess_300K": ess,
        "phi_positive_population": pos,
        "phi_positive_stderr": pos_se,
        "phi_positive_relative_error": pos_se / pos if pos > 0 else math.inf,
        "phi_positive_from_beta_starts": _mean_or_nan(per_ladder_pos[start == 0]),
        "phi_positive_from_alphaL_starts": _mean_or_nan(per_ladder_pos[start == 1]),
        "phi_positive_series_check": float(ladder_phi_pos.mean()),
        "kld_noise_floor": {
            name: kld_noise_floor(arrays[f"ladder_counts_{name}"]) for name in PER_LADDER_GRIDS
        },
    }
    first = data[0]
    attrs = {
        "summary": summary,
        "settings": first.attrs["settings"],
        "grids": first.attrs["grids"],
        "chunk_commands": [d.attrs["command"] for d in data],
        "method": "replica-exchange Langevin (BAOAB) on the cgflow torch backend, ff96 + OBC1, no constraints",
    }
    prov = Provenance(
        system=first.attrs["system"],
        seed=int(first.attrs["seed"]),
        kT_kJ_per_mol=first.attrs.get("kT_kJ_per_mol"),
    )
    return write_h5(out, "reference", arrays, units, prov, attrs=attrs)


def load_reference(path: str | Path | None = None) -> Any:
    """The shipped alanine-dipeptide reference (or another reference file)."""
    return read_h5(path or ALDP_REFERENCE, "reference")
