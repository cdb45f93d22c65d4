"""MC walkers, farthest-point selection, spreading and splits (cgflow.sampling)."""

import math

import pytest
import torch

from cgflow.sampling import (
    cg_walkers,
    farthest_point_selection,
    periodic_difference,
    split_points,
    spread,
    wrap,
)

PI = math.pi
TORUS = ((-PI, PI), (-PI, PI))


class Field:
    """A predictor ``s -> (F̄, σ)`` from two functions, checking and counting its inputs."""

    def __init__(self, F, sigma, lo=None, hi=None):
        self.F, self.sigma, self.lo, self.hi = F, sigma, lo, hi
        self.n_points = 0

    def __call__(self, s):
        if self.lo is not None:
            assert (s >= torch.tensor(self.lo, dtype=s.dtype)).all()
        if self.hi is not None:
            assert (s <= torch.tensor(self.hi, dtype=s.dtype)).all()
        self.n_points += s.shape[0]
        return self.F(s), self.sigma(s)


def double_well(s):
    return 2.0 * (s[:, 0] ** 2 - 1.0) ** 2 + 0.5 * s[:, 1] ** 2


def test_walkers_stop_where_std_is_high_on_double_well():
    # std high only in the right well (x > 0.8); walkers start in the left well
    field = Field(
        double_well,
        lambda s: torch.where(s[:, 0] > 0.8, 1.0, 0.01).to(s.dtype),
        lo=(-3.0, -3.0),
        hi=(3.0, 3.0),
    )
    starts = torch.tensor([[-1.0, 0.0]]).repeat(40, 1)
    res = cg_walkers(
        field,
        starts,
        periodic=(False, False),
        bounds=((-3.0, 3.0), (-3.0, 3.0)),
        step_size=0.2,
        threshold_kT=0.5,
        n_wanted=10,
        max_steps=20_000,
        seed=1,
    )
    assert not res.exhausted and res.points.shape == (10, 2)
    assert (res.points[:, 0] > 0.8).all()
    assert res.steps_used == int(res.stop_steps.max())
    assert res.n_evaluations == field.n_points  # starts + in-bounds proposals of running walkers
    assert 0.0 < res.acceptance < 1.0
    # earliest first, ties by walker index
    key = res.stop_steps * 1000 + res.walker_index
    assert torch.equal(key, key.sort().values)


def test_walkers_sample_exp_minus_beta_F():
    # σ high everywhere and min_steps = 150: every walker stops at step 151, so the stopped points
    # are the chains' states after 151 steps (started at 0): samples of exp(-beta F̄)
    field = Field(
        lambda s: 2.0 * s[:, 0] ** 2 + 0.0 * s[:, 1],
        lambda s: torch.ones(s.shape[0], dtype=s.dtype),
        lo=(-PI, -1.0),
        hi=(PI, 1.0),
    )
    res = cg_walkers(
        field,
        torch.zeros(3000, 2),
        periodic=(False, False),
        bounds=((-PI, PI), (-1.0, 1.0)),
        step_size=0.5,
        threshold_kT=0.5,
        n_wanted=3000,
        max_steps=1000,
        min_steps=150,
        beta=2.0,
    )
    assert res.stop_steps.unique().tolist() == [151]
    # harmonic in s0 with beta k = 2 * 4: variance 1/8; flat in s1 on [-1, 1]: uniform (variance 1/3)
    assert res.points[:, 0].var().item() == pytest.approx(1 / 8, rel=0.08)
    assert res.points[:, 1].var().item() == pytest.approx(1 / 3, rel=0.08)
    assert res.points[:, 1].abs().max() <= 1.0


