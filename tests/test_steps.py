"""Workflow steps as functions: files, counters, shards, failure injection (Müller–Brown)."""

import json

import numpy as np
import pytest
import yaml

from cgflow import steps
from cgflow.data import read_h5

CFG = {
    "campaign": "t",
    "seed": 0,
    "system": {"name": "mueller_brown", "options": {}},
    "dtype": "float64",
    "start": {
        "n_frames": 200,
        "stride": 20,
        "n_points": 40,
        "test_fraction": 0.2,
        "cg_window": [[-2.2, -1.8]],
        "sampler": {"step_size": 0.05},
    },
    "flow": {"cond_mean": [-2.0], "cond_std": [0.3]},
    "example": {"epochs": 20, "lr": 5e-4, "batch_size": 16},
    "energy_training": {
        k: {
            "epochs": 2,
            "lr": 5e-3,
            "batch_size": 8,
            "rows_per_point": 10,
            "warmup_epochs": 0,
            "clip_early": 20,
            "clip_late": 20,
            "clip_switch_epoch": 0,
            "skip_top_k": 0,
            "old_fraction": 0.3,
        }
        for k in ("first", "later")
    },
    "backend": {"kind": "torch"},
    "labels": {"draws": 16, "clip_top_k": 0, "relabel_all": True},
    "energy": {
        "backend": "torch",
        "platform": None,
        "n_workers": 0,
        "torch_dtype": "float64",
        "shards": 2,
        "fail_shard": None,
    },
    "ensemble": {
        "n_members": 3,
        "hidden": [16, 16],
        "activation": "sigmoid",
        "init": "xavier",
        "epochs": 20,
        "lr": 1e-3,
        "batch_size": 16,
        "split": "bagging",
        "train_fraction": 0.9,
    },
    "walkers": {
        "n_walkers": 20,
        "step_size": 0.1,
        "threshold_kT": 0.01,
        "min_steps": 0,
        "max_steps": 500,
        "n_candidates": 3,
        "n_select": 2,
        "start": [-2.0],
    },
    "spreading": {"kind": "uniform", "radius": 0.5, "n_per_centre": 10, "test_fraction": 0.5},
    "max_iterations": 1,
    "stop": {"metric": None, "threshold": None},
}


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    root = tmp_path_factory.mktemp("wf")
    snap = steps.write_snapshot(CFG, root / "config.yaml")
    st = steps.Settings.load(snap)
    i0, i1 = root / "iter_000", root / "iter_001"
    steps.start(st, i0 / "start.h5")
    steps.pretrain(st, i0 / "start.h5", i0 / "flow.pt")
    steps.initial_points(st, i0 / "start.h5", i0 / "points.h5")
    steps.finetune(st, 1, i0 / "flow.pt", i0 / "points.h5", i1 / "flow.pt", i1 / "train.h5")
    for j in range(2):
        steps.sample(
            st, 1, i1 / "flow.pt", i0 / "points.h5", j, 2, i1 / "samples" / f"shard_{j}.h5"
        )
        steps.energy(st, i1 / "samples" / f"shard_{j}.h5", j, i1 / "energies" / f"shard_{j}.h5")
    shards = (
        [i1 / "samples" / f"shard_{j}.h5" for j in range(2)],
        [i1 / "energies" / f"shard_{j}.h5" for j in range(2)],
    )
    steps.gather(st, 1, i0 / "points.h5", *shards, i1 / "labels.h5")
    steps.ensemble(st, 1, i1 / "labels.h5", i1 / "ensemble.pt")
    steps.evaluate(st, 1, i1 / "ensemble.pt", i0 / "points.h5", i1 / "metrics.json", i1 / "pmf.png")
    steps.walkers(st, 1, i1 / "ensemble.pt", i0 / "points.h5", i1 / "walkers.h5")
    steps.select(st, 1, i1 / "walkers.h5", i0 / "points.h5", i1 / "points.h5")
    status = steps.check(st, 1, i1 / "walkers.h5", i1 / "metrics.json", i1 / "status.json")
    df = steps.summary(st, root, 1, root / "summary.csv", root / "convergence.png")
    return root, st, status, df


