"""The stage functions (one per workflow rule): files, counters, shards, settings, metrics."""

import json

import numpy as np
import pytest
import torch
import yaml

from cgflow.config import (
    allocates_draws,
    needs_previous_labels,
    prioritizes_training,
    trains_with_ensemble,
    write_snapshot,
)
from cgflow.data import read_h5
from cgflow.free_energy import FreeEnergyEnsemble
from cgflow.stages import ensemble, evaluate, labels, report, select, start, train
from cgflow.stages.settings import Settings
from cgflow.stages.status import check as check_status

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


def run_iteration_zero(st, root):
    i0 = root / "iter_000"
    start.start(st, i0 / "start.h5")
    start.pretrain(st, i0 / "start.h5", i0 / "flow.pt")
    start.initial_points(st, i0 / "start.h5", i0 / "points.h5")
    return i0


def run_iteration(st, root, k, n_shards=1, max_iterations=1):
    """Iteration k through the stage functions, as the workflow's rules call them."""
    prev, it = root / f"iter_{k - 1:03d}", root / f"iter_{k:03d}"
    i0 = root / "iter_000"
    focus = prev / "ensemble.pt" if trains_with_ensemble(st.cfg, k) else None
    prio = prev / "labels.h5" if prioritizes_training(st.cfg, k) else None
    train.finetune(
        st, k, prev / "flow.pt", prev / "points.h5", it / "flow.pt", it / "train.h5", focus, prio
    )
    samples = [it / "samples" / f"shard_{j}.h5" for j in range(n_shards)]
    energies = [it / "energies" / f"shard_{j}.h5" for j in range(n_shards)]
    alloc = (
        (prev / "ensemble.pt", prev / "labels.h5") if allocates_draws(st.cfg, k) else (None, None)
    )
    for j in range(n_shards):
        labels.sample(st, k, it / "flow.pt", prev / "points.h5", j, n_shards, samples[j], *alloc)
        labels.energy(st, samples[j], j, energies[j])
    previous = prev / "labels.h5" if needs_previous_labels(st.cfg, k) else None
    labels.gather(st, k, prev / "points.h5", samples, energies, it / "labels.h5", previous)
    ensemble.ensemble(st, k, it / "labels.h5", it / "ensemble.pt")
    evaluate.evaluate(
        st,
        k,
        it / "ensemble.pt",
        prev / "points.h5",
        it / "labels.h5",
        it / "metrics.json",
        it / "pmf.png",
    )
    select.walkers(
        st, k, it / "ensemble.pt", prev / "points.h5", i0 / "start.h5", it / "walkers.h5"
    )
    select.select(st, k, it / "walkers.h5", prev / "points.h5", it / "points.h5")
    return check_status(
        k, it / "walkers.h5", it / "metrics.json", it / "status.json", max_iterations
    )


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    root = tmp_path_factory.mktemp("wf")
    st = Settings.load(write_snapshot(CFG, root / "config.yaml"))
    i0 = run_iteration_zero(st, root)
    status = run_iteration(st, root, 1, n_shards=2)
    i1 = root / "iter_001"
    df = report.summary(
        st,
        i0 / "start.h5",
        [i0 / "points.h5", i1 / "points.h5"],
        [i1 / "train.h5"],
        sorted((i1 / "energies").glob("*.h5")),
        [i1 / "metrics.json"],
        [i1 / "status.json"],
        root / "summary.csv",
        root / "convergence.png",
    )
    return root, st, status, df