def test_walkers_return_earliest_by_step_not_by_index():
    # flat F̄; std high for x > 1; walker i starts at x = 1 - 0.15 (W - i): high indices are close
    field = Field(
        lambda s: torch.zeros(s.shape[0], dtype=s.dtype),
        lambda s: (s[:, 0] > 1.0).to(s.dtype),
    )
    W = 12
    starts = (1.0 - 0.15 * (W - torch.arange(W, dtype=torch.float64)))[:, None]
    kw = dict(
        periodic=(False,), bounds=None, step_size=0.1, threshold_kT=0.5, max_steps=50_000, seed=4
    )
    full = cg_walkers(field, starts, n_wanted=W, **kw)
    assert not full.exhausted and sorted(full.walker_index.tolist()) == list(range(W))
    # proposals are drawn for every walker at every step, so the trajectories are the same
    part = cg_walkers(field, starts, n_wanted=3, **kw)
    assert torch.equal(part.walker_index, full.walker_index[:3])
    assert torch.equal(part.stop_steps, full.stop_steps[:3])
    assert part.walker_index.tolist() != [0, 1, 2]
    assert part.steps_used == int(full.stop_steps[2])


def test_walkers_min_steps_and_exhausted():
    high = Field(
        lambda s: torch.zeros(s.shape[0], dtype=s.dtype),
        lambda s: torch.ones(s.shape[0], dtype=s.dtype),
    )
    starts = torch.zeros(5, 2)
    res = cg_walkers(
        high, starts, (True, True), TORUS, 0.1, 0.5, n_wanted=5, max_steps=100, min_steps=10
    )
    assert res.stop_steps.tolist() == [11] * 5 and res.walker_index.tolist() == list(range(5))
    low = Field(
        lambda s: torch.zeros(s.shape[0], dtype=s.dtype),
        lambda s: torch.zeros(s.shape[0], dtype=s.dtype),
    )
    res = cg_walkers(low, starts, (True, True), TORUS, 0.1, 0.5, n_wanted=2, max_steps=50)
    assert res.exhausted and res.points.shape == (0, 2) and res.steps_used == 50
    assert res.n_evaluations == 5 * 51
    # partially exhausted: only the walker sitting in a tiny high-std spot stops
    spot = Field(
        lambda s: torch.zeros(s.shape[0], dtype=s.dtype),
        lambda s: ((s - 2.0).norm(dim=1) < 0.5).to(s.dtype),
    )
    starts = torch.tensor([[2.0, 2.0], [-2.0, -2.0], [-2.0, 0.0]])
    res = cg_walkers(spot, starts, (True, True), TORUS, 0.01, 0.5, n_wanted=2, max_steps=20)
    assert res.exhausted and res.walker_index.tolist() == [0] and res.stop_steps.tolist() == [1]
    with pytest.raises(ValueError, match="n_wanted"):
        cg_walkers(spot, starts, (True, True), TORUS, 0.1, 0.5, n_wanted=4, max_steps=5)


def test_mass_weighted_walkers_stop_only_where_an_error_costs_mass():
    """σ = 0.5 everywhere; F̄ = 5|s|². Plain: every walker stops after min_steps wherever it is.
    With T = 1 kT and threshold 0.3 a walker stops only where 0.5 exp(−F̄) > 0.3, F̄ < 0.51."""
    field = Field(
        lambda s: 5.0 * (s**2).sum(dim=1),
        lambda s: torch.full((s.shape[0],), 0.5, dtype=s.dtype),
    )
    starts = torch.full((50, 2), 1.0, dtype=torch.float64)  # F̄ = 10 kT
    kw = dict(n_wanted=20, max_steps=2000, min_steps=5, beta=0.2, seed=1)
    plain = cg_walkers(field, starts, (True, True), TORUS, 0.1, 0.3, **kw)
    assert (field(plain.points)[0] > 3.0).any()
    mass = cg_walkers(field, starts, (True, True), TORUS, 0.1, 0.3, mass_temperature_kT=1.0, **kw)
    assert not mass.exhausted and (field(mass.points)[0] < -math.log(0.6) + 1e-9).all()
    with pytest.raises(ValueError, match="mass_temperature_kT"):
        cg_walkers(field, starts, (True, True), TORUS, 0.1, 0.3, mass_temperature_kT=0.0, **kw)


