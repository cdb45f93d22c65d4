"""PMF labels from importance weights and the vectorised MLP ensemble (cgflow.free_energy)."""

import math
import time

import pytest
import torch

from cgflow.free_energy import FreeEnergyEnsemble, LabelResult, log_weight_gap, pmf_labels

# ------------------------------------------------------------------------------ label estimator
# Conditional Gaussian target p~(x, s) = exp(-(x - A s)² / (2 SP²) - C s² / 2) restricted to the
# "accepted" half-line x <= A s + t(s) (the analogue of the L-chirality filter: rejection depends
# on x, with a rate that varies with s). Its exact marginal is
#     F(s) = C s² / 2 - log(sqrt(2π) SP Φ(t(s) / SP)).
# Proposal q(x | s) = N(A s + DELTA, SQ²) with SQ > SP (bounded weights).
A, SP, C, DELTA, SQ = 0.7, 1.0, 1.0, 0.4, 1.3
S = torch.linspace(-1.5, 1.5, 8, dtype=torch.float64)
T = torch.linspace(0.0, 2.5, 8, dtype=torch.float64)  # rejection under q: ~60 % ... ~5 %


def _phi(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))


def exact_F() -> torch.Tensor:
    return C * S**2 / 2 - torch.log(math.sqrt(2 * math.pi) * SP * _phi(T / SP))


