"""Training by example and by energy: gradients, robust loss, counting, chirality filter."""

import math

import numpy as np
import pytest
import torch

from cgflow.energy.counting import EvaluationCounter
from cgflow.flows import build_flow
from cgflow.training import (
    BackendEnergy,
    cg_values,
    draw,
    label_log_weights,
    log_target_from_internal,
    reverse_kl_losses,
    robust_mean,
    soft_cut,
    train_by_energy,
    train_by_example,
)
from conftest import energy_config, example_config


def test_backend_energy_gradients_match_autograd(aldp, aldp_frames):
    """Forces fed through the autograd function (OpenMM, torch f32) = autograd of torch f64."""
    z = aldp.to_internal(torch.as_tensor(aldp_frames[:16])).requires_grad_(True)
    ref_backend = aldp.energy_backend("torch", dtype=torch.float64)
    x, logdet = aldp.to_cartesian(z)
    ref = -aldp.beta * ref_backend.energies(x) + logdet
    (g_ref,) = torch.autograd.grad(ref.sum(), z)
    for kind, options, tol in (
        ("openmm", {"platform": "Reference"}, 1e-6),
        ("torch", {"dtype": torch.float32}, 2e-3),
    ):
        backend = aldp.energy_backend(kind, **options)
        zz = z.detach().requires_grad_(True)
        val = log_target_from_internal(aldp, zz, backend)
        (g,) = torch.autograd.grad(val.sum(), zz)
        torch.testing.assert_close(val, ref.detach(), atol=1e-3, rtol=1e-6)
        rel = (g - g_ref).norm() / g_ref.norm()
        assert rel < tol, (kind, float(rel))


def test_backend_energy_nan_rows_give_zero_gradient():
    class Nan:
        def energies_and_forces(self, x):
            u = torch.tensor([1.0, float("nan")], dtype=x.dtype)
            return u, torch.full_like(x, float("nan"))

    x = torch.zeros(2, 3, requires_grad=True)
    u = BackendEnergy.apply(x, Nan())
    u[:1].sum().backward()
    assert torch.isfinite(x.grad).all()


def test_soft_cut_is_identity_below_and_logarithmic_above():
    u = torch.tensor(
        [-40.0, 0.0, 199.0, 200.0, 201.0, 1e6], dtype=torch.float64, requires_grad=True
    )
    out = soft_cut(u, 200.0)
    expected = torch.tensor(
        [-40.0, 0.0, 199.0, 200.0, 200.0 + math.log(2.0), 200.0 + math.log1p(1e6 - 200)]
    )
    torch.testing.assert_close(out.detach(), expected.double())
    out.sum().backward()
    torch.testing.assert_close(
        u.grad, torch.tensor([1.0, 1.0, 1.0, 1.0, 0.5, 1 / (1e6 - 199)], dtype=torch.float64)
    )
    assert soft_cut(u, None) is u


def test_robust_mean():
    losses = torch.tensor([1.0, 2.0, 3.0, 100.0, float("nan"), float("inf")])
    m, dropped = robust_mean(losses, 1)
    assert float(m) == pytest.approx(2.0) and dropped == 3
    m, dropped = robust_mean(torch.tensor([float("nan")]), 0)
    assert math.isnan(float(m)) and dropped == 1


