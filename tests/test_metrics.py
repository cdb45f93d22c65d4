"""Evaluation metrics: KLD, basin ΔF, RMSE of F, Müller–Brown metrics."""

import json
import math

import numpy as np
import pytest
import torch

from cgflow import metrics as M
from cgflow.data import H5Data
from cgflow.metrics import GRIDS


def synthetic_counts(rng, grid, n=200_000):
    """Counts of a smooth two-basin density on ``grid`` (every bin populated a little)."""
    c = grid.centres_phi_psi()
    phi, psi = c[..., 0], c[..., 1]
    w = (
        np.exp(3 * np.cos(phi + 2.5) + 3 * np.cos(psi - 2.8))
        + 0.3 * np.exp(3 * np.cos(phi + 1.2) + 3 * np.cos(psi + 0.8))
        + 0.02 * np.exp(3 * np.cos(phi - 1.0) + 3 * np.cos(psi - 0.6))
    )
    return rng.multinomial(n, (w / w.sum()).ravel()).reshape(w.shape)


@pytest.fixture
def counts(rng):
    return {g: synthetic_counts(rng, GRIDS[g]) for g in M.KLD_GRIDS}


def own_free_energy(counts):
    """The reference histogram's own F, with empty bins set high (finite)."""
    F = M.free_energy_from_counts(counts)
    return np.where(np.isfinite(F), F, 30.0)


def test_basin_masks_partition_every_unshifted_grid():
    for g in ("std100", "std36", "fine360"):
        m = M.basin_masks(GRIDS[g])
        total = m["phi_pos"].astype(int) + m["alpha_R"] + m["beta"]
        assert (total == 1).all()
        assert all(v.any() for v in m.values())
    c = GRIDS["std36"].centres_phi_psi()
    m = M.basin_masks(GRIDS["std36"])
    assert not m["beta"][(c[..., 0] < 0) & (np.abs(c[..., 1]) < 0.5)].any()
    assert m["beta"][(c[..., 0] < -2) & (np.abs(c[..., 1]) > 3.0)].all()  # wraps past ψ = ±π
    with pytest.raises(ValueError, match="unshifted"):
        M.basin_masks(GRIDS["shifted100"])


def test_model_equal_to_reference_gives_zero_errors(counts):
    model = {g: own_free_energy(c) + 4.2 for g, c in counts.items()}  # a constant is irrelevant
    out = M.aldp_metrics(model, counts, {"std100": 0.01})
    for g in M.KLD_GRIDS:
        assert abs(out[f"kld_{g}"]) < 1e-6
    assert out["kld_floor_std100"] == 0.01
    for name in M.DELTA_F_PAIRS:
        assert abs(out[f"dF_{name}_err_kT"]) < 1e-6
        assert out[f"dF_{name}_kT"] == pytest.approx(out[f"dF_{name}_ref_kT"], abs=1e-6)
    assert out["rmse_F_std36_kT"] < 1e-9


def test_basin_shift_gives_the_analytic_delta_F_error(counts):
    """Raising F by δ on the φ > 0 bins only: the φ > 0 ΔF error is exactly δ."""
    delta = 1.5
    grid = GRIDS["std100"]
    pos = M.basin_masks(grid)["phi_pos"]
    F = own_free_energy(counts["std100"]) + np.where(pos, delta, 0.0)
    model = {**{g: own_free_energy(c) for g, c in counts.items()}, "std100": F}
    out = M.aldp_metrics(model, counts)
    assert out["dF_phi_pos_err_kT"] == pytest.approx(delta, abs=1e-9)
    assert abs(out["dF_aR_beta_err_kT"]) < 1e-9  # both outside the shifted region
    assert out["kld_std100"] > 0


def test_rmse_of_a_perturbed_model(counts):
    rng = np.random.default_rng(0)
    c = counts["std36"]
    sel = c >= M.RMSE_MIN_COUNT
    noise = np.where(sel, rng.choice([-0.3, 0.3], size=c.shape), 0.0)
    F = own_free_energy(c) + noise + 7.0
    expected = float(np.std(noise[sel]))
    assert M.rmse_free_energy_kT(F, c) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="no bin"):
        M.rmse_free_energy_kT(F, np.zeros_like(c))


def test_delta_F_and_its_standard_error():
    p = np.array([[0.2, 0.3], [0.1, 0.4]])
    a = np.array([[True, False], [False, False]])
    b = ~a
    assert M.delta_F_kT(p, a, b) == pytest.approx(-math.log(0.2 / 0.8))
    # identical chains: no spread; different chains: positive
    same = np.stack([np.array([[20, 30], [10, 40]])] * 4)
    assert M.delta_F_stderr_kT(same, a, b) == 0.0
    rng = np.random.default_rng(3)
    chains = np.stack([rng.multinomial(1000, p.ravel()).reshape(2, 2) for _ in range(200)])
    se = M.delta_F_stderr_kT(chains, a, b)
    # binomial: sd(ΔF) per chain ≈ sqrt(1/(n P (1 − P)))
    assert se == pytest.approx(math.sqrt(1 / (1000 * 0.2 * 0.8)) / math.sqrt(200), rel=0.2)


def test_model_probabilities_and_free_energy_from_counts():
    p = M.model_probabilities(np.array([0.0, math.log(2.0), 1000.0]))
    assert p.sum() == pytest.approx(1.0) and p[0] == pytest.approx(2 * p[1])
    with pytest.raises(ValueError, match="finite"):
        M.model_probabilities(np.array([0.0, np.nan]))
    F = M.free_energy_from_counts(np.array([4, 1, 0]))
    assert F[0] == 0 and F[1] == pytest.approx(math.log(4)) and np.isnan(F[2])


def test_aldp_evaluation_from_a_predict_callable(counts):
    """The callable path: an ensemble-like predict equal to the reference's own F."""
    F_fn = {g: own_free_energy(c) for g, c in counts.items()}
    grid = GRIDS["std100"]

    def predict(s):
        s = s.numpy()
        i = np.clip(np.floor((s + math.pi) / (2 * math.pi) * grid.bins).astype(int), 0, 99)
        f = F_fn["std100"][i[:, 0], i[:, 1]]
        return torch.as_tensor(f), torch.zeros(len(f), dtype=torch.float64)

    ref = H5Data(
        kind="reference",
        arrays={f"counts_{g}": c for g, c in counts.items()},
        units={},
        attrs={"summary": json.dumps({"kld_noise_floor": {"std100": 0.004}})},
    )
    out = M.aldp_evaluation(predict, ref)
    assert abs(out["kld_std100"]) < 1e-9 and abs(out["dF_phi_pos_err_kT"]) < 1e-9
    assert out["kld_floor_std100"] == 0.004 and "dF_phi_pos_ref_stderr_kT" not in out


def test_exact_pmf_metrics():
    s = np.linspace(-2.5, 1.1, 100)
    exact = 0.5 * (s + 1.0) ** 2
    out = M.exact_pmf_metrics(exact + 3.0, exact, np.full(100, 0.2))
    assert out["max_abs_dF_kT"] < 1e-12 and abs(out["kld"]) < 1e-12
    assert out["max_std_kT"] == pytest.approx(0.2)
    bumped = exact + np.where(exact < 1.0, 0.0, 0.5)  # aligned at the minimum
    out = M.exact_pmf_metrics(bumped, exact, np.zeros(100))
    assert out["max_abs_dF_kT"] == pytest.approx(0.5) and out["kld"] > 0
