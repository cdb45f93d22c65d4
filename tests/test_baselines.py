"""Baselines: metadynamics runs and their free energy, MD curves, the speedup table."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pandas as pd
import pytest

from cgflow import baselines as bl
from cgflow.metadynamics import (
    MetadSettings,
    free_energy_kT,
    interpolate_periodic,
    run_metadynamics,
)
from cgflow.metrics import GRIDS


class FakeReference(dict):
    """What :func:`cgflow.reference.load_reference` gives, for a known distribution."""

    def __init__(self, counts: dict, floors: dict | None = None):
        super().__init__(counts)
        self.attrs = {"summary": json.dumps({"kld_noise_floor": floors or {}})}


def reference_from_samples(phi_psi):
    return FakeReference({f"counts_{g}": GRIDS[g].histogram(phi_psi) for g in bl.KLD_GRIDS})


def toy_samples(n, rng, phi_pos_fraction=0.1):
    """β/αR-like Gaussians at φ < 0 and a small φ > 0 basin."""
    k = rng.random(n)
    centres = np.where(
        (k < phi_pos_fraction)[:, None],
        [1.0, 0.6],
        np.where((k < 0.55)[:, None], [-2.5, 2.8], [-1.2, -0.8]),
    )
    return (centres + 0.3 * rng.standard_normal((n, 2)) + np.pi) % (2 * np.pi) - np.pi


# ------------------------------------------------------------------------------ metadynamics
def aldp_vacuum():
    from cgflow.systems import get_system

    return get_system("alanine_dipeptide", solvent="vacuum")


def test_metadynamics_variables_are_the_cg_dihedrals(aldp, aldp_frames):
    """The torsion forces on the Z-matrix atoms measure the system's own (φ, ψ): with energy
    expression "theta", each force's energy is its dihedral."""
    import openmm as mm
    import torch

    from cgflow.metadynamics import _cv_forces

    system = mm.System()
    for _ in range(aldp.n_atoms):
        system.addParticle(1.0)
    for group, force in enumerate(_cv_forces(aldp)):
        force.setForceGroup(group)
        system.addForce(force)
    ctx = mm.Context(system, mm.VerletIntegrator(0.001), mm.Platform.getPlatformByName("Reference"))
    x = np.asarray(aldp_frames[:5], dtype=np.float64)
    expected = aldp.cg(torch.as_tensor(x)).numpy()
    for frame, want in zip(x, expected, strict=True):
        ctx.setPositions(frame)
        got = [ctx.getState(getEnergy=True, groups={g}).getPotentialEnergy()._value for g in (0, 1)]
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_interpolation_follows_openmm_grid_layout():
    """Grid point i at -π + i 2π/(n-1), last = first, indexed [ψ, φ]."""
    n = 61
    x = -np.pi + np.arange(n) * 2 * np.pi / (n - 1)
    psi, phi = np.meshgrid(x, x, indexing="ij")
    F = np.cos(phi) + 2.0 * np.sin(2 * psi)
    pts = np.random.default_rng(0).uniform(-4, 4, (200, 2))
    exact = np.cos(pts[:, 0]) + 2.0 * np.sin(2 * pts[:, 1])
    assert np.abs(interpolate_periodic(F, pts) - exact).max() < 0.03
    # swapping the axes would be far off
    assert np.abs(interpolate_periodic(F.T, pts) - exact).max() > 1.0


def test_well_tempered_free_energy_from_bias():
    bias = np.array([[0.0, 3.5], [7.0, 1.0]])  # kJ/mol
    F = free_energy_kT(bias, bias_factor=8.0, kT_kJ=2.5)
    assert F.min() == 0.0
    assert F[0, 0] - F[1, 0] == pytest.approx(8.0 / 7.0 * 7.0 / 2.5)


