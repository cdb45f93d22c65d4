"""Validation of the batched Langevin engine and replica exchange (fast + slow versions)."""

import math

import numpy as np
import openmm
import pytest
import torch
from openmm import unit

from cgflow.energy.base import EnergyBackend
from cgflow.energy.torch_backend import TorchEnergy
from cgflow.md import (
    KB_KJ_PER_MOL_K,
    BatchedLangevin,
    NonFiniteEnergyError,
    ParallelTempering,
    hydrogen_mass_repartition,
)
from cgflow.reference import phi_psi

PSI_BINS = np.linspace(-math.pi, math.pi, 7)


def masses_of(system):
    return np.array(
        [
            system.getParticleMass(i).value_in_unit(unit.dalton)
            for i in range(system.getNumParticles())
        ]
    )


def equilibrated_starts(aldp, n, first=3000, every=500):
    """``n`` configurations from one OpenMM run at high friction (10/ps), 300 K."""
    x0, _ = aldp.initial_configuration()
    integ = openmm.LangevinMiddleIntegrator(
        300 * unit.kelvin, 10 / unit.picosecond, 1 * unit.femtosecond
    )
    integ.setRandomNumberSeed(99)
    ctx = openmm.Context(
        aldp.openmm_system, integ, openmm.Platform.getPlatformByName("CPU"), {"Threads": "1"}
    )
    ctx.setPositions(x0)
    ctx.setVelocitiesToTemperature(300 * unit.kelvin, 99)
    integ.step(first)
    out = []
    for _ in range(n):
        integ.step(every)
        out.append(
            ctx.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        )
    return np.array(out)