def test_novelty_stops_walkers_where_no_labelled_point_is_near():
    """σ = 0 everywhere, so disagreement alone never stops a walker (exhausted); with labelled
    points around (0, 0) and a novelty radius of 0.5, walkers stop as soon as they leave that
    disk (after min_steps), across the periodic seam too."""
    field = Field(
        lambda s: torch.zeros(s.shape[0], dtype=s.dtype),
        lambda s: torch.zeros(s.shape[0], dtype=s.dtype),
    )
    known = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, -0.1]], dtype=torch.float64)
    starts = torch.zeros(40, 2, dtype=torch.float64)
    kw = dict(n_wanted=10, max_steps=3000, min_steps=3, seed=2)
    plain = cg_walkers(field, starts, (True, True), TORUS, 0.1, 0.1, **kw)
    assert plain.exhausted and len(plain.points) == 0
    novel = cg_walkers(
        field, starts, (True, True), TORUS, 0.1, 0.1, novelty_points=known, novelty_radius=0.5, **kw
    )
    assert not novel.exhausted and len(novel.points) == 10
    d = periodic_difference(novel.points[:, None], known[None], (True, True), TORUS)
    nearest = torch.linalg.vector_norm(d, dim=-1).min(dim=1).values
    assert (nearest > 0.5).all() and (nearest < 0.5 + 4 * 0.1 * 2).all()
    assert (novel.stop_steps > 3).all()
    # a known point just across the seam counts as near
    seam = torch.tensor([[PI - 0.05, 0.0]], dtype=torch.float64)
    at_seam = torch.tensor([[-PI + 0.05, 0.0]], dtype=torch.float64).expand(10, 2)
    near = cg_walkers(
        field,
        at_seam,
        (True, True),
        TORUS,
        1e-6,
        0.1,
        n_wanted=1,
        max_steps=20,
        novelty_points=seam,
        novelty_radius=0.5,
    )
    assert near.exhausted
    with pytest.raises(ValueError, match="together"):
        cg_walkers(field, starts, (True, True), TORUS, 0.1, 0.1, novelty_radius=0.5, **kw)
    with pytest.raises(ValueError, match="novelty_radius"):
        cg_walkers(
            field,
            starts,
            (True, True),
            TORUS,
            0.1,
            0.1,
            novelty_points=known,
            novelty_radius=0.0,
            **kw,
        )


def test_walkers_wrap_across_the_seam():
    # start at φ = 3.0; std high only in φ ∈ [-3.0, -2.6]: reachable fast only through ±π
    field = Field(
        lambda s: torch.zeros(s.shape[0], dtype=s.dtype),
        lambda s: ((s[:, 0] > -3.0) & (s[:, 0] < -2.6)).to(s.dtype),
        lo=(-PI, -PI),
        hi=(PI, PI),
    )
    starts = torch.tensor([[3.0, 0.0]]).repeat(30, 1)
    res = cg_walkers(
        field, starts, (True, True), TORUS, 0.1, 0.5, n_wanted=15, max_steps=2000, seed=2
    )
    assert not res.exhausted
    assert ((res.points[:, 0] > -3.0) & (res.points[:, 0] < -2.6)).all()
    assert res.stop_steps.max() < 200  # the long way round (5.6 rad) takes ~3000 steps
    assert ((res.points >= -PI) & (res.points < PI)).all()


def test_walkers_respect_nonperiodic_bounds():
    # flat F̄ on [-2.5, 1.1]; the only high-std spot is outside the box
    field = Field(
        lambda s: torch.zeros(s.shape[0], dtype=s.dtype),
        lambda s: (s[:, 0] > 1.1).to(s.dtype),
        lo=(-2.5,),
        hi=(1.1,),
    )
    starts = torch.full((20, 1), 1.05)
    res = cg_walkers(field, starts, (False,), ((-2.5, 1.1),), 0.2, 0.5, n_wanted=1, max_steps=300)
    assert res.exhausted and res.points.shape == (0, 1)
    assert res.n_evaluations < 20 * 301  # out-of-bounds proposals were rejected unevaluated
    with pytest.raises(ValueError, match="outside the bounds"):
        cg_walkers(field, starts + 1.0, (False,), ((-2.5, 1.1),), 0.2, 0.5, 1, 10)


