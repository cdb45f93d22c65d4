"""Backmapped all-atom structures at fixed CG points, read back with mdtraj."""

import json

import mdtraj
import numpy as np
import pytest
import torch

from cgflow.config import write_snapshot
from cgflow.flows import build_flow, save_flow
from cgflow.stages.report import backmap
from cgflow.stages.settings import Settings

POINTS = {"beta": [-2.55, 2.8], "alpha_R": [-1.1, -0.85], "alpha_L": [1.0, 0.6]}


@pytest.fixture(scope="module")
def backmapped(tmp_path_factory, aldp):
    root = tmp_path_factory.mktemp("backmap")
    torch.manual_seed(0)
    save_flow(build_flow(aldp, n_blocks=2, hidden=16), root / "flow.pt", extra={"iteration": 3})
    cfg = {"campaign": "t", "seed": 0, "system": {"name": "alanine_dipeptide", "options": {}}}
    st = Settings(cfg)
    st._system = aldp  # the session's system (built once)
    info = backmap(st, root / "flow.pt", POINTS, 20, root / "out")
    return root / "out", info


def test_structures_have_the_requested_dihedrals(backmapped):
    out, info = backmapped
    for name, (phi, psi) in POINTS.items():
        traj = mdtraj.load(out / f"{name}.dcd", top=out / f"{name}.pdb")
        assert traj.n_atoms == 22 and traj.n_frames == info["points"][name]["n_structures"] > 0
        _, phis = mdtraj.compute_phi(traj)
        _, psis = mdtraj.compute_psi(traj)
        assert np.abs(np.angle(np.exp(1j * (phis[:, 0] - phi)))).max() < 1e-3
        assert np.abs(np.angle(np.exp(1j * (psis[:, 0] - psi)))).max() < 1e-3
        first = mdtraj.load(out / f"{name}.pdb")
        assert first.n_frames == 1
        assert np.abs(first.xyz[0] - traj.xyz[0]).max() < 2e-3  # PDB keeps 3 decimals in Å


def test_info_file(backmapped):
    out, info = backmapped
    saved = json.loads((out / "backmap.json").read_text())
    assert saved == info and saved["iteration"] == 3 and saved["energy_evaluations"] == 0
    for p in saved["points"].values():
        assert 0 < p["n_structures"] <= 20 and p["n_drawn"] >= p["n_structures"]


def test_system_without_topology_and_bad_names_fail(tmp_path):
    from cgflow.systems import get_system

    mb = get_system("mueller_brown")
    save_flow(build_flow(mb, cond_mean=[-2.0], cond_std=[0.3]), tmp_path / "f.pt")
    st = Settings(
        {
            "seed": 0,
            "system": {"name": "mueller_brown", "options": {}},
            "energy": {"backend": "torch"},
        }
    )
    with pytest.raises(ValueError, match="no all-atom topology"):
        backmap(st, tmp_path / "f.pt", {"a": [0.0]}, 2, tmp_path)
    with pytest.raises(ValueError, match="letters, digits"):
        backmap(st, tmp_path / "f.pt", {"../x": [0.0]}, 2, tmp_path)


def test_cli(backmapped, tmp_path):
    from cgflow.cli import main

    out, _ = backmapped
    cfg = tmp_path / "c.yaml"
    write_snapshot({"seed": 1, "system": {"name": "alanine_dipeptide", "options": {}}}, cfg)
    args = ["wf", "backmap", "--config", str(cfg), "--flow", str(out.parent / "flow.pt")]
    args += ["--points", json.dumps({"b": [-2.5, 2.8]}), "--structures", "2"]
    assert main([*args, "--out-dir", str(tmp_path / "bm")]) == 0
    assert mdtraj.load(tmp_path / "bm" / "b.dcd", top=tmp_path / "bm" / "b.pdb").n_frames == 2
