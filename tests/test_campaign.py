"""The in-process active-learning loop on Müller–Brown (exact ground truth)."""

import itertools
import time

import numpy as np
import pytest
import torch

from cgflow.campaign import (
    EnsembleConfig,
    cap_labels,
    fit_ensemble,
    mueller_brown_config,
    mueller_brown_evaluator,
    run_campaign,
)

MINIMA = (-2.014, -0.502, 0.578)  # exact PMF minima (method-spec §1.5)


def test_label_cap_keeps_a_failed_label_from_wrecking_the_fit():
    """One label of 1e4 kT (a point the flow has not learnt) and a smooth rest."""
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
    errors = {}
    for cap in (None, 10.0):
        e = EnsembleConfig(
            n_members=3, hidden=(32, 32), epochs=200, lr=3e-3, batch_size=32, label_cap_kT=cap
        )
        mean, _ = fit_ensemble(e, [False], s_bad, f_bad, seed=0).predict(s)
        errors[cap] = float((mean - f).abs().median())
    assert errors[10.0] < 0.5 < errors[None]


def check_mueller_brown(seed: int, **overrides):
    t0 = time.perf_counter()
    result = run_campaign(
        mueller_brown_config(seed, **overrides), evaluate=mueller_brown_evaluator()
    )
    seconds = time.perf_counter() - t0
    last = result.records[-1]
    print(
        f"seed {seed}: {len(result.records)} iterations, {seconds:.0f} s, N = {result.counter.total}, {last.metrics}"
    )
    # it stopped because the walkers were exhausted, not by looking at the ground truth
    assert result.converged and result.reason == "walkers exhausted"
    # walker-selected centres (not the starting points) reached the two other minima
    selected = np.concatenate([r.selected[:, 0] for r in result.records if len(r.selected)])
    radius = result.config.spreading.radius  # each selected centre adds points within ± radius
    for m in MINIMA[1:]:
        assert np.min(np.abs(selected - m)) < radius, (m, selected)
    pts = result.train_points[:, 0]
    for m in MINIMA:
        assert np.min(np.abs(pts - m)) < 0.05
    assert last.metrics["max_abs_dF_kT"] < 0.5
    counts = result.counter.as_dict()
    assert counts["training"] == counts["training_draws"]  # no chirality filter here
    assert result.counter.total == sum(
        counts.get(k, 0) for k in ("start_md", "minimisation", "training", "diagnostics", "labels")
    )
    return result


def test_mueller_brown_campaign_fast():
    """One seed, lighter ensemble training; covers the same loop as the 3-seed test."""
    ens = EnsembleConfig(
        n_members=8,
        hidden=(64, 64),
        init="gaussian_uniform",
        epochs=150,
        lr=2e-3,
        batch_size=32,
        split="bagging",
        train_fraction=0.9,
    )
    check_mueller_brown(0, ensemble=ens)


def test_starting_points_respect_the_window():
    cfg = mueller_brown_config(0, max_iterations=1)
    result = run_campaign(cfg)
    first = result.records[0]
    assert first.n_train_points > 0
    assert first.counts["start_md"] > 0
    assert result.config.backend == {"kind": "torch"} and result.config.dtype == "float64"


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_mueller_brown_campaign_three_seeds(seed):
    check_mueller_brown(seed)


def test_grid_conditioning_baseline_on_mueller_brown():
    """No active learning: a regular grid of CG points, evaluated every few epochs."""
    from cgflow.campaign import grid_points, run_grid_campaign
    from cgflow.systems import get_system
    from cgflow.training import EnergyConfig

    pts = grid_points(get_system("mueller_brown"), 36)
    assert pts.shape == (36, 1) and float(pts.min()) > -2.5 and float(pts.max()) < 1.1
    energy = EnergyConfig(
        epochs=12,
        lr=5e-3,
        batch_size=16,
        rows_per_point=30,
        warmup_epochs=2,
        schedule="cosine",
        clip_early=20,
        clip_late=20,
        skip_top_k=0,
    )
    ens = EnsembleConfig(
        n_members=4,
        hidden=(32, 32),
        activation="silu",
        epochs=1000,
        lr=1e-2,
        batch_size=8,
        split="bagging",
        train_fraction=0.9,
    )
    result = run_grid_campaign(
        mueller_brown_config(0, energy=energy, ensemble=ens),
        per_axis=36,
        eval_every=6,
        evaluate=mueller_brown_evaluator(),
    )
    assert len(result.records) == 2
    assert result.records[-1].total_evaluations > result.records[0].total_evaluations
    first, last = result.records[0].metrics, result.records[-1].metrics
    assert last["kld"] < 0.01 and last["kld"] < first["kld"]
    assert (
        result.records[-1].counts["labels"] == 2 * 29 * 30
    )  # 29 training grid points x 30 draws, twice


def test_lr_schedule():
    from cgflow.training import EnergyConfig

    c = EnergyConfig(warmup_epochs=4, schedule="cosine", schedule_epochs=14)
    f = [c.lr_factor(e) for e in range(14)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]  # the first epoch ramps too (no off-by-one)
    assert f[4] == 1.0 and f[-1] < 0.05 and all(a >= b for a, b in itertools.pairwise(f[4:]))
    with pytest.raises(ValueError, match="unknown lr schedule"):
        EnergyConfig(schedule="step")


def test_alanine_dipeptide_loop_smoke():
    """The 2-D periodic path (walkers, farthest points, disk spreading, group splits) runs."""
    from cgflow.campaign import CampaignConfig, LabelConfig, SpreadConfig, StartConfig, WalkerConfig
    from cgflow.training import EnergyConfig, ExampleConfig

    energy = EnergyConfig(
        epochs=1, lr=1e-4, batch_size=32, rows_per_point=1, warmup_epochs=1, skip_top_k=2
    )
    cfg = CampaignConfig(
        system={"name": "alanine_dipeptide"},
        seed=3,
        start=StartConfig(n_frames=200, stride=10, n_points=60),
        flow={"n_blocks": 2, "hidden": 16},
        dtype="float32",
        example=ExampleConfig(epochs=2, lr=1e-3, batch_size=64),
        energy_first=energy,
        energy=energy,
        labels=LabelConfig(draws=8),
        ensemble=EnsembleConfig(n_members=3, hidden=(16, 16), epochs=20, lr=1e-3, batch_size=32),
        walkers=WalkerConfig(
            n_walkers=20,
            step_size=0.3,
            threshold_kT=0.05,
            max_steps=200,
            n_candidates=4,
            n_select=2,
        ),
        spreading=SpreadConfig(kind="disk", radius=0.6, n_per_centre=10, test_fraction=0.5),
        max_iterations=2,
    )
    result = run_campaign(cfg)
    assert len(result.records) == 2
    first = result.records[0]
    assert len(first.selected) == 2 and np.all(np.abs(first.selected) <= np.pi)
    assert first.n_new_points == 10  # one centre's 10 points train, the other's test
    c = result.counter.as_dict()
    assert c["training"] <= c["training_draws"] and c["labels"] > 0 and c["minimisation"] > 0
    assert np.all(np.abs(result.train_points) <= np.pi)