def draw_log_w(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """log w of draws x ~ q(.|s) for the points S (axis 1); rejected draws -inf or NaN."""
    s = S.view(1, -1, *([1] * (len(shape) - 2)))
    t = T.view(1, -1, *([1] * (len(shape) - 2)))
    x = A * s + DELTA + SQ * torch.randn(shape, generator=gen, dtype=torch.float64)
    log_p = -((x - A * s) ** 2) / (2 * SP**2) - C * s**2 / 2
    log_q = -((x - A * s - DELTA) ** 2) / (2 * SQ**2) - math.log(math.sqrt(2 * math.pi) * SQ)
    lw = log_p - log_q
    rejected = x > A * s + t
    # encode half of the rejected draws as NaN (a failed energy), half as -inf
    nan = torch.rand(shape, generator=gen) < 0.5
    lw = torch.where(rejected & nan, torch.full_like(lw, math.nan), lw)
    return torch.where(rejected & ~nan, torch.full_like(lw, -math.inf), lw)


def mean_error_test(
    estimates: torch.Tensor, truth: torch.Tensor, centred: bool = False
) -> tuple[bool, torch.Tensor]:
    """Is the mean error over replicates (rows) of any point (columns) > 3 standard errors?

    ``centred`` removes each replicate's mean error over the points first (labels are only defined
    up to one global constant). Returns (flagged as biased, |mean error| / SE per point).
    """
    err = estimates - truth
    if centred:
        err = err - err.mean(dim=1, keepdim=True)
    z = err.mean(dim=0) / (err.std(dim=0) / math.sqrt(err.shape[0]))
    return bool((z.abs() > 3.0).any()), z.abs()


def original_estimator(R: int, D: int, epochs: int, gen: torch.Generator) -> torch.Tensor:
    """The original code's labels F = -log Σ w over the rows that hold a valid sample.

    Each of ``D`` rows per point draws once per epoch and keeps its *last accepted* draw (rejected
    draws are dropped, not stored as zeros); rows that never had an accepted draw are missing, so
    the number of valid rows varies from point to point.
    """
    lw = draw_log_w((R, S.shape[0], D, epochs), gen)
    ok = torch.isfinite(lw)
    last = torch.where(ok, torch.arange(epochs), -1).max(dim=-1).values
    lw_row = lw.gather(-1, last.clamp(min=0)[..., None])[..., 0]
    lw_row = torch.where(last >= 0, lw_row, torch.full_like(lw_row, -math.inf))
    return -torch.logsumexp(lw_row, dim=-1)


def test_pmf_labels_unbiased_with_rejections_and_original_estimator_flagged():
    gen = torch.Generator().manual_seed(11)
    R, D = 200, 400
    lw = draw_log_w((R, S.shape[0], D), gen)
    n_valid_rate = torch.isfinite(lw).double().mean(dim=(0, 2))
    assert n_valid_rate.min() < 0.5 and n_valid_rate.max() > 0.9  # a varying rejection rate
    labels = pmf_labels(lw.reshape(-1, D))
    F_hat = labels.F_kT.reshape(R, -1)
    truth = exact_F()
    for centred in (False, True):
        biased, z = mean_error_test(F_hat, truth, centred)
        assert not biased, z
    # negative control: same statistic flags the original estimator, also up to a constant
    F_orig = original_estimator(R, 30, 3, gen)
    for centred in (False, True):
        biased, z = mean_error_test(F_orig, truth, centred)
        assert biased, z
    # F = -log(mean) carries an O(1/D) Jensen bias; exp(-F) itself is exactly unbiased, also at
    # the original's 30 draws per point
    lw30 = draw_log_w((1000, S.shape[0], 30), gen)
    ratio = torch.exp(-(pmf_labels(lw30.reshape(-1, 30)).F_kT.reshape(1000, -1) - truth))
    biased, z = mean_error_test(ratio, torch.ones_like(truth))
    assert not biased, z


def test_pmf_labels_numerics_ess_and_rejections():
    lw = torch.tensor(
        [
            [1e4, 1e4, 1e4, 1e4],  # huge: no overflow
            [-1e4, -1e4, -math.inf, math.nan],  # tiny, half rejected (NaN counts as rejected)
            [-math.inf, math.nan, math.inf, -math.inf],  # all rejected (+inf too)
            [0.0, math.log(2.0), -math.inf, -math.inf],
        ]
    )
    res = pmf_labels(lw)
    assert isinstance(res, LabelResult) and res.F_kT.dtype == torch.float64
    torch.testing.assert_close(res.F_kT[0], torch.tensor(-1e4, dtype=torch.float64))
    torch.testing.assert_close(res.F_kT[1], torch.tensor(1e4 + math.log(2.0), dtype=torch.float64))
    assert res.F_kT[2] == math.inf and res.ess[2] == 0 and res.n_valid[2] == 0
    torch.testing.assert_close(res.F_kT[3], torch.tensor(-math.log(3 / 4), dtype=torch.float64))
    assert res.n_valid.tolist() == [4, 2, 0, 2]
    torch.testing.assert_close(res.ess[:2], torch.tensor([4.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(res.ess[3], torch.tensor(9 / 5, dtype=torch.float64))
    assert res.finite.tolist() == [True, True, False, True]
    # one dominant weight: ESS -> 1
    dom = pmf_labels(torch.tensor([[50.0, 0.0, 0.0, 0.0]]))
    assert dom.ess.item() == pytest.approx(1.0, abs=1e-12)


def test_pmf_labels_clipping():
    w = torch.tensor([[10.0, 5.0, 3.0, 1.0, 1.0], [4.0, 2.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    lw = torch.where(w > 0, w.log(), torch.full_like(w, -math.inf))
    res = pmf_labels(lw, clip_top_k=3)
    # row 0: 10, 5 -> 3; row 1: only two accepted, clip level = the smallest accepted (2)
    torch.testing.assert_close(
        res.F_kT, -torch.log(torch.tensor([11.0 / 5, 4.0 / 5], dtype=torch.float64))
    )
    assert (res.F_kT >= pmf_labels(lw).F_kT).all()  # clipping biases F upward
    torch.testing.assert_close(pmf_labels(lw, clip_top_k=1).F_kT, pmf_labels(lw).F_kT)  # no-op
    with pytest.raises(ValueError, match="clip_top_k"):
        pmf_labels(lw, clip_top_k=-1)
    with pytest.raises(ValueError, match=r"shape \[P, D\]"):
        pmf_labels(torch.zeros(5))


# ------------------------------------------------------------------------------------- ensemble
def _torus_F(s: torch.Tensor) -> torch.Tensor:
    return torch.cos(s[:, 0]) + 0.5 * torch.sin(s[:, 1]) + 0.3 * torch.cos(s[:, 0] + s[:, 1])


@pytest.fixture(scope="module")
def torus_fit():
    gen = torch.Generator().manual_seed(3)
    s = (2.0 * torch.rand(1000, 2, generator=gen, dtype=torch.float64) - 1.0) * math.pi
    F = 7.0 + _torus_F(s)  # an offset: the median shift must be added back
    ens = FreeEnergyEnsemble(4, [True, True], hidden=(64, 32), activation="tanh")
    t0 = time.perf_counter()
    hist = ens.fit(s, F, epochs=60, lr=1e-2, batch_size=64, seed=5)
    hist["wall"] = time.perf_counter() - t0
    return ens, hist, s, F


def test_ensemble_recovers_periodic_2d(torus_fit):
    ens, hist, _, F = torus_fit
    assert hist["n_train"] == 800 and hist["n_test"] == 200 and hist["n_dropped"] == 0
    assert hist["shift_kT"] == pytest.approx(float(F.median()))
    assert len(hist["train_loss"]) == 60 and hist["train_loss"][-1] < 0.2 * hist["train_loss"][0]
    assert hist["test_loss"][-1] < 0.01
    g = torch.linspace(-math.pi, math.pi, 25, dtype=torch.float64)
    grid = torch.cartesian_prod(g, g)
    mean, std = ens.predict(grid)
    assert mean.dtype == torch.float64 and mean.shape == std.shape == (625,)
    assert (mean - 7.0 - _torus_F(grid)).abs().mean() < 0.02
    # periodic input: s and s + 2π give the same prediction
    torch.testing.assert_close(ens.predict(grid + 2 * math.pi)[0], mean)
    # members differ (different inits and splits) but agree closely where data are
    members = ens.predict_members(grid)
    assert members.shape == (4, 625)
    assert (members[0] - members[1]).abs().max() > 1e-4
    assert std.mean() < 0.03


def test_batched_forward_equals_member_loop_and_save_load(torus_fit, tmp_path):
    ens, _, s, _ = torus_fit
    from torch.func import functional_call

    from cgflow.free_energy import _mlp

    x = s[:50]
    members = ens.predict_members(x)
    module = _mlp(ens.n_in, ens.hidden, ens.activation, ens.dtype)
    feats = ens._features(x)
    for m in range(ens.n_members):
        p = {k: v[m].detach() for k, v in ens.params.items()}
        out = functional_call(module, p, (feats,)).squeeze(-1).double() + ens.shift_kT
        torch.testing.assert_close(out, members[m])
    path = ens.save(tmp_path / "ens.pt")
    back = FreeEnergyEnsemble.load(path)
    assert (back.n_members, back.cg_periodic, back.hidden, back.activation, back.dtype) == (
        4,
        (True, True),
        (64, 32),
        "tanh",
        torch.float32,
    )
    assert back.shift_kT == ens.shift_kT
    assert torch.equal(back.predict_members(x), members)


def test_ensemble_nonperiodic_1d_std_grows_away_from_data(tmp_path):
    gen = torch.Generator().manual_seed(0)
    # Müller–Brown-like: data only around the deep minimum s ≈ -2, domain [-2.5, 1.1]
    s = -2.0 + 0.4 * (2.0 * torch.rand(300, 1, generator=gen, dtype=torch.float64) - 1.0)
    F = 4.0 * (s[:, 0] + 2.0) ** 2
    F[:7] = torch.tensor([math.inf, math.nan, -math.inf] * 2 + [math.nan])  # dropped, counted
    ens = FreeEnergyEnsemble(
        6, [False], hidden=(32, 32), activation="sigmoid", init="gaussian_uniform"
    )
    hist = ens.fit(s, F, epochs=150, lr=1e-2, batch_size=16, split="bagging", train_fraction=0.9)
    assert hist["n_dropped"] == 7 and hist["n_train"] == round(0.9 * 293)
    torch.testing.assert_close(ens.input_mean, s[7:].mean(0))
    torch.testing.assert_close(ens.input_std, s[7:].std(0, correction=0))
    near = torch.linspace(-2.3, -1.7, 13, dtype=torch.float64)[:, None]
    far = torch.linspace(-0.5, 1.1, 9, dtype=torch.float64)[:, None]
    mean_near, std_near = ens.predict(near)
    _, std_far = ens.predict(far)
    assert (mean_near - 4.0 * (near[:, 0] + 2.0) ** 2).abs().mean() < 0.03
    assert std_far.min() > 5.0 * std_near.max()
    # fixed standardisation from the domain instead of the (clustered) data
    fixed = FreeEnergyEnsemble(2, [False], hidden=(4,), input_bounds=[(-2.5, 1.1)])
    fixed.fit(s, F, epochs=1, lr=1e-3, batch_size=16)
    torch.testing.assert_close(fixed.input_mean, torch.tensor([-0.7], dtype=torch.float64))
    torch.testing.assert_close(
        fixed.input_std, torch.tensor([3.6 / math.sqrt(12.0)], dtype=torch.float64)
    )
    back = FreeEnergyEnsemble.load(fixed.save(tmp_path / "fixed.pt"))
    assert back.input_bounds == ((-2.5, 1.1),) and back.init == "xavier"
    assert torch.equal(back.predict_members(far), fixed.predict_members(far))


def test_splits():
    ens = FreeEnergyEnsemble(5, [False], hidden=(4,))
    gen = torch.Generator().manual_seed(0)
    tr, te = ens._splits(50, "fraction", 0.8, gen)
    assert tr.shape == (5, 40) and te.shape == (5, 10)
    for m in range(5):
        assert sorted(torch.cat([tr[m], te[m]]).tolist()) == list(range(50))
    assert len({tuple(sorted(t.tolist())) for t in te}) == 5  # own split per member
    tr, te = ens._splits(50, "bagging", 0.9, gen)
    assert tr.shape == (5, 45) and te.shape == (5, 5)
    assert all(torch.equal(te[0], t) for t in te)  # one shared test part
    assert not set(tr.flatten().tolist()) & set(te[0].tolist())
    assert any(len(set(t.tolist())) < 45 for t in tr)  # bootstrap: repeats


@pytest.mark.parametrize(
    ("activation", "huber_kT"), [("sigmoid", None), ("tanh", 0.5), ("silu", None), ("silu", 0.5)]
)
def test_hand_written_gradient_matches_autograd(activation, huber_kT):
    ens = FreeEnergyEnsemble(3, [True, False], hidden=(6, 5), activation=activation, init="xavier")
    ens.dtype = torch.float64  # compare in double precision
    gen = torch.Generator().manual_seed(1)
    params = {
        k: v.detach().to(torch.float64).requires_grad_(True)
        for k, v in ens._initial_params(gen).items()
    }
    x = torch.randn(3, 7, ens.n_in, generator=gen, dtype=torch.float64)
    y = torch.randn(3, 7, generator=gen, dtype=torch.float64)
    w = torch.rand(3, 7, generator=gen, dtype=torch.float64) + 0.1
    loss, grad = ens._loss_and_grad(params, x, y, w, huber_kT)
    r = ens._forward(params, x) - y
    a = r.abs()
    pen = (
        r**2 if huber_kT is None else torch.where(a < huber_kT, r**2, huber_kT * (2 * a - huber_kT))
    )
    ref_loss = (w * pen).sum(dim=1) / w.sum(dim=1)
    ref_grad = torch.autograd.grad(ref_loss.sum(), list(params.values()))
    torch.testing.assert_close(loss, ref_loss.detach())
    torch.testing.assert_close(grad, torch.cat([g.reshape(3, -1) for g in ref_grad], dim=1))
    assert (huber_kT is None) or bool((a > huber_kT).any())  # the linear branch is exercised


def test_vector_adam_matches_torch_adam_and_skips():
    from cgflow.free_energy import _VectorAdam

    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(3, 8, generator=gen)  # three members' flattened parameters
    flat = p0.clone()
    ref = [torch.nn.Parameter(p0[m].clone()) for m in range(3)]
    opt = torch.optim.Adam(ref, lr=0.05)
    vadam = _VectorAdam(flat, lr=0.05)
    for step in range(8):
        g = torch.randn(3, 8, generator=gen)
        # all members step together at first, then member 1 skips odd steps
        ok = torch.tensor([True, step < 3 or step % 2 == 0, True])
        vadam.step(g, ok)
        for m in range(3):
            ref[m].grad = g[m].clone() if ok[m] else None  # Adam ignores params without grad
        opt.step()
    for m in range(3):
        torch.testing.assert_close(flat[m], ref[m].detach())


def test_ensemble_bad_input():
    with pytest.raises(ValueError, match="n_members >= 2"):
        FreeEnergyEnsemble(1, [True])
    with pytest.raises(ValueError, match="unknown activation"):
        FreeEnergyEnsemble(2, [True], activation="relu6")
    with pytest.raises(ValueError, match="unknown init"):
        FreeEnergyEnsemble(2, [True], init="orthogonal")
    ens = FreeEnergyEnsemble(2, [True, False], hidden=(8,))
    with pytest.raises(RuntimeError, match="not been fitted"):
        ens.predict(torch.zeros(3, 2))
    s = torch.zeros(10, 2)
    with pytest.raises(ValueError, match="same P"):
        ens.fit(s, torch.zeros(9), epochs=1, lr=1e-3, batch_size=4)
    with pytest.raises(ValueError, match=r"shape \[P, 2\]"):
        ens.fit(torch.zeros(10, 3), torch.zeros(10), epochs=1, lr=1e-3, batch_size=4)
    with pytest.raises(ValueError, match="all 10 labels are non-finite"):
        ens.fit(s, torch.full((10,), math.nan), epochs=1, lr=1e-3, batch_size=4)
    with pytest.raises(ValueError, match="non-finite CG"):
        ens.fit(s.clone().fill_(math.inf), torch.zeros(10), epochs=1, lr=1e-3, batch_size=4)
    with pytest.raises(ValueError, match="unknown split"):
        ens.fit(s, torch.zeros(10), epochs=1, lr=1e-3, batch_size=4, split="kfold")
    ens.fit(torch.rand(10, 2), torch.rand(10), epochs=2, lr=1e-3, batch_size=4)
    with pytest.raises(ValueError, match=r"shape \[P, 2\]"):
        ens.predict(torch.zeros(3))


def test_non_finite_batches_are_skipped_per_member():
    # a label of 1e25 kT overflows the float32 MSE: batches containing it are skipped
    s = torch.linspace(-1.0, 1.0, 20, dtype=torch.float64)[:, None]
    F = s[:, 0] ** 2
    F[3] = 1e25
    ens = FreeEnergyEnsemble(3, [False], hidden=(8,), activation="silu")
    hist = ens.fit(s, F, epochs=5, lr=1e-2, batch_size=4, seed=1)
    assert hist["n_skipped"] > 0
    mean, std = ens.predict(s)
    assert torch.isfinite(mean).all() and torch.isfinite(std).all()


def test_pooled_draws_of_two_proposals_are_unbiased_and_a_wrong_combination_is_caught():
    """Target exp(−x²/2), Z = sqrt(2π); draws from two different Gaussians (two "flows").
    Pooling the weights (draw-count weighting) is unbiased for Z; averaging the two labels F
    (a geometric mean of the Z estimates) is not, and the test sees it."""
    from cgflow.free_energy import WeightSums

    gen = torch.Generator().manual_seed(0)
    R, d1, d2 = 20_000, 8, 24
    Z = math.sqrt(2 * math.pi)

    def log_w(n, mu, sigma):
        x = mu + sigma * torch.randn(R, n, generator=gen, dtype=torch.float64)
        log_q = -0.5 * ((x - mu) / sigma) ** 2 - math.log(sigma * math.sqrt(2 * math.pi))
        return -0.5 * x**2 - log_q

    a, b = log_w(d1, 0.0, 1.5), log_w(d2, 0.4, 0.9)
    pooled = WeightSums.from_log_weights(a) + WeightSums.from_log_weights(b)
    z_hat = torch.exp(-pooled.labels().F_kT)
    err = (z_hat.mean() - Z) / (z_hat.std() / math.sqrt(R))
    assert abs(float(err)) < 4.0
    # the sums are exactly those of all draws at once
    both = WeightSums.from_log_weights(torch.cat([a, b], dim=1)).labels()
    torch.testing.assert_close(pooled.labels().F_kT, both.F_kT)
    assert int(pooled.n_draws[0]) == d1 + d2
    # the standard error (RMS over replicates) matches the spread of F (within 15 %)
    F, se = pooled.labels().F_kT, pooled.labels().se_kT
    assert abs(float(se.pow(2).mean().sqrt()) / float(F.std()) - 1) < 0.15
    # deliberately wrong: the mean of the two labels
    wrong = 0.5 * (pmf_labels(a).F_kT + pmf_labels(b).F_kT)
    z_wrong = torch.exp(-wrong)
    err_wrong = (z_wrong.mean() - Z) / (z_wrong.std() / math.sqrt(R))
    assert abs(float(err_wrong)) > 8.0


def test_debiased_labels_remove_the_jensen_bias_of_few_draws():
    """Log-normal weights w = exp(g), g ~ N(0, 1): exact F = −1/2. With 16 draws the label
    −log(mean w) is too high by about (e − 1)/32 ≈ 0.05 kT; F − se²/2 leaves a small fraction
    of that, and shifting the other way (a sign error) doubles it."""
    from cgflow.free_energy import debiased_labels, fit_ensemble

    gen = torch.Generator().manual_seed(5)
    R, D = 40_000, 16
    lab = pmf_labels(torch.randn(R, D, generator=gen, dtype=torch.float64))
    stderr = float(lab.F_kT.std()) / math.sqrt(R)
    bias = float(lab.F_kT.mean()) + 0.5
    assert bias > 0.035 and bias > 10 * stderr
    fixed = debiased_labels(lab.F_kT, lab.se_kT)
    assert abs(float(fixed.mean()) + 0.5) < 0.3 * bias
    wrong = lab.F_kT + 0.5 * lab.se_kT**2
    assert float(wrong.mean()) + 0.5 > 1.8 * bias
    # labels without a finite error are left alone; the fit refuses debias without errors
    out = debiased_labels(torch.tensor([1.0, 2.0]), torch.tensor([math.inf, 0.2]))
    torch.testing.assert_close(out, torch.tensor([1.0, 1.98], dtype=torch.float64))
    settings = {"n_members": 2, "hidden": [4], "activation": "sigmoid", "init": "xavier"}
    settings |= {"weighting": "uniform", "debias": True}
    with pytest.raises(ValueError, match=r"ensemble\.debias True needs the labels' se_kT"):
        fit_ensemble(settings, [True], torch.zeros(4, 1), torch.zeros(4), seed=0)


def test_weight_sums_of_ragged_draws():
    """`from_draws` with any number of draws per point (none too) gives the per-point sums."""
    from cgflow.free_energy import WeightSums

    gen = torch.Generator().manual_seed(3)
    counts = torch.tensor([3, 0, 1, 7])
    point = torch.arange(4).repeat_interleave(counts)
    lw = 50.0 * torch.randn(len(point), generator=gen, dtype=torch.float64)
    lw[2] = -math.inf  # a rejected draw
    sums = WeightSums.from_draws(point, lw, 4)
    for i in range(4):
        mine = lw[point == i]
        if len(mine) == 0:
            assert sums.n_draws[i] == 0 and sums.log_sum_w[i] == -math.inf
            continue
        assert sums.n_draws[i] == len(mine)
        assert sums.n_valid[i] == int(torch.isfinite(mine).sum())
        torch.testing.assert_close(sums.log_sum_w[i], torch.logsumexp(mine, 0))
        torch.testing.assert_close(sums.log_sum_w2[i], torch.logsumexp(2 * mine, 0))
    with pytest.raises(ValueError, match="indices"):
        WeightSums.from_draws(point, lw, 3)


@pytest.mark.parametrize("rule", ["proportional", "new_first", "equal_error"])
def test_allocate_draws_goes_to_populated_points_with_large_errors(rule):
    from cgflow.free_energy import allocate_draws

    F = torch.tensor([0.0, 1.0, 2.0, 12.0, 0.5, 20.0], dtype=torch.float64)
    se = torch.tensor([0.3, 0.05, 0.2, 0.6, math.inf, math.inf], dtype=torch.float64)
    n = torch.tensor([64, 64, 64, 64, 0, 0])
    kw = dict(draws=64, target_se_kT=0.1, min_draws=8, max_draws=512, populated_kT=8.0, rule=rule)
    c = allocate_draws(F, se, n, budget=64 * 6, **kw)
    assert int(c.sum()) <= 64 * 6
    assert c[1] == 8 and c[3] == 8 and c[5] == 8  # on target; high F (labelled or not)
    assert c[0] > c[2] > 8 and c[4] > 8  # populated: larger error, more draws; new point
    # a generous budget: exactly the draws that bring the error to the target (capped)
    c = allocate_draws(F, se, n, budget=10_000, **kw)
    assert c[0] == 512 and c[2] == math.ceil(64 * (4 - 1)) and c[4] == 64
    with pytest.raises(ValueError, match="budget"):
        allocate_draws(F, se, n, budget=40, **kw)


def test_equal_error_allocation_serves_new_points_then_the_largest_errors():
    from cgflow.free_energy import allocate_draws

    F = torch.tensor([0.0, 1.0, 2.0, 12.0, 0.5, 20.0, 0.2], dtype=torch.float64)
    se = torch.tensor([0.3, 0.05, 0.2, 0.6, math.inf, math.inf, 0.12], dtype=torch.float64)
    n = torch.tensor([64, 64, 64, 64, 0, 0, 64])
    kw = dict(draws=64, target_se_kT=0.1, min_draws=8, max_draws=512, populated_kT=8.0)
    budget = 64 * 7
    c = allocate_draws(F, se, n, budget=budget, rule="equal_error", **kw)
    p = allocate_draws(F, se, n, budget=budget, rule="proportional", **kw)
    assert c[4] == 64 > p[4]  # the new populated point gets its draws in full
    assert c[1] == c[3] == c[5] == 8
    assert budget - 7 < int(c.sum()) <= budget  # the budget is spent, to a draw per point
    # the labelled populated points above a common error level end at it (to a draw); the
    # one already below it (0.12 kT) keeps min_draws
    after = se * torch.sqrt(n / (n + c))
    level = after[[0, 2]]
    assert float(level.max() - level.min()) < 0.003 and float(level.min()) > 0.12
    assert c[6] == 8
    # proportional scaling also spends draws on the point already below that level
    assert p[6] > c[6]
    # new_first: the new point gets its draws, the labelled ones share the rest proportionally
    f = allocate_draws(F, se, n, budget=budget, rule="new_first", **kw)
    assert f[4] == 64 and f[1] == f[3] == f[5] == 8 and int(f.sum()) <= budget
    extra = (f - 8)[[0, 2, 6]].double()
    request = torch.tensor([64 * 8 - 8, 64 * 3 - 8, math.ceil(64 * 0.44) - 8]).double()
    torch.testing.assert_close(extra / extra.sum(), request / request.sum(), atol=0.01, rtol=0)
    # new points alone over the budget: they share it, the labelled ones get min_draws
    c = allocate_draws(F, se, n, budget=8 * 7 + 20, rule="equal_error", **kw)
    assert c[4] == 28 and int(c.sum()) == 8 * 7 + 20
    with pytest.raises(ValueError, match="allocation rule"):
        allocate_draws(F, se, n, budget=budget, rule="greedy", **kw)


def test_weighted_fit_ignores_down_weighted_labels_and_early_stopping_keeps_the_best():
    s = torch.linspace(-2.0, 2.0, 200, dtype=torch.float64)[:, None]
    F = s[:, 0] ** 2
    bad = (s[:, 0] > 0.5) & (s[:, 0] < 1.0)
    F_noisy = torch.where(bad, F + 4.0, F)
    w = torch.where(bad, torch.full_like(F, 1e-4), torch.ones_like(F))
    err = {}
    for name, weights in (("uniform", None), ("weighted", w)):
        ens = FreeEnergyEnsemble(3, [False], hidden=(32, 32), activation="silu")
        ens.fit(s, F_noisy, epochs=300, lr=1e-2, batch_size=32, seed=0, weights=weights)
        err[name] = float((ens.predict(s[bad])[0] - F[bad]).abs().mean())
    assert err["weighted"] < 0.5 < 2.0 < err["uniform"]
    ens = FreeEnergyEnsemble(3, [False], hidden=(32, 32), activation="silu")
    h = ens.fit(s, F, epochs=400, lr=1e-2, batch_size=32, seed=0, patience=10)
    n_run = len(h["test_loss"])
    assert n_run < 400 and max(h["best_epoch"]) <= n_run
    members = torch.tensor(h["test_loss_members"])  # [epochs, M]
    best = members.min(dim=0).values
    assert (members.argmin(dim=0) + 1).tolist() == h["best_epoch"]
    with pytest.raises(ValueError, match="patience"):
        ens.fit(s, F, epochs=5, lr=1e-2, batch_size=32, patience=0)
    with pytest.raises(ValueError, match="weights"):
        ens.fit(s, F, epochs=5, lr=1e-2, batch_size=32, weights=-torch.ones_like(F))
    assert torch.isfinite(best).all()


def test_log_weight_gap_is_zero_for_a_perfect_flow_and_grows_with_the_mismatch():
    """log mean w − median log w per point: 0 with equal weights, about σ²/2 for log-normal
    weights of spread σ, inf when half the draws are rejected, NaN without draws; any order
    of the draws and of the points."""
    g = torch.Generator().manual_seed(0)
    n = 4000
    lw = torch.cat(
        [
            torch.full((n,), -3.0),
            0.5 * torch.randn(n, generator=g),
            2.0 * torch.randn(n, generator=g),
        ]
    )
    point = torch.arange(3).repeat_interleave(n)
    perm = torch.randperm(3 * n, generator=g)
    gap = log_weight_gap(point[perm], lw[perm], 5)
    assert gap[0] == pytest.approx(0.0, abs=1e-12)
    assert gap[1] == pytest.approx(0.5**2 / 2, abs=0.03)
    assert gap[2] == pytest.approx(2.0**2 / 2, abs=0.3)
    assert torch.isnan(gap[3:]).all()
    rejected = log_weight_gap(
        torch.zeros(4, dtype=torch.int64), torch.tensor([0.0, 1.0, -math.inf, -math.inf]), 1
    )
    assert torch.isinf(rejected).all()
