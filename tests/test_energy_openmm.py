import numpy as np
import openmm
import pytest
from openmm import unit

from cgflow.energy import EvaluationCounter, count_invalid, make_backend
from cgflow.energy.openmm_backend import OpenMMEnergy, available_platforms, choose_platform


def reference(system, x, forces=True):
    ctx = openmm.Context(
        system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference")
    )
    u, f = [], []
    for xi in x:
        ctx.setPositions(xi)
        st = ctx.getState(getEnergy=True, getForces=forces)
        u.append(st.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
        if forces:
            f.append(
                st.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
            )
    return np.array(u), (np.array(f) if forces else None)


def test_platform_choice():
    names = available_platforms()
    assert "CPU" in names and "Reference" in names
    assert choose_platform() in ("CUDA", "OpenCL", "CPU")
    assert choose_platform("Reference") == "Reference"
    with pytest.raises(ValueError, match="platform 'Nope' is not available"):
        choose_platform("Nope")


def test_cpu_backend_matches_reference_and_handles_nan(aldp, aldp_frames):
    x = aldp_frames[:50].copy()
    x[3, 5, 1] = np.nan
    x[7] = np.inf
    with OpenMMEnergy(aldp.openmm_system, platform="CPU") as be:
        u, f = be.energies_and_forces(x)
        u2 = be.energies(x)
    assert np.isnan(u[[3, 7]]).all() and np.isnan(f[[3, 7]]).all()
    assert count_invalid(u) == 2
    ok = np.isfinite(u)
    ur, fr = reference(aldp.openmm_system, x[ok])
    np.testing.assert_allclose(u[ok], ur, atol=2e-3)  # CPU platform: mixed precision
    np.testing.assert_allclose(u2[ok], u[ok])
    assert np.sqrt(((f[ok] - fr) ** 2).mean()) < 5e-2


def test_workers_agree_with_in_process(aldp, aldp_frames):
    x = aldp_frames[:60]
    with OpenMMEnergy(aldp.openmm_system, platform="CPU") as serial:
        us, fs = serial.energies_and_forces(x)
    with make_backend(
        "openmm", aldp.openmm_system, platform="CPU", n_workers=2, chunk_size=16
    ) as pool:
        up, fp = pool.energies_and_forces(x)
        assert pool.energies(x[:0]).shape == (0,)
    np.testing.assert_allclose(up, us)
    np.testing.assert_allclose(fp, fs)
    with pytest.raises(RuntimeError, match="closed"):
        pool.energies(x)


def test_shape_errors_and_bad_options(aldp):
    with OpenMMEnergy(aldp.openmm_system, platform="CPU") as be:
        with pytest.raises(ValueError, match=r"shape \[B, 22, 3\]"):
            be.energies(np.zeros((4, 21, 3)))
        assert be.energies(np.asarray(aldp.positions_nm)).shape == (1,)  # single config
    with pytest.raises(ValueError, match="n_workers"):
        OpenMMEnergy(aldp.openmm_system, n_workers=-1)
    with pytest.raises(ValueError, match="unknown energy backend"):
        make_backend("gromacs", aldp.openmm_system)


def test_evaluation_counter():
    c = EvaluationCounter({"start_md": 10})
    c.add("training", 5)
    c.add("training_draws", 8)
    c.merge([{"labels": 3}, {"minimisation": 2}])
    assert c.total == 20 and c["training_draws"] == 8
    with pytest.raises(ValueError, match="unknown evaluation kind"):
        c.add("stuff", 1)
    with pytest.raises(ValueError, match=">= 0"):
        c.add("labels", -1)


def test_minimisation_does_not_depend_on_the_blas_threads(aldp):
    """The same minimum and count whether the caller runs BLAS on one thread (a Snakemake job)
    or on every core (an interactive process)."""
    from threadpoolctl import threadpool_limits

    from cgflow.energy.minimize import minimize_energy
    from cgflow.energy.openmm_backend import OpenMMEnergy

    results = []
    for threads in (1, 2):
        with (
            threadpool_limits(limits=threads, user_api="blas"),
            OpenMMEnergy(aldp.openmm_system, platform="Reference") as backend,
        ):
            results.append(minimize_energy(backend, aldp.positions_nm, gtol=1e-2))
    assert results[0].n_evaluations == results[1].n_evaluations
    assert (results[0].x == results[1].x).all()
