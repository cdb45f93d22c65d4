import math

import numpy as np
import pytest
import torch

from cgflow.systems import (
    R_KJ_PER_MOL_K,
    AnalyticSystem,
    CGSpec,
    available_systems,
    get_system,
    load_callable,
    mueller_brown_energy_and_gradient,
    mueller_brown_potential,
)


def double_well(x: torch.Tensor) -> torch.Tensor:
    """A 3-D test potential for the analytic entry point."""
    return (x[:, 0] ** 2 - 1) ** 2 + 0.5 * x[:, 1] ** 2 + 2.0 * x[:, 2] ** 2


def test_registry():
    assert {"mueller_brown", "alanine_dipeptide", "analytic"} <= set(available_systems())
    with pytest.raises(ValueError, match="unknown system 'argon'"):
        get_system("argon")
    with pytest.raises(ValueError, match="bad options for system 'mueller_brown'"):
        get_system("mueller_brown", temperature=3)


def test_mueller_brown_interface_and_exact_pmf():
    mb = get_system("mueller_brown")
    assert mb.beta == 0.1 and mb.kT == pytest.approx(10.0)
    x = torch.tensor([[0.3, -0.2], [1.0, 2.0]], dtype=torch.float64)
    z = mb.to_internal(x)
    torch.testing.assert_close(z[:, 0], x[:, 0] - x[:, 1])
    torch.testing.assert_close(z[:, 1], x[:, 0] + x[:, 1])
    xb, logdet = mb.to_cartesian(z)
    torch.testing.assert_close(xb, x)
    torch.testing.assert_close(logdet, torch.full((2,), math.log(0.5), dtype=torch.float64))
    torch.testing.assert_close(mb.cg(x)[:, 0], x[:, 0] - x[:, 1])
    torch.testing.assert_close(mb.reduced_energy(x), 0.1 * mueller_brown_potential(x))
    assert mb.fg_indices == (1,)
    # exact PMF: the numbers of the method spec (100 bin centres over [-2.5, 1.1])
    s = -2.5 + (np.arange(100) + 0.5) * 0.036
    f = mb.exact_pmf(s)
    assert s[np.argmin(f)] == pytest.approx(-2.014)
    i_mid = np.argmin(np.where((s > -1) & (s < -0.2), f, np.inf))
    i_right = np.argmin(np.where(s > 0.2, f, np.inf))
    assert f[i_mid] == pytest.approx(6.99, abs=0.02)
    assert f[i_right] == pytest.approx(4.60, abs=0.02)
    assert f.max() == pytest.approx(11.99, abs=0.02)