def test_files_and_provenance(campaign):
    root, st, status, _ = campaign
    start_h5 = read_h5(root / "iter_000" / "start.h5", "start")
    assert start_h5["x"].shape == (200, 2) and start_h5.counters["start_md"] == 1 + 200 * 20
    assert start_h5.attrs["config_hash"] == st.hash and start_h5.attrs["beta"] == 0.1
    np.testing.assert_allclose(start_h5["x_min"], [-0.558, 1.442])  # Müller–Brown's x0
    pts = read_h5(root / "iter_000" / "points.h5", "points")
    assert len(pts["s"]) == 40 and set(np.unique(pts["split"])) == {0, 1}
    assert (pts["s"] >= -2.2).all() and (pts["s"] <= -1.8).all()
    lab = read_h5(root / "iter_001" / "labels.h5", "labels")
    # every point is labelled, the held-out ones too (flagged)
    assert sorted(lab["point_index"]) == list(range(40)) and np.isfinite(lab["F_kT"]).all()
    np.testing.assert_array_equal(lab["split"], pts["split"][lab["point_index"]])
    new = read_h5(root / "iter_001" / "points.h5", "points")
    assert len(new["s"]) == 40 + 2 * 10 and (new["tag"][40:] == 1).all()
    assert (new["split"][40:] == 1).sum() == 10  # test_fraction 0.5, point by point
    assert len(json.loads(new.attrs["centres"])) == 2
    assert status == {"iteration": 1, "converged": True, "reason": "max iterations"}
    assert (root / "iter_001" / "pmf.png").stat().st_size > 1000
    metrics = json.loads((root / "iter_001" / "metrics.json").read_text())
    assert {"kld", "max_abs_dF_kT", "n_train_points", "label_ess_median"} <= set(metrics)
    assert metrics["n_heldout_labels"] > 0 and np.isfinite(metrics["heldout_rmse_kT"])


def test_summary_counts(campaign):
    root, _, _, df = campaign
    assert list(df["iteration"]) == [0, 1]
    row = df.iloc[1]
    tr = read_h5(root / "iter_001" / "train.h5", "train")
    assert row["evals_training"] == tr.counters["training"]
    assert row["evals_labels"] == 40 * 16  # every point, 16 draws
    assert row["N"] == sum(
        row[f"cum_evals_{k}"] for k in ("start_md", "minimisation", "training", "labels")
    )
    assert (root / "summary.csv").read_text().startswith("iteration,")
    assert (root / "convergence.png").stat().st_size > 1000


def test_summary_reads_only_the_files_it_is_given(campaign, tmp_path):
    root, st, _, df = campaign
    i0, i1 = root / "iter_000", root / "iter_001"
    one = report.summary(
        st,
        i0 / "start.h5",
        [i0 / "points.h5", i1 / "points.h5"],
        [i1 / "train.h5"],
        [i1 / "energies" / "shard_0.h5"],
        [i1 / "metrics.json"],
        [i1 / "status.json"],
        tmp_path / "s.csv",
    )
    shard1 = read_h5(i1 / "energies" / "shard_1.h5", "energies").counters["labels"]
    assert int(one["N"].iloc[1]) == int(df["N"].iloc[1]) - shard1
    with pytest.raises(ValueError, match="needs 2 points files"):
        report.summary(
            st,
            i0 / "start.h5",
            [i0 / "points.h5"],
            [i1 / "train.h5"],
            [],
            [i1 / "metrics.json"],
            [i1 / "status.json"],
            tmp_path / "x.csv",
        )


def test_sharding_does_not_change_labels(campaign, tmp_path):
    root, st, _, _ = campaign
    i0, i1 = root / "iter_000", root / "iter_001"
    labels.sample(st, 1, i1 / "flow.pt", i0 / "points.h5", 0, 1, tmp_path / "s.h5")
    labels.energy(st, tmp_path / "s.h5", 0, tmp_path / "e.h5")
    # one shard draws with another seed, so compare the counted evaluations and the point set
    labels.gather(
        st, 1, i0 / "points.h5", [tmp_path / "s.h5"], [tmp_path / "e.h5"], tmp_path / "l.h5"
    )
    one = read_h5(tmp_path / "l.h5", "labels")
    two = read_h5(i1 / "labels.h5", "labels")
    assert sorted(one["point_index"]) == sorted(two["point_index"])
    assert np.abs(np.sort(one["F_kT"]) - np.sort(two["F_kT"])).max() < 2.0
    with pytest.raises(ValueError, match="sample shards but"):
        labels.gather(st, 1, i0 / "points.h5", [tmp_path / "s.h5"], [], tmp_path / "x.h5")
    with pytest.raises(ValueError, match="previous labels file must not be given"):
        labels.gather(st, 1, i0 / "points.h5", [], [], tmp_path / "x.h5", i1 / "labels.h5")