def test_metadynamics_runs_resumes_and_refuses_other_settings(tmp_path, aldp):
    out = tmp_path / "run.h5"
    st = MetadSettings(n_steps=1000, record_every=500, deposit_every=250, seed=3)
    run_metadynamics(aldp, st, out, log=lambda m: None)
    with h5py.File(out) as f:
        assert list(f["steps"][()]) == [500, 1000]
        assert f["F_kT"].shape == (2, 90, 90) and f["F_kT"].attrs["units"] == "kT"
        assert f["cv_rad"].shape == (4, 2)
        F1, cv = f["F_kT"][1], f["cv_rad"][()]
        assert f.attrs["evaluations_per_step"] == 1
    # the bias sits where the walker was: F is lowest near the visited (φ, ψ)
    near = interpolate_periodic(F1, cv.astype(float)).mean()
    assert near < np.percentile(F1, 5)
    run_metadynamics(aldp, MetadSettings(**{**st.__dict__, "n_steps": 1500}), out, log=print)
    with h5py.File(out) as f:
        assert list(f["steps"][()]) == [500, 1000, 1500]
        np.testing.assert_array_equal(f["F_kT"][1], F1)
        assert f["F_kT"][2].max() > F1.max()  # more Gaussians
        F_resumed = f["F_kT"][2]
    # resuming restores the integrator's random state: same as running through
    through = tmp_path / "through.h5"
    run_metadynamics(aldp, MetadSettings(**{**st.__dict__, "n_steps": 1500}), through)
    with h5py.File(through) as f:
        np.testing.assert_array_equal(f["F_kT"][2], F_resumed)
    with pytest.raises(ValueError, match="sigma_rad"):
        run_metadynamics(aldp, MetadSettings(**{**st.__dict__, "sigma_rad": 0.5}), out)
    with pytest.raises(ValueError, match="multiple of deposit_every"):
        MetadSettings(record_every=600, deposit_every=500)
    with pytest.raises(ValueError, match="multiple of record_every"):
        MetadSettings(n_steps=1200, record_every=500, deposit_every=250)
    with pytest.raises(ValueError, match="system"):
        run_metadynamics(aldp_vacuum(), MetadSettings(**{**st.__dict__, "n_steps": 2000}), out)
    from cgflow.systems import get_system

    with pytest.raises(ValueError, match="molecular system"):
        run_metadynamics(get_system("mueller_brown"), st, tmp_path / "mb.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.attrs["kind"] = "reference"
    with pytest.raises(ValueError, match="not an alanine-dipeptide metadynamics or OPES run"):
        bl.biased_run_points(tmp_path / "other.h5", {})


# ------------------------------------------------------------------------------ OPES
def test_opes_kernels_running_sums_merging_and_periodic_table():
    from cgflow.opes import OPESKernels

    axes = [np.linspace(-np.pi, np.pi, 41)] * 2
    k = OPESKernels([0.3, 0.3], [2 * np.pi, 2 * np.pi], 10.0, 8.0, axes)
    assert k.bias_kT(np.zeros((3, 2))) == pytest.approx(np.full(3, -10.0))  # P̃ = 0: -ΔE
    rng = np.random.default_rng(0)
    for s in rng.uniform(-np.pi, np.pi, (300, 2)):
        k.deposit(s)
    assert 10 < len(k.heights) < 300 and k.n_deposits == 300  # compressed
    grid, at = k._grid.copy(), k._at_centres.copy()
    k.recompute()
    np.testing.assert_allclose(grid, k._grid, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(at, k._at_centres, rtol=1e-9)
    v = k.bias_grid_kT()
    np.testing.assert_array_equal(v[0], v[-1])  # OpenMM's periodic tables want first = last
    np.testing.assert_array_equal(v[:, 0], v[:, -1])
    # the grid sums are the exact sums at the nodes
    nodes = np.stack(np.meshgrid(axes[0], axes[1], indexing="xy"), axis=-1).reshape(-1, 2)
    np.testing.assert_allclose(k._grid.ravel(), k._sum(nodes), rtol=1e-9)
    # a merge across ±π stays at ±π and keeps the mass-weighted mean
    k1 = OPESKernels([0.2], [2 * np.pi], 10.0, 8.0, [np.linspace(-np.pi, np.pi, 11)])
    k1.deposit([3.1], bias_kT=0.0)
    k1.deposit([-3.1], bias_kT=0.0)
    assert len(k1.heights) == 1 and abs(abs(k1.centres[0, 0]) - np.pi) < 0.05
    with pytest.raises(ValueError, match="1 or 2 CG"):
        OPESKernels([0.1] * 3, [None] * 3, 10.0, 8.0, [np.zeros(3)] * 3)


def test_opes_recovers_a_double_well_free_energy():
    """Metropolis on U = 4 (s² - 1)² kT plus the OPES bias, a deposit every 10 steps: the
    free energy of the reweighted kernels is U within 0.3 kT where U <= 4 kT (the error is
    statistical: about 0.4 kT after 3e4 steps, 0.2 after 1.2e5, for several seeds)."""
    from cgflow.opes import OPESKernels

    rng = np.random.default_rng(1)
    axis = np.linspace(-2.0, 2.0, 161)
    k = OPESKernels([0.1], [None], 8.0, 8.0, [axis])

    def U(s):
        return 4.0 * (s * s - 1.0) ** 2

    s = -1.0
    v = k.bias_kT(np.array([[s]]))[0]
    for step in range(100_000):
        trial = s + 0.3 * rng.standard_normal()
        vt = k.bias_kT(np.array([[trial]]))[0]
        if rng.random() < math.exp(min(0.0, U(s) + v - U(trial) - vt)):
            s, v = trial, vt
        if step % 10 == 9:
            k.deposit([s], bias_kT=v)
            v = k.bias_kT(np.array([[s]]))[0]
    F = k.free_energy_kT([axis])
    exact = U(axis)
    sel = exact <= 4.0
    err = F - exact
    err -= err[sel].mean()
    assert np.abs(err[sel]).max() < 0.3
    assert k.n_eff > 100


def test_opes_bias_acts_on_the_cg_dihedrals(aldp, aldp_frames):
    """The tabulated bias is a function of the system's own (φ, ψ) (grid x = φ, y = ψ)."""
    import openmm as mm
    import torch

    from cgflow.opes import BIAS_GROUP, OPESSettings, _model

    model = _model(aldp, OPESSettings(bias_grid=64))
    ax = np.linspace(-np.pi, np.pi, 64)
    phi, psi = np.meshgrid(ax, ax, indexing="xy")  # [ψ, φ]
    table = np.cos(phi) + 3.0 * np.sin(psi)
    model.bias_force.getTabulatedFunction(0).setFunctionParameters(
        64, 64, table.ravel().tolist(), -np.pi, np.pi, -np.pi, np.pi
    )
    ctx = mm.Context(
        model.system, mm.VerletIntegrator(0.001), mm.Platform.getPlatformByName("Reference")
    )
    x = np.asarray(aldp_frames[:5], dtype=np.float64)
    cg = aldp.cg(torch.as_tensor(x)).numpy()
    for frame, (f, p) in zip(x, cg, strict=True):
        ctx.setPositions(frame)
        e = ctx.getState(getEnergy=True, groups={BIAS_GROUP}).getPotentialEnergy()._value
        assert e == pytest.approx(np.cos(f) + 3.0 * np.sin(p), abs=2e-3)
        np.testing.assert_allclose(model.cv(frame), [f, p], atol=1e-5)


def test_opes_on_mueller_brown_runs_resumes_like_running_through(tmp_path):
    from cgflow.opes import OPESSettings, exact_pmf_errors, run_opes
    from cgflow.systems import get_system

    mb = get_system("mueller_brown")
    st = OPESSettings(
        n_steps=4000,
        record_every=2000,
        pace=100,
        barrier_kJ_per_mol=37.4,
        sigma=0.05,
        bias_factor=15.0,
        timestep_fs=5.0,
        friction_per_ps=20.0,
        hydrogen_mass_amu=0.0,
        bias_grid=128,
        fes_grid=50,
        seed=3,
    )
    out = tmp_path / "mb.h5"
    run_opes(mb, st, out, log=lambda m: None)
    with h5py.File(out) as f:
        assert list(f["steps"][()]) == [2000, 4000] and f["F_kT"].shape == (2, 50)
        assert f["cv"].shape == (40, 1) and f["cv"].attrs["units"] == "nm"
        assert f.attrs["kind"] == "opes" and f.attrs["evaluations_per_step"] == 1
        F1 = f["F_kT"][1]
    longer = OPESSettings(**{**st.__dict__, "n_steps": 6000})
    run_opes(mb, longer, out, log=lambda m: None)
    through = tmp_path / "through.h5"
    run_opes(mb, longer, through, log=lambda m: None)
    with h5py.File(out) as f, h5py.File(through) as g:
        np.testing.assert_array_equal(f["F_kT"][1], F1)
        np.testing.assert_array_equal(f["cv"][()], g["cv"][()])
        np.testing.assert_array_equal(f["F_kT"][2], g["F_kT"][2])
    errors = exact_pmf_errors(out, mb)
    assert [e["evaluations"] for e in errors] == [2000, 4000, 6000]
    assert all(np.isfinite(e["max_abs_dF_kT"]) for e in errors)
    with pytest.raises(ValueError, match="sigma"):
        run_opes(mb, OPESSettings(**{**longer.__dict__, "sigma": 0.1}), out)
    with pytest.raises(ValueError, match="multiple of pace"):
        OPESSettings(record_every=600, pace=500)
    with pytest.raises(ValueError, match="two dihedral"):
        run_opes(SimpleNamespace(name="toy", openmm_system=None), st, tmp_path / "x.h5")


@pytest.mark.slow
def test_opes_mueller_brown_matches_the_exact_pmf(tmp_path):
    """The shipped Müller–Brown validation (data/baselines/opes_300K/generate.sh
    mueller_brown 1, about 9 min): max |ΔF| ≤ 0.5 kT where F ≤ 10 kT after 4e6 steps."""
    from cgflow.cli import main
    from cgflow.opes import exact_pmf_errors
    from cgflow.systems import get_system

    out = tmp_path / "mb.h5"
    script = Path(__file__).resolve().parents[1] / "data/baselines/opes_300K/generate.sh"
    text = script.read_text()
    block = text[text.index("baseline opes --system mueller_brown") : text.index("\nfi\n")]
    args = " ".join(line.strip().rstrip("\\") for line in block.splitlines()).split()[4:]
    args = [a for a in args if not a.startswith('"') and a != "--out" and a != "--seed"]
    assert (
        main(
            [
                "baseline",
                "opes",
                "--system",
                "mueller_brown",
                "--out",
                str(out),
                "--seed",
                "1",
                *args,
            ]
        )
        == 0
    )
    assert exact_pmf_errors(out, get_system("mueller_brown"))[-1]["max_abs_dF_kT"] <= 0.5


# ------------------------------------------------------------------------------ MD curves
def test_md_points_converge_and_pool():
    rng = np.random.default_rng(1)
    ref = reference_from_samples(toy_samples(400_000, rng))
    series = np.stack([toy_samples(4000, rng) for _ in range(4)])
    pts = pd.DataFrame(bl.md_points(series, 10, ref, n_points=8))
    single = pts[pts.method == "md_single"]
    pooled = pts[pts.method == "md_pooled"]
    assert set(single.run) == {"0", "1", "2", "3"}
    assert pooled.evaluations.max() == 4 * 4000 * 10
    n, median, lo, hi = bl.median_curve(pts, "md_single", "kld_std36")
    assert n[-1] == 40_000 and median[-1] < 0.1 * median[0] and (lo <= median).all()
    assert (median <= hi).all()
    last = pooled.iloc[-1]
    assert last.kld_std36 < single[single.evaluations == 40_000].kld_std36.min()
    assert abs(last.dF_phi_pos_err_kT) < 0.1  # iid draws: the basin weight is right
    # a trajectory stuck in one bin stays far off
    one_bin = np.tile(series[0, :1], (1, 4000, 1))
    p1 = pd.DataFrame(bl.md_points(one_bin, 10, ref, n_points=4))
    assert (p1[p1.method == "md_single"].kld_std36 > 1.0).all()
    # a trajectory that never entered the φ > 0 basin has an infinite ΔF error
    stuck = series.copy()
    stuck[..., 0] = -np.abs(stuck[..., 0]) - 0.1
    p2 = pd.DataFrame(bl.md_points(stuck, 10, ref, n_points=3))
    assert np.isinf(p2.dF_phi_pos_err_kT).all()
    with pytest.raises(ValueError, match="chains, frames, 2"):
        bl.md_points(series[0], 10, ref)


def test_periodic_kde_density_interpolation_and_bandwidth():
    kde = bl.PeriodicKDE(bins=60, bandwidths=(0.1, 0.3, 1.0), blocks=5)
    # one sample next to ±π: the density peaks there and wraps round
    c = kde.counts(np.array([[np.pi - 0.01, 0.0]]))
    assert c.sum() == 1 and c[-1, 30] == 1
    p = kde.density(c, 0.3)
    assert p.sum() == pytest.approx(1.0, rel=1e-4)  # plus the floor
    c = np.pi - np.pi / 60  # the bin's centre; ± 0.05 on either side of ±π
    pts = np.array([[c - 0.05, kde_centre := np.pi / 60], [c + 0.05 - 2 * np.pi, kde_centre]])
    F = kde.free_energy_at(p, np.vstack([pts, [[0.0, 0.0]]]))
    assert F[0] == pytest.approx(F[1], abs=1e-6) and F[2] > F[0] + 5
    # more samples of one smooth distribution: a narrower width, and a KLD below the raw
    # histogram's where the histogram has too few samples per bin
    rng = np.random.default_rng(3)
    ref = reference_from_samples(toy_samples(400_000, rng))
    series = toy_samples(20_000, rng)[None]
    pts = pd.DataFrame(bl.md_kde_points(series, 10, ref, n_points=4))
    assert set(pts.method) == {"md_kde_single", "md_kde_pooled"}
    single = pts[pts.method == "md_kde_single"].sort_values("evaluations")
    assert single.bandwidth_rad.iloc[-1] < single.bandwidth_rad.iloc[1]
    hist = pd.DataFrame(bl.md_points(series, 10, ref, n_points=4))
    h = hist[hist.method == "md_single"].sort_values("evaluations")
    assert single.kld_std100.iloc[2] < h.kld_std100.iloc[2]
    assert single.kld_std100.iloc[-1] < 0.05 and abs(single.dF_phi_pos_err_kT.iloc[-1]) < 0.2
    with pytest.raises(ValueError, match="chains, frames, 2"):
        bl.md_kde_points(series[0], 10, ref)


# ------------------------------------------------------------------------------ the table
def test_evaluations_to_reach_needs_two_points_and_never_extrapolates():
    n = np.array([1e3, 1e4, 1e5, 1e6])
    y = 10.0 * n**-0.5  # 0.316, 0.1, 0.0316, 0.01
    r = bl.evaluations_to_reach(n, y, 0.05)
    assert r["status"] == "measured" and r["evaluations"] == pytest.approx(4e4, rel=1e-9)
    assert r["best"] == pytest.approx(0.0316, rel=1e-2)  # the tightest it reaches: 2 points
    # crossed at the last point only: one point is not enough
    r = bl.evaluations_to_reach(n, y, 0.02)
    assert r["status"] == "not reached" and r["evaluations"] == 1e6
    # below the run's end: not reached, with the best value seen, never extrapolated
    r = bl.evaluations_to_reach(n, y, 0.005)
    assert r["status"] == "not reached" and r["best"] == pytest.approx(0.0316, rel=1e-2)
    # a curve that dipped below and came back up has not reached it
    r = bl.evaluations_to_reach(
        np.geomspace(1e4, 2e6, 5), np.array([1, 0.3, 0.05, 0.08, 0.12]), 0.1
    )
    assert r["status"] == "not reached" and r["best"] == 0.12
    # already below at the first point: an upper bound
    assert bl.evaluations_to_reach(n, y, 0.5)["status"] == "at most"
    # dipping below and coming back up does not count; staying below from 1e5 on does
    noisy = np.array([0.5, 0.05, 0.5, 0.05, 0.05])
    r = bl.evaluations_to_reach(np.append(n, 1e7), noisy, 0.1)
    assert r["status"] == "measured" and 1e5 < r["evaluations"] < 1e6
    assert bl.evaluations_to_reach(n, np.array([0.05, 0.05, 0.05, 0.5]), 0.1)["status"] == (
        "not reached"
    )
    assert bl.evaluations_to_reach(n[:0], y[:0], 0.1)["status"] == "not run"


def test_median_over_runs_counts_short_runs_as_longer_than_their_length():
    def run(ev, status="measured", best=0.01):
        return {"evaluations": ev, "status": status, "best": best}

    # one of three short: the median is the larger of the two that reached it
    r = bl.combine_runs([run(1e5), run(3e5), run(2e5, "not reached", 0.2)])
    assert r["status"] == "reached" and r["evaluations"] == 3e5
    assert (r["runs"], r["reached"]) == (3, 2) and r["range"] == "1e+05->3e+05"
    assert r["best"] == pytest.approx(0.01)
    # two of three short: a lower bound, the median with the short runs at their length
    r = bl.combine_runs([run(1e5), run(4e6, "not reached"), run(4e6, "not reached")])
    assert r["status"] == "not reached" and r["evaluations"] == 4e6 and r["reached"] == 1
    # half of an even number short: not reached either
    r = bl.combine_runs([run(1e5), run(2e5), run(4e6, "not reached"), run(4e6, "not reached")])
    assert r["status"] == "not reached"
    r = bl.combine_runs([run(1e5, "at most"), run(2e5), run(3e5)])
    assert r["evaluations"] == 2e5 and "first point" in r["note"]
    assert bl.combine_runs([])["status"] == "not run"


def test_speedup_table_medians_ratios_and_quoted_rows():
    rows = []
    for seed, scale in enumerate((1.0, 2.0, 4.0)):
        for n, k in [(1e4, 1.0), (1e5, 0.1), (1e6, 0.01), (1e7, 0.01)]:
            rows.append(
                {
                    "method": "campaign",
                    "run": str(seed),
                    "evaluations": n * scale,
                    "kld_std36": k,
                    "dF_phi_pos_err_kT": -k,
                }
            )
            if seed == 1:
                rows.append(
                    {
                        "method": "md_pooled",
                        "run": "all",
                        "evaluations": 10 * n * scale,
                        "kld_std36": k,
                        "dF_phi_pos_err_kT": math.inf,
                    }
                )
    table = bl.speedup_table(pd.DataFrame(rows), ["kld_std36<=0.1", "dF_phi_pos_err_kT<=0.05"])
    t = table.set_index(["target", "method"])
    camp = t.loc[("kld_std36<=0.1", "campaign")]
    assert camp.evaluations == pytest.approx(2e5) and camp.range == "1e+05-4e+05"
    assert (camp.runs, camp.reached) == (3, 3)
    assert t.loc[("kld_std36<=0.1", "md_pooled"), "ratio_to_campaign"] == pytest.approx(10.0)
    md_df = t.loc[("dF_phi_pos_err_kT<=0.05", "md_pooled")]
    assert md_df.status == "not reached" and math.isnan(md_df.ratio_to_campaign)
    assert md_df.best == math.inf
    assert (table.status == "quoted").sum() == 2
    md = bl.markdown_table(table)
    assert "| kld_std36<=0.1 | md_pooled | 1 | 1 | 2.00e+06 | reached |" in md
    assert "| dF_phi_pos_err_kT<=0.05 | md_pooled | 1 | 0 | >2.00e+08 | not reached |" in md
    sentences = bl.target_sentences(table)
    assert sentences == [
        "**kld_std36 ≤ 0.1**: campaign at 2e+05 (3 of 3 runs) first, 10.0x fewer than the next, "
        "MD, all trajectories pooled (histogram) at 2e+06 (1 of 1 runs).",
        "**dF_phi_pos_err_kT ≤ 0.05**: only campaign at 4e+05 (3 of 3 runs); not reached by (the "
        "tightest level each holds, median) MD, all trajectories pooled (histogram) no finite value.",
    ]
    # a level just above its threshold keeps the digits that show it is above
    assert bl._level(0.01014, 0.01) == "0.0101" and bl._level(0.0094, 0.005) == "0.0094"
    with pytest.raises(ValueError, match="metric<=threshold"):
        bl.parse_target("kld_std36 0.1")
    with pytest.raises(ValueError, match="not one of"):
        bl.parse_target("kld_std50<=0.1")
    with pytest.raises(ValueError, match="must be > 0"):
        bl.parse_target("kld_std36<=0")
    with pytest.raises(ValueError, match="no points"):
        bl.speedup_table(pd.DataFrame(), ["kld_std36<=0.1"])


def test_default_targets_go_down_to_three_times_the_floors():
    from cgflow.reference import load_reference

    bl.check_targets(bl.DEFAULT_TARGETS, load_reference())
    parsed = [bl.parse_target(t) for t in bl.DEFAULT_TARGETS]
    tightest = {m: min(v for mm, v in parsed if mm == m) for m, _ in parsed}
    assert tightest == {"kld_std100": 0.0035, "kld_std36": 0.0012, "dF_phi_pos_err_kT": 0.3}


def test_targets_below_three_times_the_floor_are_refused():
    ref = FakeReference({}, floors={"std36": 0.01})
    bl.check_targets(["kld_std36<=0.03", "dF_phi_pos_err_kT<=0.3"], ref)
    with pytest.raises(ValueError, match="noise floor"):
        bl.check_targets(["kld_std36<=0.02"], ref)


def test_campaign_points_from_a_summary():
    df = pd.DataFrame(
        {
            "iteration": [0, 1, 2],
            "N": [100, 1000, 3000],
            "cum_evals_training": [0, 600, 1500],
            "metric_kld_std36": [np.nan, 0.5, 0.2],
            "metric_dF_phi_pos_err_kT": [np.nan, 1.0, -0.2],
        }
    )
    pts = pd.DataFrame(bl.campaign_points(df, method="AL"))
    assert list(pts[pts.method == "AL"].evaluations) == [1000, 3000]
    assert list(pts[pts.method == "AL (training only)"].evaluations) == [600, 1500]
    with pytest.raises(ValueError, match="'N'"):
        bl.campaign_points(df.drop(columns="N"))


def two_iteration_summary(folder, **columns):
    """A campaign summary.csv of two iterations (N 1e5, 1e6; 36 x 36 KLD 0.2, 0.02)."""
    path = folder / "summary.csv"
    base = {"iteration": [1, 2], "N": [1e5, 1e6], "metric_kld_std36": [0.2, 0.02]}
    pd.DataFrame({**base, **columns}).to_csv(path, index=False)
    return path


def test_speedup_cli_end_to_end(tmp_path, aldp):
    """`cgflow baseline speedup` on a campaign summary, MD series and a metadynamics run."""
    from cgflow.cli import main

    summary = two_iteration_summary(
        tmp_path,
        cum_evals_training=[5e4, 2e5],
        metric_kld_shifted100=[0.3, 0.03],
        metric_dF_phi_pos_err_kT=[2.0, 0.1],
    )
    md = tmp_path / "md.h5"
    rng = np.random.default_rng(0)
    with h5py.File(md, "w") as f:
        f["series_phi_psi"] = toy_samples(2000, rng)[None].astype(np.float32)
        f.attrs["settings"] = json.dumps({"series_every": 100})
    run = tmp_path / "metad.h5"
    run_metadynamics(
        aldp,
        MetadSettings(n_steps=1000, record_every=500, deposit_every=250),
        run,
        log=lambda m: None,
    )
    opes = tmp_path / "opes.h5"
    assert (
        main(
            [
                *("baseline", "opes", "--out", str(opes), "--n-steps", "1000"),
                *("--record-every", "500", "--pace", "250", "--seed", "2"),
            ]
        )
        == 0
    )
    seed1 = tmp_path / "seed1"
    seed1.mkdir()
    summary1 = two_iteration_summary(seed1, metric_kld_std36=[0.3, 0.04])
    out = tmp_path / "speedup"
    rc = main(
        [
            "baseline",
            "speedup",
            "--campaign",
            f"AL={summary}",
            "--campaign",
            f"AL={summary1}",
            "--md",
            str(md),
            "--metad",
            str(run),
            "--opes",
            str(opes),
            "--target",
            "kld_std36<=0.05",
            "--out-dir",
            str(out),
        ]
    )
    assert rc == 0
    table = pd.read_csv(out / "speedup.csv")
    assert set(table.method) >= {"AL", "md_single", "md_pooled", "metadynamics", "opes"}
    assert set(table.method) >= {"md_kde_single", "md_kde_pooled"}
    assert table.set_index("method").loc["AL", "runs"] == 2
    pts = pd.read_csv(out / "points.csv")
    assert set(pts.method) >= {"AL", "AL (training only)", "md_pooled", "metadynamics", "opes"}
    assert pts[pts.method == "AL"].run.nunique() == 2
    assert pts[pts.method == "opes"].evaluations.min() > 500  # the minimisation counts
    assert (out / "curves.png").stat().st_size > 0 and (out / "speedup.md").exists()
    # the shipped reference scored the points: MD's 36 x 36 KLD against it is finite, > 0
    assert np.isfinite(pts[pts.method == "md_pooled"].kld_std36).all()
    # a threshold the reference cannot resolve is refused, naming the floor
    assert (
        main(
            [
                "baseline",
                "speedup",
                "--campaign",
                str(summary),
                "--target",
                "kld_std36<=0.0005",
                "--out-dir",
                str(out),
            ]
        )
        == 2
    )


def test_campaign_speedup_step_against_shipped_style_points(tmp_path):
    """Rule speedup: a campaign summary against a points table's baseline methods only."""
    from cgflow.stages.report import speedup

    summary = two_iteration_summary(tmp_path, metric_dF_phi_pos_err_kT=[1.0, 0.1])
    base = tmp_path / "points.csv"
    pd.DataFrame(
        [
            {"method": "campaign", "run": "0", "evaluations": 10.0, "kld_std36": 1e-4},  # ignored
            {"method": "metadynamics", "run": "1", "evaluations": 1e5, "kld_std36": 0.5},
            {"method": "metadynamics", "run": "1", "evaluations": 1e7, "kld_std36": 0.01},
            {"method": "metadynamics", "run": "1", "evaluations": 2e7, "kld_std36": 0.005},
        ]
    ).to_csv(base, index=False)
    table = speedup(summary, base, tmp_path / "s.csv", tmp_path / "s.md")
    t = table.set_index(["target", "method"])
    # crossed at its last iteration only: not reached (two points needed), no ratio
    assert t.loc[("kld_std36<=0.02", "campaign"), "status"] == "not reached"
    assert math.isnan(t.loc[("kld_std36<=0.02", "metadynamics"), "ratio_to_campaign"])
    assert "| kld_std36<=0.02 | metadynamics |" in (tmp_path / "s.md").read_text()
    three = tmp_path / "three"
    three.mkdir()
    summary3 = two_iteration_summary(three, N=[1e5, 1e6], metric_kld_std36=[0.005, 0.004])
    table = speedup(summary3, base, tmp_path / "s.csv", tmp_path / "s.md")
    t = table.set_index(["target", "method"])
    assert t.loc[("kld_std36<=0.01", "campaign"), "status"] == "reached"
    assert t.loc[("kld_std36<=0.01", "metadynamics"), "ratio_to_campaign"] > 1
    with pytest.raises(ValueError, match="evaluations"):
        bl.campaign_speedup(summary, pd.DataFrame({"method": ["md_single"]}))


def test_readme_states_the_shipped_table_one_sentence_per_target():
    """README's sentence per target is the one the shipped speedup table gives."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    table = pd.read_csv(root / "data/baselines/speedup/speedup.csv")
    readme = (root / "README.md").read_text()
    sentences = bl.target_sentences(table)
    assert len(sentences) == len(bl.DEFAULT_TARGETS)
    for s in sentences:
        assert f"* {s}" in readme
