import math
import time

import numpy as np
import pytest
import torch

from cgflow.coordinates import wrap_angle
from cgflow.flows import (
    ConditionalAffine1D,
    ConditionalFlow,
    InternalScaling,
    assemble,
    build_flow,
    load_flow,
    load_optimizer,
    save_flow,
    scaling_for,
    split,
)
from cgflow.systems import get_system

CIRC4 = [True, False, True, False]


def small_flow(dtype: str = "float64", scaled: bool = True, **kw) -> ConditionalFlow:
    """dim 4 (2 circular), 2 periodic CG coordinates, optionally with a non-trivial scaling."""
    scaling = None
    if scaled:
        scaling = InternalScaling([2.5, 0.15, -3.0, 1.9], [1.0, 0.005, 1.0, 0.2], CIRC4)
    opts = {"n_blocks": 4, "hidden": 16, "dtype": dtype, "scaling": scaling, **kw}
    return ConditionalFlow(4, CIRC4, [True, True], **opts)


def perturb(module: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def cg_points(n: int, dtype: torch.dtype = torch.float64, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (2 * torch.rand(n, 2, generator=g, dtype=dtype) - 1) * math.pi


# ------------------------------------------------------------------------------ scaling
def test_internal_scaling_roundtrip_and_wrap():
    sc = InternalScaling([3.0, 0.1], [1.0, 0.005], [True, False])
    x = torch.tensor([[-3.0, 0.11], [2.9, 0.09]], dtype=torch.float64)
    u, ld = sc(x)
    # circular: wrap(x - ref); -3 - 3 = -6 -> 2pi - 6
    torch.testing.assert_close(u[:, 0], torch.tensor([2 * math.pi - 6.0, -0.1], dtype=u.dtype))
    torch.testing.assert_close(u[:, 1], torch.tensor([2.0, -2.0], dtype=u.dtype))
    torch.testing.assert_close(ld, torch.full((2,), -math.log(0.005), dtype=u.dtype))
    xb, ldi = sc.inverse(u)
    torch.testing.assert_close(xb, x)
    torch.testing.assert_close(ldi, -ld)
    with pytest.raises(ValueError, match="std must be 1"):
        InternalScaling([0.0], [0.5], [True])


def test_scaling_for_aldp(aldp):
    x0, _ = aldp.initial_configuration()
    sc = scaling_for(aldp)
    fg = list(aldp.fg_indices)
    assert sc.dim == 58
    assert _index_set(sc.circular) == {5, 8, 19, 22, 25, 28, 31, 45, 48, 51}
    std = dict(zip(fg, sc.std.tolist(), strict=True))
    assert std[0] == std[3] == 0.005  # bonds
    assert std[2] == std[4] == 0.15  # angles
    assert std[11] == std[59] == 0.2  # non-circular dihedrals
    assert std[5] == std[26] == 1.0  # circular dihedrals
    z0 = aldp.to_internal(torch.as_tensor(x0)[None])
    u, _ = sc(z0[:, fg])
    assert u.abs().max() < 1e-12  # the reference maps to the origin


def _index_set(mask: torch.Tensor) -> set[int]:
    return set(torch.nonzero(mask).flatten().tolist())


def test_assemble_split_roundtrip(aldp):
    z = torch.randn(3, 60, dtype=torch.float64)
    s, x = split(aldp, z)
    assert s.shape == (3, 2) and x.shape == (3, 58)
    torch.testing.assert_close(assemble(aldp, s, x), z)
    with pytest.raises(ValueError, match="assemble"):
        assemble(aldp, s, x[:, :10])


# -------------------------------------------------------------------- spline flow maths
def test_identity_at_initialisation():
    flow = small_flow()
    s = cg_points(64)
    x, log_q = flow.sample(s, generator=torch.Generator().manual_seed(5))
    u = flow.sample_base(64, generator=torch.Generator().manual_seed(5))
    x_ref, _ = flow.scaling.inverse(u)
    assert (x - x_ref).abs().max() < 1e-5
    expected = flow.base_log_prob(u) + flow.scaling.log_det
    assert (log_q - expected).abs().max() < 1e-5
    assert (flow.log_prob(x, s) - log_q).abs().max() < 1e-5


def test_log_prob_matches_sample_float64():
    flow = small_flow()
    perturb(flow)
    s = cg_points(256)
    x, log_q = flow.sample(s, generator=torch.Generator().manual_seed(0))
    # the perturbation made the flow far from the identity
    u = flow.sample_base(256, generator=torch.Generator().manual_seed(0))
    assert (x - flow.scaling.inverse(u)[0]).abs().max() > 0.1
    assert (flow.log_prob(x, s) - log_q).abs().max() < 1e-8


def test_log_det_matches_autograd_jacobian():
    flow = small_flow()
    perturb(flow)
    s = cg_points(3)
    u = flow.sample_base(3, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, ladj = flow.from_base(u, s)
    for i in range(3):

        def f(v: torch.Tensor, i: int = i) -> torch.Tensor:
            return flow.from_base(v[None], s[i : i + 1])[0][0]

        jac = torch.autograd.functional.jacobian(f, u[i])
        assert float(torch.linalg.slogdet(jac)[1]) == pytest.approx(float(ladj[i]), abs=1e-8)


def test_density_integrates_to_one():
    """Midpoint rule over (circle x line) for a perturbed 2-D flow, at two CG points."""
    flow = ConditionalFlow(2, [True, False], [True], n_blocks=4, hidden=16)
    perturb(flow, 0.2)
    n_c, n_l, half = 200, 1200, 15.0
    xc = -math.pi + (torch.arange(n_c, dtype=torch.float64) + 0.5) * 2 * math.pi / n_c
    xl = -half + (torch.arange(n_l, dtype=torch.float64) + 0.5) * 2 * half / n_l
    grid = torch.cartesian_prod(xc, xl)
    cell = (2 * math.pi / n_c) * (2 * half / n_l)
    for s0 in (-2.0, 1.0):
        with torch.no_grad():
            lp = flow.log_prob(grid, torch.full((grid.shape[0], 1), s0, dtype=torch.float64))
        assert float(lp.exp().sum() * cell) == pytest.approx(1.0, abs=1e-3)
        assert float(lp.max()) > -1.5  # far from the base's maximum, log(2 pi)^-1.5 = -2.76


def test_circular_range_and_seam_continuity():
    flow = small_flow()
    perturb(flow)
    s = cg_points(2000)
    x, _ = flow.sample(s, generator=torch.Generator().manual_seed(3))
    circ = x[:, [0, 2]]
    assert (circ >= -math.pi).all() and (circ < math.pi).all()
    # base points just either side of the seam, other coordinates equal
    eps = 1e-7
    u = flow.sample_base(16, generator=torch.Generator().manual_seed(4))
    s16 = s[:16]
    for j in (0, 2):
        lo, hi = u.clone(), u.clone()
        lo[:, j], hi[:, j] = -math.pi + eps, math.pi - eps
        y_lo, ld_lo = flow.from_base(lo, s16)
        y_hi, ld_hi = flow.from_base(hi, s16)
        d = y_lo - y_hi
        d[:, [0, 2]] = wrap_angle(d[:, [0, 2]])
        assert d.abs().max() < 1e-4
        assert (ld_lo - ld_hi).abs().max() < 1e-4
    # density direction: data just either side of the data-space seam
    xs = x[:16].detach().clone()
    a, b = xs.clone(), xs.clone()
    a[:, 0], b[:, 0] = -math.pi + eps, math.pi - eps
    assert (flow.log_prob(a, s16) - flow.log_prob(b, s16)).abs().max() < 1e-4


def test_dtypes_and_gradients():
    for dtype in ("float32", "float64"):
        flow = small_flow(dtype)
        s = cg_points(512, dtype=getattr(torch, dtype))
        g = torch.Generator().manual_seed(0)
        # identity init: the conditioners' last layers get gradients
        x, log_q = flow.sample(s, generator=g)
        (log_q.mean() + x.square().mean()).backward()
        assert all(layer.net[-1].weight.grad.abs().sum() > 0 for layer in flow.layers)
        flow.zero_grad()
        perturb(flow)
        x, log_q = flow.sample(s, generator=g)
        assert x.dtype == log_q.dtype == getattr(torch, dtype)
        err = (flow.log_prob(x, s) - log_q).abs().detach()
        if dtype == "float64":
            assert err.max() < 1e-9
        else:
            # float32: the perturbed flow has very steep spots where rounding x to float32
            # alone moves log q by ~0.1 (checked in float64), so bound the bulk only
            assert err.median() < 1e-4 and err.quantile(0.95) < 1e-3
        (log_q.mean() + x.square().mean()).backward()
        for name, p in flow.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name


def test_conditioning_is_learned():
    """x0 ~ N(2 sin s, 0.3^2) (line), x1 = wrap(s + 0.3 eps) (circle), by maximum likelihood."""
    torch.manual_seed(0)
    flow = ConditionalFlow(2, [False, True], [True], n_blocks=4, hidden=32, dtype="float32")
    opt = torch.optim.Adam(flow.parameters(), lr=5e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(250):
        s = (2 * torch.rand(256, 1, generator=g) - 1) * math.pi
        e = torch.randn(256, 2, generator=g)
        x = torch.cat([2 * torch.sin(s) + 0.3 * e[:, :1], wrap_angle(s + 0.3 * e[:, 1:])], 1)
        loss = -flow.log_prob(x, s).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        for s0 in (-2.0, -0.5, 1.0, 2.5):
            x, _ = flow.sample(torch.full((2000, 1), s0), generator=g)
            assert float(x[:, 0].mean()) == pytest.approx(2 * math.sin(s0), abs=0.2)
            circ_mean = torch.atan2(x[:, 1].sin().mean(), x[:, 1].cos().mean())
            assert abs(float(wrap_angle(circ_mean - s0))) < 0.2
            assert float(x[:, 0].std()) == pytest.approx(0.3, abs=0.1)


# ------------------------------------------------------------------------------ save/load
def test_save_load_roundtrip(tmp_path):
    flow = small_flow(mask_seed=3)
    perturb(flow)
    path = tmp_path / "flow.pt"
    save_flow(flow, path, extra={"iteration": 2, "losses": np.arange(3.0)})
    loaded, extra = load_flow(path)
    assert isinstance(loaded, ConditionalFlow)
    assert loaded.hparams == flow.hparams
    assert extra == {"iteration": 2, "losses": [0.0, 1.0, 2.0]}
    s = cg_points(32)
    x1, lq1 = flow.sample(s, generator=torch.Generator().manual_seed(9))
    x2, lq2 = loaded.sample(s, generator=torch.Generator().manual_seed(9))
    assert torch.equal(x1, x2) and torch.equal(lq1, lq2)
    assert torch.equal(flow.log_prob(x1, s), loaded.log_prob(x1, s))


def test_optimizer_state_travels_with_the_flow(tmp_path):
    """Adam moments saved with a flow are restored (cast to the parameters), lr is overridden."""
    flow = small_flow("float64")
    opt = torch.optim.Adam(flow.parameters(), lr=1e-3)
    s = cg_points(16)
    for _ in range(3):
        x, log_q = flow.sample(s, generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        (log_q.mean() + x.pow(2).mean()).backward()
        opt.step()
    save_flow(flow, tmp_path / "with_opt.pt", optimizer=opt)
    loaded, _ = load_flow(tmp_path / "with_opt.pt")
    loaded = loaded.to(torch.float32)
    restored = load_optimizer(tmp_path / "with_opt.pt", loaded, lr=5e-4)
    assert restored.param_groups[0]["lr"] == 5e-4
    for p_old, p_new in zip(flow.parameters(), loaded.parameters(), strict=True):
        st_old, st_new = opt.state[p_old], restored.state[p_new]
        assert int(st_new["step"]) == 3
        assert st_new["exp_avg"].dtype == torch.float32
        torch.testing.assert_close(st_new["exp_avg_sq"], st_old["exp_avg_sq"].float())
    save_flow(flow, tmp_path / "plain.pt")  # no optimizer stored: a fresh Adam
    assert load_optimizer(tmp_path / "plain.pt", loaded, lr=1e-4).state == {}


def test_load_rejects_other_files(tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(ValueError, match="not a cgflow flow file"):
        load_flow(other)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match="not a cgflow flow file"):
        load_flow(text)
    converted = small_flow("float64").to(torch.float32)
    assert converted.hparams["dtype"] == "float32"
    save_flow(converted, tmp_path / "f32.pt")
    assert load_flow(tmp_path / "f32.pt")[0].dtype == torch.float32
    with pytest.raises(TypeError, match="cannot store"):
        save_flow(small_flow(), tmp_path / "x.pt", extra={"bad": object()})


# ------------------------------------------------------------------------- real systems
def test_aldp_identity_flow_energies(aldp):
    flow = build_flow(aldp, n_blocks=2, hidden=32)
    assert isinstance(flow, ConditionalFlow) and flow.dim == 58
    x0, _ = aldp.initial_configuration()
    s_min = aldp.cg(torch.as_tensor(x0)[None])
    s = s_min.expand(128, 2)
    x, log_q = flow.sample(s, generator=torch.Generator().manual_seed(0))
    assert x.shape == (128, 58) and torch.isfinite(log_q).all()
    # non-circular FG coordinates scatter around the minimum structure
    lin = ~flow.circular
    ref = flow.scaling.ref
    assert ((x[:, lin].mean(0) - ref[lin]) / flow.scaling.std[lin]).abs().max() < 0.5
    with torch.no_grad():
        log_p = aldp.log_target(assemble(aldp, s, x))
    n_finite = int(torch.isfinite(log_p).sum())
    print(f"\nALDP identity flow at the minimum's (phi, psi): {n_finite}/128 finite log p")
    assert n_finite == 128


def test_build_flow_mueller_brown():
    mb = get_system("mueller_brown")
    flow = build_flow(mb)
    assert isinstance(flow, ConditionalAffine1D)
    x, log_q = flow.sample(torch.zeros(10, 1, dtype=torch.float64))
    z = assemble(mb, torch.zeros(10, 1, dtype=torch.float64), x)
    assert torch.isfinite(mb.log_target(z)).all()
    assert (flow.log_prob(x, torch.zeros(10, 1)) - log_q).abs().max() < 1e-12


def test_affine_1d_learns_conditional_gaussian(tmp_path):
    torch.manual_seed(0)
    flow = ConditionalAffine1D(n_cg=1, cond_mean=[0.0], cond_std=[1.2])
    opt = torch.optim.Adam(flow.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)

    def mu(s: torch.Tensor) -> torch.Tensor:
        return 1.5 * s + 0.5

    def sigma(s: torch.Tensor) -> torch.Tensor:
        return 0.2 + 0.1 * s**2

    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [400], 0.1)
    for _ in range(600):
        s = 4 * torch.rand(512, 1, generator=g, dtype=torch.float64) - 2
        x = mu(s) + sigma(s) * torch.randn(512, 1, generator=g, dtype=torch.float64)
        loss = -flow.log_prob(x, s).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        for s0 in (-1.5, 0.0, 1.0):
            s = torch.full((4000, 1), s0, dtype=torch.float64)
            x, log_q = flow.sample(s, generator=g)
            t = torch.tensor(s0, dtype=torch.float64)
            assert float(x.mean()) == pytest.approx(float(mu(t)), abs=0.1)
            assert float(x.std()) == pytest.approx(float(sigma(t)), abs=0.04)
            assert (flow.log_prob(x, s) - log_q).abs().max() < 1e-10
    save_flow(flow, tmp_path / "mb.pt")
    loaded, extra = load_flow(tmp_path / "mb.pt")
    assert extra == {} and loaded.hparams == flow.hparams
    s = torch.linspace(-2, 2, 9, dtype=torch.float64)[:, None]
    x = torch.randn(9, 1, dtype=torch.float64)
    assert torch.equal(loaded.log_prob(x, s), flow.log_prob(x, s))


# ------------------------------------------------------------------------------ timings
def test_reverse_kl_step_timing(aldp):
    """Prints the time of one sample + log q + backward step, ALDP FG flow, batch 256."""
    sc = scaling_for(aldp)
    s = cg_points(256)
    for n_blocks, hidden in ((4, 64), (12, 256)):
        for dtype in ("float32", "float64"):
            flow = build_flow(aldp, n_blocks=n_blocks, hidden=hidden, dtype=dtype, scaling=sc)
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                x, log_q = flow.sample(s)
                (log_q.mean() + x.square().mean()).backward()
                times.append(time.perf_counter() - t0)
            print(
                f"\nreverse-KL step, batch 256, n_blocks={n_blocks}, hidden={hidden}, {dtype}: "
                f"{min(times[1:]):.3f} s"
            )