def test_bad_shard_is_refused_by_name(campaign, tmp_path):
    root, st, _, _ = campaign
    i0, i1 = root / "iter_000", root / "iter_001"
    with pytest.raises(ValueError, match="shard 3 is not in"):
        labels.sample(st, 1, i1 / "flow.pt", i0 / "points.h5", 3, 2, tmp_path / "s.h5")
    with pytest.raises(ValueError, match="holds shard 1, not shard 0"):
        labels.energy(st, i1 / "samples" / "shard_1.h5", 0, tmp_path / "e.h5")
    assert not (tmp_path / "e.h5").exists()


def test_cli_snapshot_and_check(tmp_path, campaign):
    from cgflow.cli import main

    root, _, _, _ = campaign
    assert (
        main(["wf", "snapshot", "--json", json.dumps(CFG), "--out", str(tmp_path / "c.yaml")]) == 0
    )
    snap = yaml.safe_load((tmp_path / "c.yaml").read_text())
    # the snapshot is the validated config (defaults filled in) without stop and post keys
    assert snap["system"] == CFG["system"] and snap["evaluation"]["bins"] == 100
    assert "max_iterations" not in snap and "backmap" not in snap
    i1 = root / "iter_001"
    check = ["wf", "check", "--iteration", "1", "--max-iterations", "1"]
    paths = ["--walkers", str(i1 / "walkers.h5"), "--metrics", str(i1 / "metrics.json")]
    assert main([*check, *paths, "--out", str(tmp_path / "s.json")]) == 0
    assert json.loads((tmp_path / "s.json").read_text())["converged"]
    missing = ["--walkers", "x", "--metrics", "y", "--out", str(tmp_path / "z.json")]
    assert main([*check, *missing]) == 2
    assert main(["wf", "start", "--config", str(tmp_path / "missing.yaml"), "--out", "x"]) == 2


def test_run_step_writes_the_step_output_to_its_log_and_raises_on_failure(
    tmp_path, campaign, capsys
):
    """`cgflow.cli.run_step` (the workflow's in-process rules): the step's printed output goes
    to the log, with a start-up of 0 s; another thread printing at the same time keeps its
    own stream; a failing step raises StepError naming the log, which says why."""
    import threading

    from cgflow.cli import StepError, run_step

    root, _, _, _ = campaign
    i1 = root / "iter_001"
    check = ["wf", "check", "--iteration", "1", "--max-iterations", "1"]
    paths = ["--walkers", i1 / "walkers.h5", "--metrics", i1 / "metrics.json"]
    log = tmp_path / "check.log"
    outside = threading.Thread(target=lambda: print("printed outside the step"))
    outside.start()
    run_step([*check, *paths, "--out", tmp_path / "s.json"], log)
    outside.join()
    assert json.loads((tmp_path / "s.json").read_text())["converged"]
    lines = log.read_text().strip().splitlines()
    assert lines[-1].startswith("cgflow step seconds:") and '"converged": true' in lines[0]
    assert json.loads(lines[-1].split(":", 1)[1])["startup_s"] == 0.0
    printed = capsys.readouterr().out
    assert "printed outside the step" in printed and "cgflow step seconds" not in printed
    bad = tmp_path / "bad.log"
    missing = ["--walkers", "x", "--metrics", "y", "--out", tmp_path / "z.json"]
    with pytest.raises(StepError, match=r"bad\.log"):
        run_step([*check, *missing], bad)
    assert "error" in bad.read_text()
    with pytest.raises(StepError, match="status 2"):  # an argparse error
        run_step(["wf", "check", "--no-such-option"], tmp_path / "parse.log")
    assert "arguments are required" in (tmp_path / "parse.log").read_text()
    print("after the steps")
    assert "after the steps" in capsys.readouterr().out