def test_files_and_provenance(campaign):
    root, st, status, _ = campaign
    start = read_h5(root / "iter_000" / "start.h5", "start")
    assert start["x"].shape == (200, 2) and start.counters["start_md"] == 1 + 200 * 20
    assert start.attrs["config_hash"] == st.hash and start.attrs["beta"] == 0.1
    pts = read_h5(root / "iter_000" / "points.h5", "points")
    assert len(pts["s"]) == 40 and set(np.unique(pts["split"])) == {0, 1}
    assert (pts["s"] >= -2.2).all() and (pts["s"] <= -1.8).all()
    labels = read_h5(root / "iter_001" / "labels.h5", "labels")
    n_train = int((pts["split"] == 0).sum())
    assert len(labels["F_kT"]) == n_train and np.isfinite(labels["F_kT"]).all()
    assert sorted(labels["point_index"]) == sorted(np.flatnonzero(pts["split"] == 0))
    new = read_h5(root / "iter_001" / "points.h5", "points")
    assert len(new["s"]) == 40 + 2 * 10 and (new["tag"][40:] == 1).all()
    assert len(json.loads(new.attrs["centres"])) == 2
    assert status == {"iteration": 1, "converged": True, "reason": "max iterations"}
    assert (root / "iter_001" / "pmf.png").stat().st_size > 1000
    metrics = json.loads((root / "iter_001" / "metrics.json").read_text())
    assert {"kld", "max_abs_dF_kT", "n_train_points"} <= set(metrics)


def test_summary_counts(campaign):
    root, _, _, df = campaign
    assert list(df["iteration"]) == [0, 1]
    row = df.iloc[1]
    train = read_h5(root / "iter_001" / "train.h5", "train")
    n_train = int((read_h5(root / "iter_000" / "points.h5", "points")["split"] == 0).sum())
    assert row["evals_training"] == train.counters["training"]
    assert row["evals_labels"] == n_train * 16
    assert (
        row["N"]
        == row["cum_evals_start_md"]
        + row["cum_evals_training"]
        + row["cum_evals_labels"]
        + row["cum_evals_minimisation"]
    )
    assert (root / "summary.csv").read_text().startswith("iteration,")
    assert (root / "convergence.png").stat().st_size > 1000


def test_sharding_does_not_change_labels(campaign, tmp_path):
    root, st, _, _ = campaign
    i0, i1 = root / "iter_000", root / "iter_001"
    steps.sample(st, 1, i1 / "flow.pt", i0 / "points.h5", 0, 1, tmp_path / "s.h5")
    steps.energy(st, tmp_path / "s.h5", 0, tmp_path / "e.h5")
    # one shard draws with another seed, so compare the counted evaluations and the point set
    steps.gather(
        st, 1, i0 / "points.h5", [tmp_path / "s.h5"], [tmp_path / "e.h5"], tmp_path / "l.h5"
    )
    one = read_h5(tmp_path / "l.h5", "labels")
    two = read_h5(i1 / "labels.h5", "labels")
    assert sorted(one["point_index"]) == sorted(two["point_index"])
    assert np.abs(np.sort(one["F_kT"]) - np.sort(two["F_kT"])).max() < 2.0
    with pytest.raises(ValueError, match="sample shards but"):
        steps.gather(st, 1, i0 / "points.h5", [tmp_path / "s.h5"], [], tmp_path / "x.h5")


def test_failure_injection_and_bad_shard(campaign, tmp_path, monkeypatch):
    root, st, _, _ = campaign
    i0, i1 = root / "iter_000", root / "iter_001"
    monkeypatch.setenv("CGFLOW_FAIL_SHARD", "1")
    with pytest.raises(RuntimeError, match="failure injected into energy shard 1"):
        steps.energy(st, i1 / "samples" / "shard_1.h5", 1, tmp_path / "e.h5")
    assert not (tmp_path / "e.h5").exists()
    with pytest.raises(ValueError, match="shard 3 is not in"):
        steps.sample(st, 1, i1 / "flow.pt", i0 / "points.h5", 3, 2, tmp_path / "s.h5")


