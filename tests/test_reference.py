"""Ground-truth generation: chunks, resume, merge, statistics, torch-only operation."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cgflow.data import DataFormatError, read_h5
from cgflow.metrics import GRIDS
from cgflow.reference import (
    ALDP_REFERENCE,
    ChunkSettings,
    chunk_seed,
    effective_sample_size,
    integrated_autocorrelation_time,
    kld_noise_floor,
    load_reference,
    merge_chunks,
    run_chunk,
)

ENGINE = Path(__file__).parents[1] / "data" / "reference" / "aldp" / "engine.pt"
TINY = ChunkSettings(
    temperatures_K=(300.0, 400.0, 550.0),
    n_ladders=4,
    steps=400,
    timestep_fs=1.5,
    hydrogen_mass_amu=3.0,
    exchange_every=50,
    sample_every=10,
    series_every=50,
    equilibration_steps=100,
    seed=5,
)


@pytest.fixture(scope="module")
def chunks(tmp_path_factory):
    d = tmp_path_factory.mktemp("gt")
    paths = [d / f"chunk_{k}.h5" for k in range(3)]
    for k, p in enumerate(paths):
        run_chunk(ENGINE, p, k, paths[k - 1] if k else None, TINY, command="test")
    return paths


def test_chunk_contents(chunks):
    d = read_h5(chunks[0], "histogram")
    assert d["counts_std100"].shape == (4, 100, 100)
    assert d["counts_shifted100"].shape == (4, 100, 100)
    assert d["counts_std36"].shape == (4, 36, 36)
    assert d["counts_fine360"].shape == (360, 360)
    assert d["counts_std100"].sum(axis=(1, 2)).tolist() == [40] * 4  # 400 steps / 10 per ladder
    assert d["counts_fine360"].sum() == 160
    assert d["series_phi_psi"].shape == (4, 8, 2)
    assert d.units["series_phi_psi"] == "rad" and d.units["final_x_nm"] == "nm"
    assert d["ladder_start_basin"].tolist() == [0, 0, 1, 1]
    settings = json.loads(d.attrs["settings"])
    assert settings["timestep_fs"] == 1.5 and settings["seed"] == 5
    assert d.attrs["command"] == "test" and d.attrs["total_steps"] == 400
    assert d["masses_amu"][d["masses_amu"] < 3.5].min() == pytest.approx(3.0)  # HMR recorded
    # the same histogram on the shifted grid is a permutation of the same samples
    assert d["counts_shifted100"].sum() == d["counts_std100"].sum()


def test_chunks_are_reproducible_and_resume(chunks, tmp_path):
    again = run_chunk(ENGINE, tmp_path / "c1.h5", 1, chunks[0], TINY, command="test")
    a, b = read_h5(again, "histogram"), read_h5(chunks[1], "histogram")
    np.testing.assert_array_equal(a["counts_std100"], b["counts_std100"])
    np.testing.assert_array_equal(a["final_x_nm"], b["final_x_nm"])
    assert b.attrs["total_steps"] == 800
    assert chunk_seed(5, 1) != chunk_seed(5, 2)
    with pytest.raises(ValueError, match="is chunk 0, expected 1"):
        run_chunk(ENGINE, tmp_path / "x.h5", 2, chunks[0], TINY)
    with pytest.raises(ValueError, match="needs the previous chunk"):
        run_chunk(ENGINE, tmp_path / "x.h5", 1, None, TINY)
    other = ChunkSettings(**{**TINY.__dict__, "timestep_fs": 1.0})
    with pytest.raises(ValueError, match="'timestep_fs' differs"):
        run_chunk(ENGINE, tmp_path / "x.h5", 1, chunks[0], other)
    with pytest.raises(ValueError, match="first temperature"):
        ChunkSettings(temperatures_K=(310.0, 400.0)).validate()
    assert not (tmp_path / "x.h5").exists()


def test_merge(chunks, tmp_path):
    ref = load_reference(merge_chunks(chunks, tmp_path / "ref.h5", discard=1))
    summary = json.loads(ref.attrs["summary"])
    assert summary["chunks"] == 2 and summary["discarded_chunks"] == 1
    assert ref["counts_std100"].sum() == 2 * 160
    assert ref["ladder_counts_std36"].shape == (4, 36, 36)
    assert ref["series_phi_psi"].shape == (4, 16, 2)
    assert set(summary["kld_noise_floor"]) == {"std100", "shifted100", "std36"}
    assert 0 <= summary["phi_positive_population"] <= 1
    with pytest.raises(ValueError, match="without gaps"):
        merge_chunks([chunks[0], chunks[2]], tmp_path / "bad.h5")
    with pytest.raises(ValueError, match="cannot discard"):
        merge_chunks(chunks, tmp_path / "bad.h5", discard=3)
    with pytest.raises(DataFormatError, match="expected a 'histogram' file"):
        merge_chunks([tmp_path / "ref.h5"], tmp_path / "bad.h5")


def test_generator_runs_without_openmm(tmp_path):
    """A chunk only needs torch once the engine file exists (GPU nodes without OpenMM)."""
    code = (
        "import sys; sys.modules['openmm'] = None; sys.modules['openmmtools'] = None\n"
        "from cgflow.cli import main\n"
        f"sys.exit(main(['reference', 'chunk', '--engine', r'{ENGINE}', '--index', '0', '--out', r'{tmp_path / 'c.h5'}',"
        " '--n-ladders', '2', '--steps', '100', '--temperatures-K', '300', '450', '--equilibration-steps', '0',"
        " '--series-every', '50']))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert read_h5(tmp_path / "c.h5", "histogram")["counts_std36"].sum() == 20


def test_autocorrelation_time_of_ar1():
    rng = np.random.default_rng(0)
    rho, n = 0.8, 20000
    x = np.zeros((8, n))
    for t in range(1, n):
        x[:, t] = rho * x[:, t - 1] + rng.normal(size=8)
    tau = integrated_autocorrelation_time(x)
    assert tau == pytest.approx((1 + rho) / (1 - rho), rel=0.1)
    ess = effective_sample_size(np.stack([x, x], axis=-1))
    assert ess["min"] <= ess["sin_phi"]


def test_kld_noise_floor_matches_simulation():
    """The estimate from G independent groups equals the simulated E[KL(P̂||P)]."""
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(200) * 0.5)
    g, n = 16, 2000
    counts = np.stack([rng.multinomial(n, p) for _ in range(g)])
    pooled = counts.sum(0) / counts.sum()
    m = pooled > 0
    estimate = kld_noise_floor(counts)
    kls = []
    for _ in range(200):
        c = rng.multinomial(g * n, p) / (g * n)
        mm = c > 0
        kls.append(np.sum(c[mm] * np.log(c[mm] / p[mm])))
    assert estimate == pytest.approx(np.mean(kls), rel=0.25)
    assert m.any()


@pytest.mark.skipif(not ALDP_REFERENCE.exists(), reason="no shipped reference yet")
def test_shipped_reference_is_consistent():
    ref = load_reference()
    s = json.loads(ref.attrs["summary"])
    counts = ref["counts_std100"]
    assert counts.sum() == s["samples_300K"]
    for name in ("std100", "shifted100", "std36", "fine360"):
        assert ref[f"counts_{name}"].sum() == counts.sum()
        assert ref[f"counts_{name}"].shape == (GRIDS[name].bins,) * 2
    assert 0 < s["phi_positive_population"] < 0.2
    assert all(0.2 < a < 0.95 for a in ref["exchange_acceptance"])
    # chains started in β and in αL agree on the φ > 0 population within error
    # each half (16 ladders) has twice the variance of the mean over all 32, so the difference
    # of the two halves has standard error sqrt(2 + 2) * se
    se_diff = 2 * s["phi_positive_stderr"]
    assert (
        abs(s["phi_positive_from_beta_starts"] - s["phi_positive_from_alphaL_starts"]) < 3 * se_diff
    )


def test_alpha_l_start_keeps_l_chirality(aldp):
    """Setting φ/ψ by turning the caps keeps C-alpha's chirality (the internal-coordinate route
    would carry HA and CB along and make D-alanine)."""
    import torch

    from cgflow.reference import ALDP_PHI_SIDE, alpha_l_start, load_engine, phi_psi, set_dihedral

    x0, _ = aldp.initial_configuration()
    y = set_dihedral(x0, (4, 6, 8, 14), 1.0, ALDP_PHI_SIDE)
    ang = phi_psi(torch.as_tensor(y[None]))[0]
    assert float(ang[0]) == pytest.approx(1.0, abs=1e-6)
    assert float(ang[1]) == pytest.approx(float(phi_psi(torch.as_tensor(x0[None]))[0, 1]), abs=1e-9)
    x, n = alpha_l_start(aldp)
    phi, _psi = phi_psi(torch.as_tensor(x[None]))[0].tolist()
    assert 0 < phi < 2.2 and n > 0
    assert bool(aldp.is_l(torch.as_tensor(x[None])).all())
    blob = load_engine(ENGINE)
    starts = torch.stack([blob["x_beta_nm"], blob["x_alpha_l_nm"]])
    assert bool(aldp.is_l(starts).all())


def test_plain_md_mode_starts_every_chain_at_the_minimum(tmp_path):
    """One temperature and start="minimum": independent 300 K trajectories (the MD baseline)."""
    s = ChunkSettings(
        temperatures_K=(300.0,),
        n_ladders=3,
        steps=200,
        timestep_fs=1.5,
        exchange_every=50,
        sample_every=10,
        series_every=10,
        equilibration_steps=0,
        seed=1,
        start="minimum",
    )
    out = run_chunk(ENGINE, tmp_path / "md.h5", 0, None, s, command="test")
    d = read_h5(out, "histogram")
    assert d["ladder_start_basin"].tolist() == [0, 0, 0]
    assert int(np.asarray(d["exchange_attempts"]).sum()) == 0
    series = d["series_phi_psi"]
    assert series.shape == (3, 20, 2)
    # every chain starts from the β minimum (φ ≈ −2.5 rad): no αL excursion within 300 fs
    assert np.all(series[:, 0, 0] < -1.5)
    with pytest.raises(ValueError, match="start must be"):
        run_chunk(ENGINE, tmp_path / "x.h5", 0, None, ChunkSettings(start="middle"))
    resumed = run_chunk(ENGINE, tmp_path / "md1.h5", 1, out, s, command="test")
    assert read_h5(resumed, "histogram")["ladder_start_basin"].tolist() == [0, 0, 0]


def test_paper_config_stops_at_three_times_the_noise_floor():
    """config/aldp_paper.yaml's KLD stop threshold is >= 3x the shipped reference's floor."""
    import yaml

    cfg = yaml.safe_load((Path(__file__).parents[1] / "config" / "aldp_paper.yaml").read_text())
    metric = cfg["stop"]["metric"]
    floors = json.loads(load_reference().attrs["summary"])["kld_noise_floor"]
    floor = floors[metric.removeprefix("kld_")]
    assert cfg["stop"]["threshold"] >= 3 * floor
    assert cfg["stop"]["threshold"] <= 5 * floor  # not needlessly loose either