# --------------------------------------------------------------------------------------- geometry
def test_wrap_and_periodic_difference():
    x = torch.tensor(
        [[PI, -PI, 3 * PI + 0.1], [0.0, 7.0, -7.0]], dtype=torch.float64
    ).T  # 3 points, 2 coordinates
    w = wrap(x, (True, False))
    assert ((w[:, 0] >= -PI) & (w[:, 0] < PI)).all()
    torch.testing.assert_close(w[:, 1], x[:, 1])
    torch.testing.assert_close(w[:, 0], torch.tensor([-PI, -PI, -PI + 0.1], dtype=torch.float64))
    # a general periodic interval [0, 10)
    torch.testing.assert_close(
        wrap(torch.tensor([[-1.0], [10.0], [25.0]]), (True,), ((0.0, 10.0),))[:, 0],
        torch.tensor([9.0, 0.0, 5.0], dtype=torch.float64),
    )
    a, b = torch.tensor([[-3.1]], dtype=torch.float64), torch.tensor([[3.1]], dtype=torch.float64)
    d = periodic_difference(a, b, (True,))
    torch.testing.assert_close(d, torch.tensor([[2 * PI - 6.2]], dtype=torch.float64))
    d = periodic_difference(a, b, (False,))
    torch.testing.assert_close(d, torch.tensor([[-6.2]], dtype=torch.float64))


def test_farthest_point_selection_spreads_and_is_seeded():
    gen = torch.Generator().manual_seed(0)
    cluster = 0.05 * torch.randn(50, 2, generator=gen, dtype=torch.float64)
    corners = torch.tensor([[2.0, 2.0], [-2.0, 2.0], [2.0, -2.0], [-2.0, -2.0]])
    pts = torch.cat([cluster, corners.double()])
    idx = farthest_point_selection(pts, 5, (False, False), seed=3)
    assert len(set(idx.tolist())) == 5 and {50, 51, 52, 53} <= set(idx.tolist())
    assert torch.equal(idx, farthest_point_selection(pts, 5, (False, False), seed=3))
    firsts = {int(farthest_point_selection(pts, 1, (False, False), seed=k)[0]) for k in range(8)}
    assert len(firsts) > 1  # a random first point
    assert sorted(farthest_point_selection(pts, 54, (False, False)).tolist()) == list(range(54))
    with pytest.raises(ValueError, match="cannot select"):
        farthest_point_selection(pts, 55, (False, False))


def test_farthest_point_selection_periodic_seam_and_exclude():
    pts = torch.tensor([[-3.1], [0.0], [3.1]])
    # existing point at 3.1: -3.1 is its neighbour across the seam, so 0.0 is the farthest
    idx = farthest_point_selection(pts, 1, (True,), exclude=torch.tensor([[3.1]]))
    assert idx.tolist() == [1]
    idx = farthest_point_selection(pts, 1, (False,), exclude=torch.tensor([[3.1]]))
    assert idx.tolist() == [0]  # without periodicity -3.1 looks farthest
    # exclude keeps the selection away from points already in the dataset
    gen = torch.Generator().manual_seed(1)
    cand = (2.0 * torch.rand(400, 2, generator=gen, dtype=torch.float64) - 1.0) * PI
    existing = torch.tensor([[0.0, 0.0], [1.0, 1.0], [-2.0, 2.5]], dtype=torch.float64)
    idx = farthest_point_selection(cand, 10, (True, True), TORUS, exclude=existing)
    dist = periodic_difference(cand[idx][:, None], existing[None], (True, True)).norm(dim=-1)
    assert dist.min() > 0.8
    free = farthest_point_selection(cand, 10, (True, True), TORUS, seed=0)
    dist_free = periodic_difference(cand[free][:, None], existing[None], (True, True)).norm(dim=-1)
    assert dist.min() > dist_free.min()