def test_cli_snapshot_and_check(tmp_path, campaign):
    from cgflow.cli import main

    root, _, _, _ = campaign
    assert (
        main(["wf", "snapshot", "--json", json.dumps(CFG), "--out", str(tmp_path / "c.yaml")]) == 0
    )
    assert yaml.safe_load((tmp_path / "c.yaml").read_text()) == CFG
    i1 = root / "iter_001"
    rc = main(
        [
            "wf",
            "check",
            "--config",
            str(tmp_path / "c.yaml"),
            "--iteration",
            "1",
            "--walkers",
            str(i1 / "walkers.h5"),
            "--metrics",
            str(i1 / "metrics.json"),
            "--out",
            str(tmp_path / "s.json"),
        ]
    )
    assert rc == 0 and json.loads((tmp_path / "s.json").read_text())["converged"]
    assert (
        main(
            [
                "wf",
                "check",
                "--config",
                str(tmp_path / "missing.yaml"),
                "--iteration",
                "1",
                "--walkers",
                "x",
                "--metrics",
                "y",
                "--out",
                "z",
            ]
        )
        == 2
    )


def test_evaluate_alanine_dipeptide_against_the_reference(tmp_path, aldp):
    """The ALDP branch of evaluate: every reference metric and the 4-panel map."""
    import torch

    from cgflow.campaign import EnsembleConfig, fit_ensemble

    st = steps.Settings({"campaign": "t", "seed": 0, "system": {"name": "alanine_dipeptide"}})
    st._system = aldp
    gen = torch.Generator().manual_seed(0)
    s = (torch.rand(60, 2, generator=gen, dtype=torch.float64) * 2 - 1) * np.pi
    f = 2.0 * (1 - torch.cos(s[:, 0] + 2.5)) + (1 - torch.cos(s[:, 1] - 2.8))
    e = EnsembleConfig(n_members=2, hidden=(8,), epochs=5, batch_size=16)
    fit_ensemble(e, [True, True], s, f, 0).save(tmp_path / "ensemble.pt")
    n = len(s)
    split = torch.zeros(n, dtype=torch.int64)
    split[:10] = 1
    zeros = torch.zeros(n, dtype=torch.int64)
    steps._write_points(st, tmp_path / "points.h5", 0, s, split, zeros, torch.arange(n), [[1, 1]])
    m = steps.evaluate(
        st,
        1,
        tmp_path / "ensemble.pt",
        tmp_path / "points.h5",
        tmp_path / "m.json",
        tmp_path / "p.png",
    )
    for key in (
        "kld_std100",
        "kld_shifted100",
        "kld_std36",
        "kld_floor_std100",
        "dF_phi_pos_err_kT",
        "dF_phi_pos_ref_stderr_kT",
        "dF_aR_beta_kT",
        "dF_aR_beta_ref_kT",
        "rmse_F_std36_kT",
    ):
        assert np.isfinite(m[key]), key
    assert json.loads((tmp_path / "m.json").read_text()) == m
    assert (tmp_path / "p.png").stat().st_size > 20_000


def double_well(x):
    """U(x) in kT for the analytic-system test: a double well in x0, harmonic in x1."""
    return 2.0 * (x[:, 0] ** 2 - 1.0) ** 2 + 0.5 * x[:, 1] ** 2