def test_mueller_brown_by_example_and_energy_with_counting():
    from cgflow.md import metropolis
    from cgflow.systems import get_system

    mb = get_system("mueller_brown")
    run = metropolis(mb, n_frames=200, stride=10, seed=0, step_size=0.05)
    s, x_fg = cg_values(mb, run.frames, torch.float64)
    flow = build_flow(mb, cond_mean=[-2.0], cond_std=[0.3])
    hist = train_by_example(flow, s, x_fg, example_config(epochs=30, lr=5e-3, batch_size=16))
    assert hist["nll"][-1] < hist["nll"][0]
    backend = mb.energy_backend()
    counter = EvaluationCounter()
    pts = torch.linspace(-2.2, -1.8, 20, dtype=torch.float64)[:, None]
    cfg = energy_config(
        epochs=5,
        lr=5e-3,
        batch_size=8,
        rows_per_point=10,
        warmup_epochs=2,
        skip_top_k=0,
        clip_early=20,
        clip_late=20,
    )
    h = train_by_energy(flow, mb, backend, pts, cfg, counter)
    assert len(h.loss) == 5 and h.lr[:2] == [2.5e-3, 5e-3]
    rows = 5 * (20 * 10 // 8) * 8
    assert counter["training_draws"] == rows and counter["training"] == rows
    # labels: fixed draws per point, each counted; F close to the exact PMF differences
    lw = label_log_weights(flow, mb, backend, pts[::5], 200, counter, seed=1)
    assert lw.shape == (4, 200) and counter["labels"] == 800
    from cgflow.free_energy import pmf_labels

    f = pmf_labels(lw).F_kT.numpy()
    exact = mb.exact_pmf(pts[::5, 0].numpy())
    np.testing.assert_allclose(f - f[0], exact - exact[0], atol=0.15)


def test_old_rows_fraction_or_every_old_point():
    """old_fraction: a fraction of the new rows, capped at rows_per_point per old point; "all":
    rows_per_point at every old point, whatever the number of new rows."""
    cfg = energy_config(rows_per_point=2, old_fraction=0.5)
    assert cfg.old_rows(100, 1000) == 50 and cfg.old_rows(100, 10) == 20
    every = energy_config(rows_per_point=2, old_fraction="all")
    assert every.old_rows(100, 1000) == 2000 and every.old_rows(0, 7) == 14
    with pytest.raises(ValueError, match="old_fraction"):
        energy_config(old_fraction="most")
    with pytest.raises(ValueError, match="old_fraction"):
        energy_config(old_fraction=-1.0)
    # training counts every row: 3 epochs x (4 new + 6 old points) x 1 row, batch 5
    from cgflow.systems import get_system

    mb = get_system("mueller_brown")
    flow = build_flow(mb, cond_mean=[-2.0], cond_std=[0.3])
    counter = EvaluationCounter()
    new = torch.linspace(-2.2, -2.0, 4, dtype=torch.float64)[:, None]
    old = torch.linspace(-1.9, -1.6, 6, dtype=torch.float64)[:, None]
    cfg = energy_config(epochs=3, batch_size=5, rows_per_point=1, old_fraction="all")
    train_by_energy(flow, mb, mb.energy_backend(), new, cfg, counter, old_points=old)
    assert counter["training_draws"] == 3 * 10


def test_chirality_filter_skips_energy_calls(aldp):
    """D-form draws are not energy-evaluated: counted as draws, not as evaluations."""
    flow = build_flow(aldp, n_blocks=2, hidden=16).double()
    with torch.no_grad():  # random circular torsions make some D forms
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x0, _ = aldp.initial_configuration()
    s = aldp.cg(torch.as_tensor(x0[None])).expand(256, -1)
    d = draw(flow, aldp, s, torch.Generator().manual_seed(0))
    assert 0 < int(d.kept.sum()) < 256
    calls = []

    class Spy:
        def energies_and_forces(self, x):
            calls.append(x.shape[0])
            return aldp.energy_backend("torch", dtype=torch.float64).energies_and_forces(x)

    counter = EvaluationCounter()
    losses, rejected = reverse_kl_losses(
        flow, aldp, Spy(), s, counter, generator=torch.Generator().manual_seed(0)
    )
    assert calls == [256 - rejected] and counter["training"] == 256 - rejected
    assert counter["training_draws"] == 256
    assert int(torch.isnan(losses).sum()) >= rejected


def test_priority_weights_send_old_rows_where_the_gap_is_large(monkeypatch):
    """min(gap, cap)^power; NaN gaps count as the median, inf as the cap. Weighted old rows are
    drawn in proportion: one of 50 old points with weight 25 (the others 1) gets about a third
    of the old rows instead of a fiftieth."""
    import cgflow.training as tr
    from cgflow.systems import get_system

    w = tr.priority_weights(torch.tensor([1.0, 5.0, math.inf, math.nan, 1.0]), 10.0, 2.0)
    assert w.tolist() == [1.0, 25.0, 100.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="cap_nat"):
        tr.priority_weights(torch.ones(2), cap_nat=0.0, power=1.0)
    mb = get_system("mueller_brown")
    flow = build_flow(mb, cond_mean=[-2.0], cond_std=[0.3])
    old = torch.linspace(-1.9, -1.5, 50, dtype=torch.float64)[:, None]
    weights = torch.ones(50)
    weights[7] = 25.0
    seen = []
    real = tr.reverse_kl_losses

    def spy(flow, system, backend, s, counter, **kw):
        seen.append(s.detach().clone())
        return real(flow, system, backend, s, counter, **kw)

    monkeypatch.setattr(tr, "reverse_kl_losses", spy)
    cfg = energy_config(epochs=4, batch_size=51, rows_per_point=1, old_fraction=50.0)
    new = torch.tensor([[-2.1]], dtype=torch.float64)
    counter = EvaluationCounter()
    backend = mb.energy_backend()
    tr.train_by_energy(flow, mb, backend, new, cfg, counter, old_points=old, old_weights=weights)
    rows = torch.cat(seen)[:, 0].to(torch.float64)
    assert len(rows) == 4 * 51
    n7 = int((rows == old[7, 0].to(rows.dtype)).sum())
    assert 40 <= n7 <= 100  # expected 200 x 25 / 74 = 68; uniform: 4
    with pytest.raises(ValueError, match="old_weights"):
        tr.train_by_energy(
            flow, mb, backend, new, cfg, counter, old_points=old, old_weights=torch.ones(3)
        )
