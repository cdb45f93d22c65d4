import contextlib
import io

import numpy as np
import pytest


def openmmtools_system(name: str, **kwargs):
    """An openmmtools test system, with pymbar's import banner silenced."""
    with contextlib.redirect_stdout(io.StringIO()):
        from openmmtools import testsystems
    return getattr(testsystems, name)(**kwargs)


@pytest.fixture(scope="session")
def aldp():
    from cgflow.systems import get_system

    return get_system("alanine_dipeptide")


@pytest.fixture(scope="session")
def aldp_frames(aldp):
    """200 frames of a short, seeded MD run of alanine dipeptide (nm)."""
    from cgflow.md import langevin_md

    return langevin_md(aldp, n_frames=200, stride=20, seed=7).frames


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Many small torch ops stall badly with 2 threads on a busy 2-core machine."""
    import torch

    torch.set_num_threads(1)


def schema_defaults() -> dict:
    """The configuration with every schema default (the one source of defaults)."""
    from cgflow.config import validated

    return validated({})


def energy_config(**overrides):
    """EnergyConfig with the schema's ``energy_training.later`` defaults, seed 0, overridden."""
    from cgflow.training import EnergyConfig

    return EnergyConfig(**{**schema_defaults()["energy_training"]["later"], "seed": 0, **overrides})


def example_config(**overrides):
    """ExampleConfig with the schema's ``example`` defaults, seed 0, overridden."""
    from cgflow.training import ExampleConfig

    return ExampleConfig(**{**schema_defaults()["example"], "seed": 0, **overrides})