def openmm_runs(aldp, x0, n_runs, n_steps, stride, equil, temperature=300.0, friction=1.0):
    """U (kJ/mol), kinetic T (K, 3N-3 dof: CMMotionRemover) and ψ of independent OpenMM runs."""
    us, ts, psis = [], [], []
    for r in range(n_runs):
        integ = openmm.LangevinMiddleIntegrator(
            temperature * unit.kelvin, friction / unit.picosecond, 1 * unit.femtosecond
        )
        integ.setRandomNumberSeed(100 + r)
        ctx = openmm.Context(
            aldp.openmm_system, integ, openmm.Platform.getPlatformByName("CPU"), {"Threads": "1"}
        )
        ctx.setPositions(x0[r % len(x0)])
        ctx.setVelocitiesToTemperature(temperature * unit.kelvin, 100 + r)
        integ.step(equil)
        u, t, x = [], [], []
        for _ in range(n_steps // stride):
            integ.step(stride)
            st = ctx.getState(getEnergy=True, getPositions=True)
            u.append(st.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
            t.append(
                2
                * st.getKineticEnergy().value_in_unit(unit.kilojoule_per_mole)
                / (63 * KB_KJ_PER_MOL_K)
            )
            x.append(st.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
        us.append(u)
        ts.append(t)
        psis.append(phi_psi(torch.as_tensor(np.array(x)))[:, 1].numpy())
    return np.array(us), np.array(ts), np.array(psis)


def engine_runs(
    aldp,
    x0,
    n_chains,
    n_steps,
    stride,
    equil,
    temperature=300.0,
    timestep_fs=1.0,
    h_mass=0.0,
    seed=0,
    friction=1.0,
):
    te = TorchEnergy.from_openmm(aldp.openmm_system, dtype=torch.float32)
    m = masses_of(aldp.openmm_system)
    if h_mass:
        m = hydrogen_mass_repartition(m, te.params["bond_index"].numpy().reshape(-1, 2), h_mass)
    eng = BatchedLangevin(
        te,
        m,
        np.full(n_chains, temperature),
        timestep_fs=timestep_fs,
        friction_per_ps=friction,
        seed=seed,
    )
    st = eng.init_state(np.asarray(x0)[np.arange(n_chains) % len(x0)])
    eng.step(st, equil)
    us, ts, psis = [], [], []
    for _ in range(n_steps // stride):
        eng.step(st, stride)
        us.append(st.u.numpy().copy())
        ts.append(eng.kinetic_temperature(st).numpy())
        psis.append(phi_psi(st.x)[:, 1].numpy())
    return np.array(us).T, np.array(ts).T, np.array(psis).T  # [chains, time]


def mean_and_error(per_chain: np.ndarray) -> tuple[float, float]:
    """Mean and standard error from independent chains (rows)."""
    means = per_chain.mean(axis=1)
    return float(means.mean()), float(means.std(ddof=1) / math.sqrt(len(means)))


def psi_fractions(psi: np.ndarray) -> np.ndarray:
    """Per-chain fractions of ψ in 6 bins, [chains, 6]."""
    return np.stack([np.histogram(p, PSI_BINS)[0] / len(p) for p in psi])


def z_score(a, b) -> float:
    return abs(a[0] - b[0]) / math.hypot(a[1], b[1])


def compare(
    aldp, n_runs, omm_steps, n_chains, eng_steps, timestep_fs, h_mass, friction=1.0, control_T=330.0
):
    x0 = equilibrated_starts(aldp, n_runs)
    stride, equil = 10, 200
    u_o, t_o, psi_o = openmm_runs(aldp, x0, n_runs, omm_steps, stride, equil, friction=friction)
    eng_stride = max(1, round(stride / timestep_fs))
    u_e, t_e, psi_e = engine_runs(
        aldp,
        x0,
        n_chains,
        int(eng_steps),
        eng_stride,
        int(equil / timestep_fs),
        timestep_fs=timestep_fs,
        h_mass=h_mass,
        friction=friction,
    )
    u_c, t_c, _ = engine_runs(
        aldp,
        x0,
        n_chains,
        int(eng_steps),
        eng_stride,
        int(equil / timestep_fs),
        temperature=control_T,
        timestep_fs=timestep_fs,
        h_mass=h_mass,
        seed=1,
        friction=friction,
    )
    # OpenMM has few long runs: use 5 blocks per run as the independent units
    blocks = lambda a: a.reshape(a.shape[0] * 5, -1)  # noqa: E731
    res = {
        "U": z_score(mean_and_error(blocks(u_o)), mean_and_error(u_e)),
        "U_control": z_score(mean_and_error(blocks(u_o)), mean_and_error(u_c)),
        "T": z_score(mean_and_error(blocks(t_o)), mean_and_error(t_e)),
        "T_control": z_score(mean_and_error(blocks(t_o)), mean_and_error(t_c)),
    }
    fo, fe = psi_fractions(blocks(psi_o)), psi_fractions(psi_e)
    mo, se_o = fo.mean(0), fo.std(0, ddof=1) / math.sqrt(len(fo))
    me, se_e = fe.mean(0), fe.std(0, ddof=1) / math.sqrt(len(fe))
    populated = (mo > 0.01) | (me > 0.01)
    res["psi_max_z"] = float(np.max(np.abs(mo - me)[populated] / np.hypot(se_o, se_e)[populated]))
    res["means"] = dict(
        U_openmm=u_o.mean(),
        U_engine=u_e.mean(),
        U_330=u_c.mean(),
        T_openmm=t_o.mean(),
        T_engine=t_e.mean(),
    )
    return res


def test_engine_matches_openmm_md_fast(aldp):
    """Same integrator family, 1 fs, no HMR: <U>, kinetic T and ψ agree; 330 K is detected.

    Friction 5/ps decorrelates the energies faster, so 8 x 8 ps suffice for the control.
    """
    r = compare(
        aldp,
        n_runs=8,
        omm_steps=8_000,
        n_chains=32,
        eng_steps=8_000,
        timestep_fs=1.0,
        h_mass=0.0,
        friction=5.0,
    )
    print(r)
    assert r["U"] < 4 and r["T"] < 4 and r["psi_max_z"] < 4.5, r
    assert r["U_control"] > 4 and r["T_control"] > 4, r


@pytest.mark.slow
def test_engine_matches_openmm_md_production_settings_1ns(aldp):
    """>= 1 ns each: OpenMM (1 fs) vs the generator's settings (1.5 fs, HMR 3 amu)."""
    r = compare(
        aldp,
        n_runs=8,
        omm_steps=125_000,
        n_chains=64,
        eng_steps=12_000,
        timestep_fs=1.5,
        h_mass=3.0,
    )
    print(r)
    assert r["U"] < 4 and r["psi_max_z"] < 4.5, r
    assert r["U_control"] > 4, r


def test_hydrogen_mass_repartitioning(aldp):
    m = masses_of(aldp.openmm_system)
    bonds = TorchEnergy.from_openmm(aldp.openmm_system).params["bond_index"].numpy().reshape(-1, 2)
    mh = hydrogen_mass_repartition(m, bonds, 3.0)
    assert mh.sum() == pytest.approx(m.sum())
    assert np.allclose(mh[m < 1.5], 3.0)
    assert (mh[m > 1.5] < m[m > 1.5] + 1e-12).all()
    with pytest.raises(ValueError, match="mass <= 0"):
        hydrogen_mass_repartition(m, bonds, 6.0)


class Harmonic(EnergyBackend):
    """N independent 3-D harmonic oscillators, U = k/2 |x|^2 (kJ/mol, nm)."""

    def __init__(self, k: float = 500.0):
        self.k = k

    def energies(self, x):
        return 0.5 * self.k * (torch.as_tensor(x) ** 2).sum(dim=(1, 2))

    def energies_and_forces(self, x):
        x = torch.as_tensor(x)
        return self.energies(x), -self.k * x


def test_parallel_tempering_samples_each_temperature_exactly():
    """Harmonic oscillators: <U> = 3/2 N kT at every slot of the ladder despite exchanges."""
    temps = ParallelTempering.temperature_ladder(300.0, 900.0, 5)
    k, m, n_atoms = len(temps), 64, 4
    eng = BatchedLangevin(
        Harmonic(),
        np.ones(n_atoms),
        np.repeat(temps, m),
        timestep_fs=2.0,
        friction_per_ps=5.0,
        seed=3,
    )
    pt = ParallelTempering(eng, temps, m, exchange_every=10, seed=3)
    st = eng.init_state(np.zeros((n_atoms, 3)))
    pt.run(st, 2000)
    u = []
    pt.run(st, 20_000, callback=lambda s: u.append(s.u.reshape(k, m).mean(dim=1).numpy()), every=10)
    u = np.array(u).mean(axis=0)
    expected = 1.5 * n_atoms * KB_KJ_PER_MOL_K * temps
    np.testing.assert_allclose(u, expected, rtol=0.03)
    acc = pt.acceptance
    assert ((acc > 0.05) & (acc < 0.95)).all(), acc
    # every ladder holds a permutation of its own replicas
    rep = pt.replica.numpy()
    for ladder in range(m):
        assert sorted(rep[:, ladder] % m) == [ladder] * k


def test_parallel_tempering_on_alanine_dipeptide_exchange_rates(aldp):
    te = TorchEnergy.from_openmm(aldp.openmm_system, dtype=torch.float32)
    temps = ParallelTempering.temperature_ladder(300.0, 700.0, 6)
    x0, _ = aldp.initial_configuration()
    eng = BatchedLangevin(
        te, masses_of(aldp.openmm_system), np.repeat(temps, 8), timestep_fs=1.0, seed=0
    )
    pt = ParallelTempering(eng, temps, 8, exchange_every=25, seed=0)
    st = eng.init_state(x0)
    pt.run(st, 3000)
    acc = pt.acceptance
    assert ((acc > 0.2) & (acc < 0.95)).all(), acc  # a sane ladder for 22 atoms
    t = eng.kinetic_temperature(st).reshape(6, 8).mean(dim=1).numpy()
    assert (np.diff(t) > 0).sum() >= 4  # slots stay ordered by temperature


def test_engine_checks_and_reproducibility(aldp):
    te = TorchEnergy.from_openmm(aldp.openmm_system, dtype=torch.float32)
    x0, _ = aldp.initial_configuration()
    m = masses_of(aldp.openmm_system)
    runs = []
    for _ in range(2):
        eng = BatchedLangevin(te, m, np.full(4, 300.0), seed=11)
        st = eng.init_state(x0)
        eng.step(st, 50)
        runs.append(st.x.clone())
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    eng = BatchedLangevin(te, m, np.full(2, 300.0), timestep_fs=50.0, seed=0)
    st = eng.init_state(x0)
    with pytest.raises(NonFiniteEnergyError, match="reduce the timestep"):
        eng.step(st, 200, check_every=10)
    with pytest.raises(ValueError, match="temperatures"):
        BatchedLangevin(te, m, np.array([300.0, -1.0]))
    with pytest.raises(ValueError, match="x0 must be"):
        BatchedLangevin(te, m, np.full(2, 300.0)).init_state(np.zeros((5, 3)))
    with pytest.raises(ValueError, match="strictly increasing"):
        ParallelTempering(
            BatchedLangevin(te, m, np.full(2, 300.0)), np.array([300.0, 300.0]), 1, 10
        )