def test_cheap_steps_do_not_import_torch(tmp_path, campaign):
    """`wf check`, `wf snapshot` and the parser of every step run without torch; each step prints
    its timing line last."""
    import subprocess
    import sys

    root, _, _, _ = campaign
    i1 = root / "iter_001"
    code = (
        "import sys\n"
        "from cgflow.cli import main, build_parser\n"
        "build_parser(['wf'])\n"
        f"assert main(['wf', 'snapshot', '--json', {json.dumps(json.dumps(CFG))}, "
        f"'--out', {str(tmp_path / 'c.yaml')!r}]) == 0\n"
        "assert main(['wf', 'check', '--iteration', '1', '--max-iterations', '1', "
        f"'--walkers', {str(i1 / 'walkers.h5')!r}, '--metrics', {str(i1 / 'metrics.json')!r}, "
        f"'--out', {str(tmp_path / 's.json')!r}]) == 0\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    last = res.stdout.strip().splitlines()[-1]
    assert last.startswith("cgflow step seconds:")
    timing = json.loads(last.split(":", 1)[1])
    assert timing["step"] == "check" and timing["compute_s"] >= 0.0
    assert json.loads((tmp_path / "s.json").read_text())["converged"]


def test_bad_config_names_the_key(tmp_path):
    bad = json.loads(json.dumps(CFG))
    bad["ensemble"]["epochs"] = 0
    with pytest.raises(ValueError, match="epochs"):
        write_snapshot(bad, tmp_path / "c.yaml")
    bad = {**CFG, "fail_shard": 1}
    with pytest.raises(ValueError, match="fail_shard"):
        Settings(bad)
    assert not (tmp_path / "c.yaml").exists()


def test_validated_configs_are_fresh_copies_and_a_bad_one_fails_every_time():
    from cgflow.config import validated

    first = validated(CFG)
    first["ensemble"]["epochs"] = -5  # a caller changing its copy changes nothing else
    second = validated(CFG)
    assert second["ensemble"]["epochs"] == CFG["ensemble"]["epochs"] > 0
    assert second["walkers"] is not first["walkers"]
    bad = json.loads(json.dumps(CFG))
    bad["ensemble"]["epochs"] = 0
    for _ in range(2):
        with pytest.raises(ValueError, match="epochs"):
            validated(bad)


def test_settings_dataclasses_have_no_defaults_of_their_own():
    """The schema is the one source of defaults: a settings dataclass restates none."""
    import dataclasses

    from cgflow.training import EnergyConfig, ExampleConfig

    for cls in (EnergyConfig, ExampleConfig):
        for f in dataclasses.fields(cls):
            assert f.default is dataclasses.MISSING, (cls.__name__, f.name)
            assert f.default_factory is dataclasses.MISSING, (cls.__name__, f.name)
    # and every schema key of their sections is a field (the stages pass the sections whole)
    from conftest import schema_defaults

    d = schema_defaults()
    assert set(d["energy_training"]["later"]) | {"seed"} == {
        f.name for f in dataclasses.fields(EnergyConfig)
    }
    assert set(d["example"]) | {"seed"} == {f.name for f in dataclasses.fields(ExampleConfig)}


def test_result_files_get_the_umask_mode(campaign):
    import os
    import stat

    root, _, _, _ = campaign
    mask = os.umask(0)
    os.umask(mask)
    for name in ("iter_001/flow.pt", "iter_001/ensemble.pt", "iter_001/labels.h5", "summary.csv"):
        mode = stat.S_IMODE((root / name).stat().st_mode)
        assert mode == 0o666 & ~mask, (name, oct(mode))


def _aldp_points(st, tmp_path):
    from cgflow.free_energy import fit_ensemble
    from cgflow.stages.points import write_points

    gen = torch.Generator().manual_seed(0)
    s = (torch.rand(60, 2, generator=gen, dtype=torch.float64) * 2 - 1) * np.pi
    f = 2.0 * (1 - torch.cos(s[:, 0] + 2.5)) + (1 - torch.cos(s[:, 1] - 2.8))
    e = {**st["ensemble"], "n_members": 2, "hidden": [8], "epochs": 5, "batch_size": 16}
    fit_ensemble(e, [True, True], s, f, 0).save(tmp_path / "ensemble.pt")
    n = len(s)
    split = torch.zeros(n, dtype=torch.int64)
    split[:10] = 1
    zeros = torch.zeros(n, dtype=torch.int64)
    write_points(st, tmp_path / "points.h5", 0, s, split, zeros, torch.arange(n), [[1, 1]])
    return s, f, split


def _labels_file(st, path, s, f, split):
    from cgflow.data import write_h5
    from cgflow.stages.labels import LABEL_UNITS

    n = len(s)
    full = torch.full((n,), 16)
    arrays = {"s": s, "point_index": torch.arange(n), "split": split, "F_kT": f}
    arrays.update(se_kT=torch.full((n,), 0.1, dtype=torch.float64), n_valid=full, n_draws=full)
    arrays.update(ess=torch.full((n,), 10.0, dtype=torch.float64), log_sum_w=-f, log_sum_w2=-f)
    arrays.update(ess_iteration=torch.full((n,), 4.0, dtype=torch.float64), n_draws_iteration=full)
    write_h5(path, "labels", arrays, {**LABEL_UNITS, "s": st.cg_units}, st.provenance(1))


def test_evaluate_alanine_dipeptide_against_the_reference(tmp_path, aldp):
    """The ALDP branch of evaluate: every reference metric and the 4-panel map."""
    st = Settings({"campaign": "t", "seed": 0, "system": {"name": "alanine_dipeptide"}})
    st._system = aldp
    s, f, split = _aldp_points(st, tmp_path)
    _labels_file(st, tmp_path / "labels.h5", s, f, split)
    m = evaluate.evaluate(
        st,
        1,
        tmp_path / "ensemble.pt",
        tmp_path / "points.h5",
        tmp_path / "labels.h5",
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
        "heldout_rmse_kT",
        "label_ess_median",
        "flow_ess_fraction",
        "label_se_populated_kT",
    ):
        assert np.isfinite(m[key]), key
    assert m["n_heldout_labels"] == 10 and m["label_ess_median"] == 10.0
    assert m["flow_ess_fraction"] == 0.25 and m["label_se_populated_kT"] == pytest.approx(0.1)
    assert json.loads((tmp_path / "m.json").read_text()) == m
    assert (tmp_path / "p.png").stat().st_size > 20_000


def double_well(x):
    """U(x) in kT for the analytic-system test: a double well in x0, harmonic in x1."""
    return 2.0 * (x[:, 0] ** 2 - 1.0) ** 2 + 0.5 * x[:, 1] ** 2


ANALYTIC = {
    "name": "analytic",
    "options": {
        "potential": "test_stages:double_well",
        "dim": 2,
        "beta": 1.0,
        "cg_indices": [0],
        "cg_bounds": [[-2.0, 2.0]],
        "x0": [-1.0, 0.0],
    },
}


def test_a_user_defined_analytic_system_runs_through_the_stages_with_exact_metrics(tmp_path):
    """`system: {name: analytic, ...}` needs no code; with `evaluation.fg_range` its exact PMF
    by quadrature scores the ensemble like Müller–Brown's."""
    cfg = json.loads(json.dumps(CFG))
    cfg["system"] = ANALYTIC
    cfg["start"]["cg_window"] = None
    cfg["flow"] = {"cond_mean": [-1.0], "cond_std": [0.5]}
    cfg["walkers"]["start"] = None  # first walkers start at the recorded minimum
    cfg["evaluation"] = {"fg_range": [[-8.0, 8.0]], "bins": 40}
    st = Settings.load(write_snapshot(cfg, tmp_path / "config.yaml"))
    assert st.system.name == "analytic"
    run_iteration_zero(st, tmp_path)
    run_iteration(st, tmp_path, 1)
    i1 = tmp_path / "iter_001"
    lab = read_h5(i1 / "labels.h5", "labels")
    # exact: F(s) = 2 (s² − 1)² + const (the harmonic x1 integrates to a constant)
    s, f = lab["s"][:, 0], lab["F_kT"]
    assert np.std(f - 2.0 * (s**2 - 1.0) ** 2) < 0.3
    m = json.loads((i1 / "metrics.json").read_text())
    assert {"kld", "max_abs_dF_kT", "max_std_kT"} <= set(m)
    grid = evaluate.cg_grid(st.system, 40)
    exact = st.system.quadrature_pmf(grid, [[-8.0, 8.0]], 801)
    want = 2.0 * (grid[:, 0] ** 2 - 1.0) ** 2
    np.testing.assert_allclose(exact, want - want.min(), atol=1e-6)
    # first walkers start at the CG value of the recorded minimum
    assert read_h5(i1 / "walkers.h5", "walkers").attrs["n_walkers"] == 20


def test_analytic_reference_csv_and_bad_range(tmp_path):
    cfg = json.loads(json.dumps(CFG))
    cfg["system"] = ANALYTIC
    grid = np.linspace(-1.9, 1.9, 20)
    (tmp_path / "ref.csv").write_text(
        "s0,F_kT\n" + "".join(f"{g},{2 * (g * g - 1) ** 2}\n" for g in grid)
    )
    cfg["evaluation"] = {"reference_csv": str(tmp_path / "ref.csv")}
    pts, f = evaluate.exact_pmf(Settings(cfg))
    np.testing.assert_allclose(pts[:, 0], grid) and np.testing.assert_allclose(
        f[0], 2 * (grid[0] ** 2 - 1) ** 2
    )
    (tmp_path / "bad.csv").write_text("s,F\n0,1\n")
    cfg["evaluation"] = {"reference_csv": str(tmp_path / "bad.csv")}
    with pytest.raises(ValueError, match=r"missing column\(s\) \['s0', 'F_kT'\]"):
        evaluate.exact_pmf(Settings(cfg))
    cfg["evaluation"] = {"fg_range": [[1.0, -1.0]]}
    with pytest.raises(ValueError, match="low < high"):
        evaluate.exact_pmf(Settings(cfg))


def test_mueller_brown_metrics_follow_the_configured_beta():
    """A non-default β is scored against its own exact PMF, not the default one."""
    from cgflow.systems import get_system

    cfg = json.loads(json.dumps(CFG))
    cfg["system"]["options"] = {"beta": 0.05, "bounds": [-2.0, 1.0]}
    pts, f = evaluate.exact_pmf(Settings(cfg))
    assert pts[0, 0] == pytest.approx(-2.0 + 1.5 / 100) and len(pts) == 100
    np.testing.assert_allclose(f, get_system("mueller_brown", beta=0.05).exact_pmf(pts[:, 0]))
    default = get_system("mueller_brown").exact_pmf(pts[:, 0])
    assert np.abs(f - default).max() > 1.0


def test_grid_mode_trains_on_a_fixed_grid_without_walkers(tmp_path):
    """`mode: grid` (method-spec 7.1): grid points from iteration 1 on, every iteration trains
    on all of them, no walkers, no points added, the run continues to max_iterations."""
    cfg = json.loads(json.dumps(CFG))
    cfg.update(mode="grid", grid={"per_axis": 12})
    st = Settings.load(write_snapshot(cfg, tmp_path / "config.yaml"))
    assert st.grid_mode
    i0 = run_iteration_zero(st, tmp_path)
    p0 = read_h5(i0 / "points.h5", "points")
    lo, hi = -2.5, 1.1  # Müller–Brown CG bounds
    expected = lo + (np.arange(12) + 0.5) * (hi - lo) / 12
    np.testing.assert_allclose(np.sort(p0["s"][:, 0]), expected)
    n_train = int((p0["split"] == 0).sum())
    assert 0 < n_train < 12
    for k in (1, 2):
        status = run_iteration(st, tmp_path, k, max_iterations=2)
        it = tmp_path / f"iter_{k:03d}"
        tr = read_h5(it / "train.h5", "train")
        assert (tr.attrs["n_latest"], tr.attrs["n_older"]) == (n_train, 0)
        assert len(read_h5(it / "labels.h5", "labels")["F_kT"]) == 12  # whole grid relabelled
        w = read_h5(it / "walkers.h5", "walkers")
        assert len(w["points"]) == 0 and w.attrs["grid_mode"] and not w.attrs["exhausted"]
        np.testing.assert_array_equal(read_h5(it / "points.h5", "points")["s"], p0["s"])
        assert status["reason"] == ("continue" if k == 1 else "max iterations")


@pytest.mark.parametrize("allocate", [False, True])
def test_pooled_labels_combine_every_iterations_draws(tmp_path, allocate):
    """`labels.pool_draws`: iteration 2's label of a point is −log of the mean weight over its
    draws of iterations 1 and 2 (two flows), from running sums; new points have one round.
    With `labels.allocate` iteration 2's draw counts differ per point, within the budget."""
    import math

    from cgflow.training import log_weights

    cfg = json.loads(json.dumps(CFG))
    cfg["labels"]["pool_draws"] = True
    cfg["labels"]["allocate"] = allocate
    cfg["labels"]["allocation"] = "equal_error"  # the default config's rule
    cfg["labels"]["min_draws"] = 4
    cfg["labels"]["populated_kT"] = 0.5
    cfg["energy_training"]["focus_populated"] = allocate
    cfg["energy_training"]["priority"] = {"kind": "populated_gap" if allocate else "uniform"}
    cfg["walkers"]["novelty_radius"] = 0.05 if allocate else None
    st = Settings.load(write_snapshot(cfg, tmp_path / "config.yaml"))
    run_iteration_zero(st, tmp_path)
    for k in (1, 2):
        run_iteration(st, tmp_path, k, n_shards=2, max_iterations=2)
    lab = read_h5(tmp_path / "iter_002" / "labels.h5", "labels")
    old = lab["point_index"] < 40
    new = lab["n_draws_iteration"]
    assert (lab["n_draws"][old] == 16 + new[old]).all() and (
        lab["n_draws"][~old] == new[~old]
    ).all()
    tr = read_h5(tmp_path / "iter_002" / "train.h5", "train").attrs
    assert tr["focus_populated"] is allocate
    assert tr["priority"] == ("populated_gap" if allocate else "uniform")
    if allocate:
        assert len(np.unique(new)) > 1 and new.min() >= 4 and new.sum() <= 16 * len(new)
        # fine-tuning trains only at the points iteration 1's ensemble predicts populated
        i1 = tmp_path / "iter_001"
        s1 = torch.as_tensor(read_h5(i1 / "points.h5", "points")["s"])
        is_train = torch.as_tensor(read_h5(i1 / "points.h5", "points")["split"] == 0)
        F1, _ = FreeEnergyEnsemble.load(i1 / "ensemble.pt").predict(s1)
        narrow = json.loads(json.dumps(cfg))
        narrow["labels"]["populated_kT"] = float((F1 - F1.min()).median())
        st2 = Settings(narrow)
        keep = train.populated(st2, i1 / "ensemble.pt", s1)
        out = tmp_path / "focus"
        train.finetune(
            st2,
            2,
            i1 / "flow.pt",
            i1 / "points.h5",
            out / "f.pt",
            out / "t.h5",
            i1 / "ensemble.pt",
            i1 / "labels.h5",
        )
        tr2 = read_h5(out / "t.h5", "train").attrs
        n_kept = int((keep & is_train).sum())
        assert 0 < tr2["n_latest"] + tr2["n_older"] == n_kept < int(is_train.sum())
    else:
        assert (new == 16).all()
    assert (lab["ess_iteration"] <= new + 1e-9).all()
    weights = {}
    for k in (1, 2):
        for j in range(2):
            it = tmp_path / f"iter_{k:03d}"
            sd = read_h5(it / "samples" / f"shard_{j}.h5", "samples")
            ed = read_h5(it / "energies" / f"shard_{j}.h5", "energies")
            lw = log_weights(torch.as_tensor(ed["log_p"]), torch.as_tensor(sd["log_q"]), sd["kept"])
            for i, w in zip(sd["point_index"], lw.tolist(), strict=True):
                weights.setdefault(int(i), []).append(w)
    for r, i in enumerate(lab["point_index"]):
        w = torch.tensor(weights[int(i)], dtype=torch.float64)
        assert len(w) == lab["n_draws"][r]
        want = math.log(len(w)) - float(torch.logsumexp(w, 0))
        assert lab["F_kT"][r] == pytest.approx(want, abs=1e-9)
        # the gap uses this iteration's draws only (the last n_draws_iteration of them)
        w2 = w[-int(lab["n_draws_iteration"][r]) :]
        gap = (
            float(torch.logsumexp(w2, 0))
            - math.log(len(w2))
            - float(w2.sort().values[(len(w2) - 1) // 2])
        )
        assert lab["log_w_gap_iteration"][r] == pytest.approx(gap, abs=1e-9)
    assert np.isfinite(lab["se_kT"]).all() and (lab["se_kT"] > 0).all()
    metrics = json.loads((tmp_path / "iter_002" / "metrics.json").read_text())
    assert 0 < metrics["flow_ess_fraction"] <= 1 and metrics["label_se_populated_kT"] > 0
    bad = json.loads(json.dumps(cfg))
    bad["labels"]["clip_top_k"] = 3
    with pytest.raises(ValueError, match="clip_top_k"):
        Settings(bad)
    bad = json.loads(json.dumps(cfg))
    bad["labels"].update(allocate=True, min_draws=32)
    with pytest.raises(ValueError, match=r"min_draws <= labels\.draws"):
        Settings(bad)
    bad = json.loads(json.dumps(cfg))
    bad["labels"]["pool_draws"] = False
    bad["labels"]["allocate"] = True
    with pytest.raises(ValueError, match=r"allocate needs labels\.pool_draws"):
        Settings(bad)


def test_populated_gap_priority_weights_only_populated_old_points(tmp_path, campaign):
    """`energy_training.priority.kind: populated_gap`: fine-tuning needs iteration k − 1's
    ensemble (refused by name without it); old points it predicts populated weigh
    min(gap, cap)^power, the others 1."""
    root, _, _, _ = campaign
    i1 = root / "iter_001"
    cfg = json.loads(json.dumps(CFG))
    cfg["energy_training"]["priority"] = {"kind": "populated_gap", "cap_nat": 10.0, "power": 2.0}
    p = read_h5(i1 / "points.h5", "points")
    F1, _ = FreeEnergyEnsemble.load(i1 / "ensemble.pt").predict(torch.as_tensor(p["s"]))
    cfg["labels"]["populated_kT"] = float((F1 - F1.min()).median())  # half the points
    st = Settings(cfg)
    args = (st, 2, i1 / "flow.pt", i1 / "points.h5", tmp_path / "f.pt", tmp_path / "t.h5")
    with pytest.raises(ValueError, match=r"populated_gap.*ensemble must be given"):
        train.finetune(*args, None, i1 / "labels.h5")
    train.finetune(*args, i1 / "ensemble.pt", i1 / "labels.h5")
    assert read_h5(tmp_path / "t.h5", "train").attrs["priority"] == "populated_gap"
    older = torch.arange(len(p["s"]))
    mass = train.populated(st, i1 / "ensemble.pt", torch.as_tensor(p["s"]))
    assert 0 < int(mass.sum()) < len(mass)
    w = train.old_point_weights(st, i1 / "labels.h5", older, mass)
    gap_w = train.old_point_weights(st, i1 / "labels.h5", older)
    assert torch.equal(w[~mass], torch.ones(int((~mass).sum()), dtype=w.dtype))
    assert torch.equal(w[mass], gap_w[mass])


def test_shards_take_consecutive_points_with_about_the_same_draws():
    counts = np.array([512] * 3 + [8] * 200 + [64] * 20)
    shard = labels.shard_points(counts, 3)
    assert (np.diff(shard) >= 0).all() and set(shard) == {0, 1, 2}
    per = np.bincount(shard, weights=counts)
    assert per.max() - per.min() <= 2 * counts.max()
    assert (labels.shard_points(np.array([16, 16]), 4) < 4).all()
