"""Alanine dipeptide end to end with a tiny flow, against the shipped reference."""

import math

import numpy as np
import pytest
import torch

from cgflow.energy.counting import EvaluationCounter
from cgflow.flows import build_flow
from cgflow.free_energy import pmf_labels
from cgflow.md import langevin_md
from cgflow.metrics import GRIDS
from cgflow.reference import ALDP_REFERENCE, load_reference
from cgflow.sampling import spread
from cgflow.training import (
    cg_values,
    label_log_weights,
    train_by_energy,
    train_by_example,
)
from conftest import energy_config, example_config

BETA = (-2.54, 2.81)  # the minimum (β / C5)
ALPHA_R = (-1.40, -0.65)


def bin_of(grid, point):
    return tuple(int(np.floor((v + math.pi) / (2 * math.pi) * grid.bins)) for v in point)


def bin_free_energy(flow, system, backend, grid, point, n_points=48, draws=256, seed=0):
    """−log of the flow's Boltzmann weight averaged over the grid bin containing ``point``."""
    i, j = bin_of(grid, point)
    e = grid.edges
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(n_points, 2, generator=gen)
    pts = torch.stack(
        [e[i] + u[:, 0] * (e[i + 1] - e[i]), e[j] + u[:, 1] * (e[j + 1] - e[j])], 1
    ).float()
    f = pmf_labels(
        label_log_weights(flow, system, backend, pts, draws, EvaluationCounter(), seed=seed)
    ).F_kT
    return float(-torch.logsumexp(-f, 0) + math.log(n_points))


def ess(flow, system, backend, point, draws=1024, seed=0):
    lw = label_log_weights(
        flow, system, backend, torch.tensor([point]), draws, EvaluationCounter(), seed=seed
    )
    return float(pmf_labels(lw).ess[0])


@pytest.mark.skipif(not ALDP_REFERENCE.exists(), reason="no shipped reference")
def test_tiny_flow_learns_alpha_r_minus_beta(aldp):
    torch.manual_seed(0)
    md = langevin_md(aldp, n_frames=2000, stride=10, seed=1)
    s0, x_fg = cg_values(aldp, md.frames, torch.float32)
    flow = build_flow(aldp, n_blocks=6, hidden=64).to(torch.float32)
    opt = torch.optim.Adam(flow.parameters(), lr=1e-3)
    train_by_example(
        flow, s0, x_fg, example_config(epochs=40, lr=1e-3, batch_size=128), optimizer=opt
    )
    backend = aldp.energy_backend("torch", dtype=torch.float32)
    ess_before = [ess(flow, aldp, backend, p) for p in (BETA, ALPHA_R)]
    pts = spread(
        torch.tensor([BETA, ALPHA_R]), 100, 0.4, kind="disk", periodic=[True, True], seed=0
    ).float()
    counter = EvaluationCounter()
    for lr, epochs in ((1e-3, 240), (3e-4, 240)):
        cfg = energy_config(
            epochs=epochs,
            lr=lr,
            batch_size=64,
            rows_per_point=1,
            warmup_epochs=0,
            skip_top_k=3,
            clip_early=100,
            clip_late=100,
        )
        train_by_energy(flow, aldp, backend, pts, cfg, counter, optimizer=opt)
    ess_after = [ess(flow, aldp, backend, p) for p in (BETA, ALPHA_R)]
    grid = GRIDS["std36"]
    ref = load_reference()["counts_std36"].astype(np.float64)
    ref_df = -math.log(ref[bin_of(grid, ALPHA_R)] / ref[bin_of(grid, BETA)])
    df = bin_free_energy(flow, aldp, backend, grid, ALPHA_R) - bin_free_energy(
        flow, aldp, backend, grid, BETA
    )
    print(
        f"ESS before {ess_before}, after {ess_after}; dF model {df:.3f}, reference {ref_df:.3f}; N {counter.total}"
    )
    assert all(a > b for a, b in zip(ess_after, ess_before, strict=True))
    assert abs(df - ref_df) < 0.5
