"""Baselines: metadynamics runs and their free energy, MD curves, the speedup table."""

import json
import math

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
    with pytest.raises(ValueError, match="not a metadynamics run file"):
        bl.metadynamics_points(tmp_path / "other.h5", {})


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
    n, mean, _ = bl.mean_curve(pts, "md_single", "kld_std36")
    assert n[-1] == 40_000 and mean[-1] < 0.1 * mean[0]
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


# ------------------------------------------------------------------------------ the table
def test_evaluations_to_reach_measured_extrapolated_and_bound():
    n = np.array([1e3, 1e4, 1e5, 1e6])
    y = 10.0 * n**-0.5  # 0.316, 0.1, 0.0316, 0.01
    r = bl.evaluations_to_reach(n, y, 0.05)
    assert r["status"] == "measured" and r["evaluations"] == pytest.approx(4e4, rel=1e-9)
    r = bl.evaluations_to_reach(n, y, 0.005)
    assert r["status"] == "extrapolated" and r["evaluations"] == pytest.approx(4e6, rel=1e-6)
    assert "n^-0.50" in r["note"]
    # beyond 30x the run: not reported as a number
    r = bl.evaluations_to_reach(n, y, 0.001)
    assert r["status"] == "lower bound" and "within 30x" in r["note"]
    # a curve that dipped below and came back up: a fit crossing inside the run is no answer
    r = bl.evaluations_to_reach(
        np.geomspace(1e4, 2e6, 5), np.array([1, 0.3, 0.05, 0.08, 0.12]), 0.1
    )
    assert r["status"] == "lower bound" and r["evaluations"] == 2e6
    # already below at the first point: an upper bound
    assert bl.evaluations_to_reach(n, y, 0.5)["status"] == "at most"
    flat = np.full(4, 0.2)
    assert bl.evaluations_to_reach(n, flat, 0.1)["status"] == "lower bound"
    r = bl.evaluations_to_reach(n, y, 0.005, extrapolate=False)
    assert r["status"] == "lower bound" and r["evaluations"] == 1e6
    # dipping below and coming back up does not count; staying below from 1e5 on does
    noisy = np.array([0.5, 0.05, 0.5, 0.05])
    r = bl.evaluations_to_reach(n, noisy, 0.1)
    assert r["status"] == "measured" and 1e5 < r["evaluations"] < 1e6
    assert (
        bl.evaluations_to_reach(n, np.array([0.05, 0.05, 0.05, 0.5]), 0.1)["status"] != "measured"
    )


def test_speedup_table_ratios_and_quoted_rows():
    rows = []
    for n, k in [(1e4, 1.0), (1e5, 0.1), (1e6, 0.01)]:
        rows.append(
            {
                "method": "campaign",
                "run": "0",
                "evaluations": n,
                "kld_std36": k,
                "dF_phi_pos_err_kT": -k,
            }
        )
        rows.append(
            {
                "method": "md_pooled",
                "run": "all",
                "evaluations": 10 * n,
                "kld_std36": k,
                "dF_phi_pos_err_kT": math.inf,
            }
        )
    table = bl.speedup_table(pd.DataFrame(rows), ["kld_std36<=0.1", "dF_phi_pos_err_kT<=0.05"])
    t = table.set_index(["target", "method"])
    assert t.loc[("kld_std36<=0.1", "campaign"), "evaluations"] == pytest.approx(1e5)
    assert t.loc[("kld_std36<=0.1", "md_pooled"), "ratio_to_campaign"] == pytest.approx(10.0)
    md_df = t.loc[("dF_phi_pos_err_kT<=0.05", "md_pooled")]
    assert md_df.status == "lower bound" and "lower bound" in md_df.note
    assert (table.status == "quoted").sum() == 2
    assert "| kld_std36<=0.1 | md_pooled | 1.00e+06 | measured | 10.00 |" in bl.markdown_table(
        table
    )
    with pytest.raises(ValueError, match="metric<=threshold"):
        bl.parse_target("kld_std36 0.1")
    with pytest.raises(ValueError, match="not one of"):
        bl.parse_target("kld_std50<=0.1")
    with pytest.raises(ValueError, match="must be > 0"):
        bl.parse_target("kld_std36<=0")
    with pytest.raises(ValueError, match="no points"):
        bl.speedup_table(pd.DataFrame(), ["kld_std36<=0.1"])


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
    out = tmp_path / "speedup"
    rc = main(
        [
            "baseline",
            "speedup",
            "--campaign",
            f"AL={summary}",
            "--md",
            str(md),
            "--metad",
            str(run),
            "--target",
            "kld_std36<=0.05",
            "--out-dir",
            str(out),
        ]
    )
    assert rc == 0
    table = pd.read_csv(out / "speedup.csv")
    assert set(table.method) >= {"AL", "md_single", "md_pooled", "metadynamics"}
    pts = pd.read_csv(out / "points.csv")
    assert set(pts.method) >= {"AL", "AL (training only)", "md_pooled", "metadynamics"}
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
        ]
    ).to_csv(base, index=False)
    table = speedup(summary, base, tmp_path / "s.csv", tmp_path / "s.md")
    t = table.set_index(["target", "method"])
    assert t.loc[("kld_std36<=0.05", "campaign"), "status"] == "measured"
    assert 1e5 < t.loc[("kld_std36<=0.05", "campaign"), "evaluations"] < 1e6
    assert t.loc[("kld_std36<=0.05", "metadynamics"), "ratio_to_campaign"] > 1
    assert "| kld_std36<=0.05 | metadynamics |" in (tmp_path / "s.md").read_text()
    with pytest.raises(ValueError, match="evaluations"):
        bl.campaign_speedup(summary, pd.DataFrame({"method": ["md_single"]}))
