"""Each figure writes a non-empty PNG from tiny synthetic inputs."""

import math

import numpy as np
import pandas as pd
import torch

from cgflow import plots

PNG = b"\x89PNG"


def is_png(path):
    return path.stat().st_size > 1000 and path.read_bytes()[:4] == PNG


def test_pmf_maps_with_and_without_reference(tmp_path, rng):
    F = rng.uniform(0, 20, (12, 12))
    ref = F + rng.normal(0, 0.3, F.shape)
    ref[0, :3] = np.nan  # empty reference bins
    extent = (-math.pi, math.pi, -math.pi, math.pi)
    pts, cen = rng.uniform(-3, 3, (20, 2)), rng.uniform(-3, 3, (2, 2))
    plots.pmf_maps(tmp_path / "a.png", F, F / 10, extent, ref, pts, cen, title="t")
    plots.pmf_maps(tmp_path / "b.png", F, F / 10, extent)
    assert is_png(tmp_path / "a.png") and is_png(tmp_path / "b.png")


def test_aligned_difference_removes_the_mean_over_populated_bins():
    ref = np.array([0.0, 1.0, np.nan])
    d = plots.aligned_difference(ref + 5.0 + np.array([0.1, -0.1, 0.0]), ref)
    assert np.allclose(d[:2], [0.1, -0.1]) and np.isnan(d[2])


def test_profile(tmp_path):
    s = np.linspace(-2.5, 1.1, 30)
    plots.pmf_profile(tmp_path / "p.png", s, s**2, np.full(30, 0.2), s**2 + 0.1, s[::3])
    assert is_png(tmp_path / "p.png")


def test_iteration_plot_for_a_1d_and_a_periodic_2d_system(tmp_path, rng):
    class Spec:
        def __init__(self, dim, periodic, bounds, names):
            self.dim, self.periodic, self.bounds, self.names = dim, periodic, bounds, names

    class System:
        def __init__(self, spec):
            self.cg_spec = spec

    def predict(s):
        f = (s**2).sum(dim=1)
        return f, 0.1 * torch.ones_like(f)

    one = System(Spec(1, (False,), ((-2.0, 1.0),), ("s",)))
    plots.iteration_plot(tmp_path / "1d.png", one, predict, rng.uniform(-2, 1, (10, 1)))
    two = System(Spec(2, (True, True), ((-math.pi, math.pi),) * 2, ("phi", "psi")))
    counts = rng.integers(0, 50, (100, 100))
    plots.iteration_plot(
        tmp_path / "2d.png", two, predict, rng.uniform(-3, 3, (10, 2)), np.zeros((1, 2)), counts
    )
    assert is_png(tmp_path / "1d.png") and is_png(tmp_path / "2d.png")


def test_convergence_curves_for_aldp_and_mueller_brown_columns(tmp_path):
    base = {"iteration": [0, 1, 2], "N": [100, 1000, 5000], "n_train_points": [10, 30, 50]}
    aldp = pd.DataFrame(
        {
            **base,
            "metric_kld_std100": [np.nan, 0.5, 0.05],
            "metric_kld_std36": [np.nan, 0.3, 0.02],
            "metric_kld_floor_std100": [np.nan, 0.004, 0.004],
            "metric_kld_floor_std36": [np.nan, 0.001, 0.001],
            "metric_dF_phi_pos_err_kT": [np.nan, 2.0, 0.3],
            "metric_dF_phi_pos_ref_stderr_kT": [np.nan, 0.2, 0.2],
            "metric_dF_aR_beta_err_kT": [np.nan, -1.0, 0.1],
        }
    )
    mb = pd.DataFrame(
        {**base, "metric_kld": [np.nan, 0.2, 0.01], "metric_max_abs_dF_kT": [np.nan, 3.0, 0.5]}
    )
    plots.convergence(tmp_path / "aldp.png", aldp, "aldp")
    plots.convergence(tmp_path / "mb.png", mb)
    plots.convergence(tmp_path / "none.png", pd.DataFrame(base))  # no metrics at all
    assert all(is_png(tmp_path / f"{n}.png") for n in ("aldp", "mb", "none"))
