"""The campaign in one process (cgflow.campaign.run_campaign): the workflow's stages, files and
seeds, on Müller–Brown (exact ground truth) and a tiny alanine dipeptide."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from cgflow.campaign import run_campaign
from cgflow.data import read_h5
from cgflow.free_energy import cap_labels, fit_ensemble

REPO = Path(__file__).parents[1]
MINIMA = (-2.014, -0.502, 0.578)  # exact PMF minima (method-spec §1.5)


def shipped(name: str, **overrides) -> dict:
    cfg = yaml.safe_load((REPO / "config" / name).read_text())
    for key, value in overrides.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


def test_label_cap_keeps_a_failed_label_from_wrecking_the_fit():
    """One label of 1e4 kT (a point the flow has not learnt) and a smooth rest."""
    from conftest import schema_defaults

    torch.manual_seed(0)
    s = torch.rand(400, 1, dtype=torch.float64) * 4 - 2
    f = 2.0 * s[:, 0] ** 2
    assert torch.equal(cap_labels(f, None), f)
    capped = cap_labels(torch.cat([f, torch.tensor([1e4])]), 10.0)
    assert float(capped.max()) == float(f.min()) + 10.0
    assert torch.equal(capped[:-1], torch.minimum(f, f.min() + 10.0))
    with pytest.raises(ValueError, match="label_cap_kT"):
        cap_labels(f, 0.0)
    s_bad = torch.cat([s, torch.tensor([[0.05]], dtype=torch.float64)])
    f_bad = torch.cat([f, torch.tensor([1e4], dtype=torch.float64)])
    base = schema_defaults()["ensemble"]
    errors = {}
    for cap in (None, 10.0):
        e = {
            **base,
            "n_members": 3,
            "hidden": [32, 32],
            "epochs": 200,
            "lr": 3e-3,
            "batch_size": 32,
            "label_cap_kT": cap,
        }
        mean, _ = fit_ensemble(e, [False], s_bad, f_bad, seed=0).predict(s)
        errors[cap] = float((mean - f).abs().median())
    assert errors[10.0] < 0.5 < errors[None]


def check_mueller_brown(tmp_path: Path, seed: int, **overrides) -> pd.DataFrame:
    cfg = shipped("mueller_brown.yaml", seed=seed, **overrides)
    root = run_campaign(cfg, tmp_path, log=lambda m: None)
    df = pd.read_csv(root / "summary.csv")
    last = df.iloc[-1]
    print(
        f"seed {seed}: {len(df) - 1} iterations, N = {last['N']}, max|dF| {last['metric_max_abs_dF_kT']}"
    )
    # it stopped because the walkers were exhausted, not by looking at the ground truth
    assert bool(last["converged"]) and last["reason"] == "walkers exhausted"
    # walker-selected centres (not the starting points) reached the two other minima
    centres = np.concatenate(
        [
            np.reshape(json.loads(read_h5(p, "points").attrs["centres"]), (-1, 1))
            for p in sorted(root.glob("iter_*/points.h5"))
        ]
    )[:, 0]
    for m in MINIMA[1:]:
        assert np.min(np.abs(centres - m)) < cfg["spreading"]["radius"], (m, centres)
    pts = read_h5(root / f"iter_{len(df) - 1:03d}" / "points.h5", "points")["s"][:, 0]
    for m in MINIMA:
        assert np.min(np.abs(pts - m)) < 0.05
    assert last["metric_max_abs_dF_kT"] < 0.5
    assert (df["evals_training"] == df["evals_training_draws"]).all()  # no chirality filter here
    kinds = ("start_md", "minimisation", "training", "labels")
    assert (df["N"] == sum(df[f"cum_evals_{k}"] for k in kinds)).all()
    return df


def test_mueller_brown_campaign_fast(tmp_path):
    """The shipped Müller–Brown config, seed 0; the same loop as the 3-seed test."""
    check_mueller_brown(tmp_path, 0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_mueller_brown_campaign_three_seeds(tmp_path, seed):
    check_mueller_brown(tmp_path, seed)


def test_resume_skips_finished_steps_and_fewer_shards_count_only_their_files(tmp_path):
    """A second run finds every output up to date; a rerun in the same folder with fewer
    shards recomputes everything after the snapshot, and N counts only the current shards
    (the stale shard files of the first run stay on disk, uncounted)."""
    cfg = shipped("test_mb.yaml", max_iterations=2)
    root = run_campaign(cfg, tmp_path, log=lambda m: None)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    log: list[str] = []
    run_campaign({**cfg, "threads": 2}, tmp_path, log=log.append)  # threads rerun nothing
    assert log == [] and all(p.stat().st_mtime_ns == t for p, t in before.items())
    two = pd.read_csv(root / "summary.csv")
    fewer = shipped("test_mb.yaml", max_iterations=2, energy={"shards": 1})
    run_campaign(fewer, tmp_path, log=lambda m: None)
    one = pd.read_csv(root / "summary.csv")
    assert (root / "iter_002" / "energies" / "shard_1.h5").exists()  # stale, not an input
    labels = [
        sum(
            read_h5(
                root / f"iter_{k:03d}" / "energies" / "shard_0.h5", "energies"
            ).counters.values()
        )
        for k in (1, 2)
    ]
    assert list(one["evals_labels"].iloc[1:]) == labels
    assert (
        one["N"].iloc[-1]
        == one[[f"evals_{k}" for k in ("start_md", "minimisation", "training", "labels")]]
        .sum()
        .sum()
    )
    # the same points are labelled either way: the counts agree, the draws differ
    assert list(one["evals_labels"]) == list(two["evals_labels"])


def test_grid_mode_on_mueller_brown(tmp_path):
    """No active learning: a regular grid of CG points relabelled every iteration."""
    cfg = shipped(
        "mueller_brown.yaml",
        mode="grid",
        grid={"per_axis": 36},
        max_iterations=2,
        # the settings this check was tuned with (4 shards: each shard draws from its own stream)
        energy={"backend": "torch", "shards": 4},
        labels={"allocate": False},
        ensemble={
            "n_members": 4,
            "hidden": [32, 32],
            "activation": "silu",
            "epochs": 600,
            "lr": 1e-2,
            "batch_size": 8,
            "patience": None,
        },
    )
    df = pd.read_csv(run_campaign(cfg, tmp_path, log=lambda m: None) / "summary.csv")
    assert list(df["iteration"]) == [0, 1, 2] and df["reason"].iloc[-1] == "max iterations"
    assert list(df["evals_labels"].iloc[1:]) == [36 * 30, 36 * 30]  # the whole grid, twice
    assert df["metric_kld"].iloc[-1] < 0.05


def test_alanine_dipeptide_smoke(tmp_path):
    """The 2-D periodic path (minimum recorded once, walkers, farthest points, disk spreading)."""
    cfg = shipped(
        "config.yaml",
        campaign="aldp_smoke",
        seed=3,
        start={"n_frames": 200, "stride": 10, "n_points": 60},
        flow={"n_blocks": 2, "hidden": 16},
        example={"epochs": 2},
        energy_training={
            k: {
                "epochs": 1,
                "lr": 1e-4,
                "batch_size": 32,
                "rows_per_point": 1,
                "warmup_epochs": 1,
                "skip_top_k": 2,
            }
            for k in ("first", "later")
        },
        labels={"draws": 8, "min_draws": 2},
        energy={"backend": "torch", "shards": 1},
        ensemble={"n_members": 3, "hidden": [16, 16], "epochs": 20, "batch_size": 32},
        walkers={
            "n_walkers": 20,
            "step_size": 0.3,
            "threshold_kT": 0.05,
            "min_steps": 0,
            "max_steps": 200,
            "n_candidates": 4,
            "n_select": 2,
        },
        spreading={"n_per_centre": 10, "test_fraction": 0.5},
        max_iterations=2,
        backmap={"points": {}},
        baselines=None,
    )
    root = run_campaign(cfg, tmp_path, log=lambda m: None)
    df = pd.read_csv(root / "summary.csv")
    assert list(df["iteration"]) == [0, 1, 2]
    assert df["evals_minimisation"].iloc[0] > 0 and (df["evals_minimisation"].iloc[1:] == 0).all()
    p1 = read_h5(root / "iter_001" / "points.h5", "points")
    assert len(json.loads(p1.attrs["centres"])) == 2 and (np.abs(p1["s"]) <= np.pi).all()
    assert (p1["split"][60:] == 1).sum() == 10  # half of the 20 new points held out
    assert 0 < df["evals_labels"].iloc[1] <= 60 * 8  # every point, 8 draws, filtered by chirality
    assert df["evals_training"].iloc[1] <= df["evals_training_draws"].iloc[1]


def test_cli_run_refuses_bad_overrides_by_name(capsys):
    from cgflow.cli import main

    args = ["run", "--configfile", str(REPO / "config" / "test_mb.yaml")]
    assert main([*args, "--config", "max_iterations"]) == 2
    assert "use KEY=VALUE" in capsys.readouterr().err
    assert main([*args, "--config", "max_iterations=0"]) == 2
    assert "max_iterations" in capsys.readouterr().err