def test_a_user_defined_analytic_system_runs_through_the_steps(tmp_path):
    """`system: {name: analytic, options: {potential: "module:function", ...}}` needs no code."""
    cfg = json.loads(json.dumps(CFG))
    cfg["system"] = {
        "name": "analytic",
        "options": {
            "potential": "test_steps:double_well",
            "dim": 2,
            "beta": 1.0,
            "cg_indices": [0],
            "cg_bounds": [[-2.0, 2.0]],
            "x0": [-1.0, 0.0],
        },
    }
    cfg["start"]["cg_window"] = None
    cfg["flow"] = {"cond_mean": [-1.0], "cond_std": [0.5]}
    cfg["walkers"]["start"] = [-1.0]
    st = steps.Settings.load(steps.write_snapshot(cfg, tmp_path / "config.yaml"))
    assert st.system.name == "analytic"
    i0, i1 = tmp_path / "iter_000", tmp_path / "iter_001"
    steps.start(st, i0 / "start.h5")
    steps.pretrain(st, i0 / "start.h5", i0 / "flow.pt")
    steps.initial_points(st, i0 / "start.h5", i0 / "points.h5")
    steps.finetune(st, 1, i0 / "flow.pt", i0 / "points.h5", i1 / "flow.pt", i1 / "train.h5")
    steps.sample(st, 1, i1 / "flow.pt", i0 / "points.h5", 0, 1, i1 / "s.h5")
    steps.energy(st, i1 / "s.h5", 0, i1 / "e.h5")
    steps.gather(st, 1, i0 / "points.h5", [i1 / "s.h5"], [i1 / "e.h5"], i1 / "labels.h5")
    labels = read_h5(i1 / "labels.h5", "labels")
    # exact: F(s) = 2 (s² − 1)² + const (the harmonic x1 integrates to a constant)
    s, f = labels["s"][:, 0], labels["F_kT"]
    exact = 2.0 * (s**2 - 1.0) ** 2
    assert np.std(f - exact) < 0.3
    steps.ensemble(st, 1, i1 / "labels.h5", i1 / "ensemble.pt")
    steps.evaluate(st, 1, i1 / "ensemble.pt", i0 / "points.h5", i1 / "metrics.json", i1 / "pmf.png")
    assert (i1 / "pmf.png").stat().st_size > 0


def test_grid_mode_trains_on_a_fixed_grid_without_walkers(tmp_path):
    """`mode: grid` (method-spec 7.1): grid points from iteration 1 on, every iteration trains
    on all of them, no walkers, no points added, the run continues to max_iterations."""
    cfg = json.loads(json.dumps(CFG))
    cfg.update(mode="grid", grid={"per_axis": 12}, max_iterations=2)
    st = steps.Settings.load(steps.write_snapshot(cfg, tmp_path / "config.yaml"))
    assert st.grid_mode
    i0 = tmp_path / "iter_000"
    steps.start(st, i0 / "start.h5")
    steps.pretrain(st, i0 / "start.h5", i0 / "flow.pt")
    steps.initial_points(st, i0 / "start.h5", i0 / "points.h5")
    p0 = read_h5(i0 / "points.h5", "points")
    lo, hi = -2.5, 1.1  # Müller–Brown CG bounds
    expected = lo + (np.arange(12) + 0.5) * (hi - lo) / 12
    np.testing.assert_allclose(np.sort(p0["s"][:, 0]), expected)
    n_train = int((p0["split"] == 0).sum())
    assert 0 < n_train < 12
    prev, flow = i0, i0 / "flow.pt"
    for k in (1, 2):
        it = tmp_path / f"iter_{k:03d}"
        steps.finetune(st, k, flow, prev / "points.h5", it / "flow.pt", it / "train.h5")
        train = read_h5(it / "train.h5", "train")
        assert (train.attrs["n_latest"], train.attrs["n_older"]) == (n_train, 0)
        steps.sample(st, k, it / "flow.pt", prev / "points.h5", 0, 1, it / "s.h5")
        steps.energy(st, it / "s.h5", 0, it / "e.h5")
        steps.gather(st, k, prev / "points.h5", [it / "s.h5"], [it / "e.h5"], it / "labels.h5")
        assert len(read_h5(it / "labels.h5", "labels")["F_kT"]) == n_train  # whole grid relabelled
        steps.ensemble(st, k, it / "labels.h5", it / "ensemble.pt")
        steps.evaluate(
            st, k, it / "ensemble.pt", prev / "points.h5", it / "metrics.json", it / "p.png"
        )
        steps.walkers(st, k, it / "ensemble.pt", prev / "points.h5", it / "walkers.h5")
        w = read_h5(it / "walkers.h5", "walkers")
        assert len(w["points"]) == 0 and w.attrs["grid_mode"] and not w.attrs["exhausted"]
        steps.select(st, k, it / "walkers.h5", prev / "points.h5", it / "points.h5")
        np.testing.assert_array_equal(read_h5(it / "points.h5", "points")["s"], p0["s"])
        status = steps.check(st, k, it / "walkers.h5", it / "metrics.json", it / "status.json")
        assert status["reason"] == ("continue" if k == 1 else "max iterations")
        prev, flow = it, it / "flow.pt"