# --------------------------------------------------------------------------------------- spread
def test_spread_disk_statistics_and_wrap():
    centres = torch.tensor([[0.0, 0.0], [3.0, -3.0]])
    pts = spread(centres, 4000, 0.6, "disk", (True, True), TORUS, seed=0)
    assert pts.shape == (8000, 2)
    assert ((pts >= -PI) & (pts < PI)).all()
    groups = torch.arange(2).repeat_interleave(4000)
    d = periodic_difference(pts, centres[groups], (True, True))
    r = d.norm(dim=1)
    assert r.max() <= 0.6 + 1e-12
    u = (r / 0.6) ** 2  # uniform on [0, 1] for a uniform disk
    assert u.mean().item() == pytest.approx(0.5, abs=0.015)
    assert (u < 0.25).double().mean().item() == pytest.approx(0.25, abs=0.02)
    angle = torch.atan2(d[:, 1], d[:, 0])
    assert angle.cos().mean().abs() < 0.03 and angle.sin().mean().abs() < 0.03
    assert (pts[4000:, 0] < -2.5).any() and (pts[4000:, 1] > 2.5).any()  # wrapped across ±π
    # general n-D ball: r/R ~ U^(1/3) in 3-D
    p3 = spread(torch.zeros(1, 3), 4000, 1.0, "disk", (False,) * 3, seed=1)
    assert ((p3.norm(dim=1) ** 3).mean().item()) == pytest.approx(0.5, abs=0.015)
    assert torch.equal(pts, spread(centres, 4000, 0.6, "disk", (True, True), TORUS, seed=0))


def test_spread_gaussian_uniform_and_bounds():
    g = spread(torch.tensor([[0.5, -0.5]]), 5000, 0.3, "gaussian", (False, False), seed=2)
    torch.testing.assert_close(
        g.mean(0), torch.tensor([0.5, -0.5], dtype=torch.float64), atol=0.015, rtol=0
    )
    torch.testing.assert_close(
        g.std(0), torch.full((2,), 0.3, dtype=torch.float64), atol=0.01, rtol=0
    )
    # Müller–Brown style: 1-D interval s ± 0.5 near the lower bound -2.5: redrawn, not clipped
    u = spread(torch.tensor([[-2.4]]), 3000, 0.5, "uniform", (False,), ((-2.5, 1.1),), seed=3)
    assert (u >= -2.5).all() and (u <= -1.9).all()
    assert (u == -2.5).sum() == 0  # no pile-up on the bound
    hist = torch.histc(u[:, 0].float(), bins=6, min=-2.5, max=-1.9)
    assert hist.min() > 0.8 * hist.max()  # flat (uniform on [-2.5, -1.9])
    with pytest.raises(ValueError, match="outside the bounds"):
        spread(torch.tensor([[-3.0]]), 10, 0.5, "uniform", (False,), ((-2.5, 1.1),))
    with pytest.raises(ValueError, match="unknown spread kind"):
        spread(torch.tensor([[0.0]]), 10, 0.5, "ring", (False,))


# ---------------------------------------------------------------------------------------- splits
def test_split_points():
    tr, te = split_points(100, 0.2, seed=0)
    assert te.numel() == 20 and tr.numel() == 80
    assert sorted(torch.cat([tr, te]).tolist()) == list(range(100))
    assert torch.equal(te, split_points(100, 0.2, seed=0)[1])
    assert not torch.equal(te, split_points(100, 0.2, seed=1)[1])
    assert split_points(3, 0.1, seed=0)[1].numel() == 1  # at least one test point
