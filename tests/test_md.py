import numpy as np
import pytest

from cgflow.md import langevin_md, metropolis, short_run
from cgflow.systems import get_system


def test_langevin_md_counts_and_reproducibility(aldp):
    a = langevin_md(aldp, n_frames=5, stride=10, seed=3, equilibration_steps=20)
    b = langevin_md(aldp, n_frames=5, stride=10, seed=3, equilibration_steps=20)
    assert a.frames.shape == (5, 22, 3)
    assert a.counts["start_md"] == 20 + 5 * 10
    assert a.counts["minimisation"] > 0
    np.testing.assert_allclose(a.frames, b.frames)
    c = langevin_md(aldp, n_frames=5, stride=10, seed=4, equilibration_steps=20)
    assert not np.allclose(a.frames, c.frames)
    with pytest.raises(ValueError, match="n_frames"):
        langevin_md(aldp, n_frames=0, stride=10, seed=1)


def test_md_stays_in_the_beta_basin_and_is_l(aldp, aldp_frames):
    s = aldp.cg(aldp_frames).numpy()
    assert np.isfinite(s).all()
    assert (s[:, 0] < 0).mean() > 0.95  # phi < 0 for a short run from the minimum
    assert bool(aldp.is_l(aldp_frames).all())


def test_metropolis_samples_mueller_brown_basin():
    mb = get_system("mueller_brown")
    r = metropolis(mb, n_frames=200, stride=5, seed=0, step_size=0.05, n_chains=4)
    assert r.frames.shape == (800, 2)
    assert r.counts["start_md"] == 4 + 4 * 200 * 5
    assert 0.1 < r.acceptance < 0.95
    s = mb.cg(r.frames)[:, 0].numpy()
    assert abs(s.mean() - (-2.0)) < 0.15  # the deep basin around s = -2
    again = short_run(mb, n_frames=200, stride=5, seed=0, step_size=0.05, n_chains=4)
    np.testing.assert_array_equal(again.frames, r.frames)