def test_mueller_brown_values_and_closed_form_forces():
    # the textbook minima and saddle (Mueller & Brown 1979): U = -146.70, -108.17, -80.77, -40.66
    x = torch.tensor(
        [[-0.558, 1.442], [-0.050, 0.467], [0.623, 0.028], [-0.822, 0.624]], dtype=torch.float64
    )
    ref = torch.tensor([-146.70, -80.77, -108.17, -40.66], dtype=torch.float64)
    torch.testing.assert_close(mueller_brown_potential(x), ref, atol=0.01, rtol=0)
    # the closed-form gradient against autograd, on random points and through the backend
    pts = torch.randn(64, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    pts.requires_grad_(True)
    (auto,) = torch.autograd.grad(mueller_brown_potential(pts).sum(), pts)
    u, grad = mueller_brown_energy_and_gradient(pts.detach())
    torch.testing.assert_close(u, mueller_brown_potential(pts.detach()))
    torch.testing.assert_close(grad, auto)
    backend = get_system("mueller_brown").energy_backend()
    bad = pts.detach().clone()
    bad[5, 1] = math.nan
    u_b, f_b = backend.energies_and_forces(bad)
    assert torch.isnan(u_b[5]) and torch.isnan(f_b[5]).all()
    keep = torch.arange(64) != 5
    torch.testing.assert_close(u_b[keep], u[keep])
    torch.testing.assert_close(f_b[keep], -auto[keep])


def test_analytic_system_takes_closed_form_forces_from_the_config():
    opts = dict(
        potential="cgflow.systems:mueller_brown_potential",
        dim=2,
        beta=0.1,
        cg_indices=[0],
        cg_bounds=[[-2.5, 1.1]],
    )
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    auto = get_system("analytic", **opts).energy_backend()
    closed = get_system(
        "analytic", energy_and_gradient="cgflow.systems:mueller_brown_energy_and_gradient", **opts
    ).energy_backend()
    for a, b in zip(auto.energies_and_forces(x), closed.energies_and_forces(x), strict=True):
        torch.testing.assert_close(a, b)
    wrong = get_system(
        "analytic", energy_and_gradient="cgflow.systems:mueller_brown_potential", **opts
    ).energy_backend()
    with pytest.raises(ValueError, match="energy_and_gradient must return"):
        wrong.energies_and_forces(x)


def test_mueller_brown_pmf_matches_adaptive_quadrature():
    from scipy.integrate import quad

    mb = get_system("mueller_brown")
    s = np.array([-2.0, -1.0, 0.0, 0.5, 1.1])

    def reduced(sp, si):
        x = torch.tensor(np.stack([(si + sp) / 2, (sp - si) / 2], -1), dtype=torch.float64)
        return (0.1 * mueller_brown_potential(x.reshape(-1, 2))).numpy()

    ref = []
    for si in s:
        grid = np.linspace(-4, 8, 1201)
        u = reduced(grid, si)
        lo = float(u.min())  # integrate exp(-(u - min)): no underflow, relative tolerance holds
        val, _ = quad(
            lambda sp, si=si, lo=lo: math.exp(lo - float(reduced(np.array([sp]), si)[0])),
            -4,
            8,
            points=[float(grid[np.argmin(u)])],
            limit=500,
            epsabs=0.0,
            epsrel=1e-12,
        )
        ref.append(lo - math.log(val))
    ref = np.array(ref)
    np.testing.assert_allclose(mb.exact_pmf(s), ref - ref.min(), atol=1e-9)


def test_analytic_entry_point_by_module_function():
    sys_ = get_system(
        "analytic",
        potential="test_systems:double_well",  # tests/ is on sys.path under pytest,
        dim=3,
        beta=2.0,
        cg_indices=[0],
        cg_bounds=[[-2, 2]],
    )
    assert isinstance(sys_, AnalyticSystem)
    x = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(sys_.reduced_energy(x), 2.0 * double_well(x))
    torch.testing.assert_close(sys_.cg(x), x[:, :1])
    assert sys_.fg_indices == (1, 2)
    assert not bool(sys_.internal_circular.any())
    x0, n = sys_.initial_configuration()
    assert abs(abs(x0[0]) - 1) < 1e-3 and n > 0  # minimised into one of the wells
    with sys_.energy_backend() as be:
        u, f = be.energies_and_forces(np.array([[1.0, 1.0, np.nan], [0.5, 0.0, 0.0]]))
    assert torch.isnan(u[0]) and torch.isnan(f[0]).all()
    torch.testing.assert_close(
        f[1], torch.tensor([-(4 * 0.5 * (0.25 - 1)), 0.0, 0.0], dtype=torch.float64)
    )


def test_analytic_bad_input_is_named():
    with pytest.raises(ValueError, match="expected 'module:function'"):
        load_callable("nocolon")
    with pytest.raises(ValueError, match="cannot import module"):
        load_callable("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="has no attribute"):
        load_callable("math:nothing")
    spec = CGSpec(("s",), (False,), ((0.0, 1.0),))
    with pytest.raises(ValueError, match="cg_indices"):
        AnalyticSystem("t", double_well, 3, 1.0, [5], spec)
    with pytest.raises(ValueError, match="singular"):
        AnalyticSystem("t", double_well, 3, 1.0, [0], spec, transform=np.zeros((3, 3)))
    with pytest.raises(ValueError, match="upper bound"):
        CGSpec(("s",), (False,), ((1.0, 0.0),))
    with pytest.raises(ValueError, match="cg_bounds"):
        get_system("analytic", potential=double_well, dim=3, beta=1.0, cg_indices=[0])
    mb = get_system("mueller_brown")
    with pytest.raises(ValueError, match="only the 'torch' energy backend"):
        mb.energy_backend("openmm")


def test_alanine_dipeptide_system(aldp, aldp_frames):
    assert aldp.n_atoms == 22 and aldp.config_shape == (22, 3)
    assert aldp.kT == pytest.approx(R_KJ_PER_MOL_K * 300.0) and aldp.kT == pytest.approx(
        2.4943, abs=1e-4
    )
    assert aldp.cg_indices == (17, 44) and aldp.cg_spec.periodic == (True, True)
    assert len(aldp.fg_indices) == 58
    assert int(aldp.internal_circular.sum()) == 12
    forces = [type(f).__name__ for f in aldp.openmm_system.getForces()]
    assert "CustomGBForce" in forces  # OBC1
    assert aldp.openmm_system.getNumConstraints() == 0
    x0, n_min = aldp.initial_configuration()
    assert n_min > 10
    u_start = float(aldp.energies(aldp.positions_nm[None])[0])
    u_min = float(aldp.energies(x0[None])[0])
    assert u_min < u_start
    with aldp.energy_backend("openmm", platform="CPU") as be:
        _, f = be.energies_and_forces(x0[None])
    assert np.abs(f).max() < 0.1  # kJ/mol/nm: a minimum (CPU platform precision)
    phi, psi = aldp.cg(x0[None])[0].tolist()
    assert -math.pi < phi < 0 and psi > 1.5  # beta / C5 region
    # log target over internal coordinates = -u + log|det|
    z = aldp.to_internal(torch.as_tensor(aldp_frames[:4]))
    x, logdet = aldp.to_cartesian(z)
    torch.testing.assert_close(aldp.log_target(z), -aldp.reduced_energy(x) + logdet)
