import os
import stat

import h5py
import numpy as np
import pytest
import torch

import cgflow
from cgflow.data import (
    KINDS,
    DataFormatError,
    Provenance,
    atomic_path,
    config_hash,
    read_h5,
    read_kind,
    write_h5,
)

PROV = Provenance(
    system="alanine_dipeptide", iteration=3, seed=42, config_hash="abc", kT_kJ_per_mol=2.494
)


def test_round_trip_with_units_attrs_and_counters(tmp_path):
    x = np.random.default_rng(0).normal(size=(1000, 22, 3)).astype(np.float32)
    u = np.linspace(0, 1, 1000)
    path = write_h5(
        tmp_path / "e.h5",
        "energies",
        {"x_nm": x, "u_kT": torch.as_tensor(u), "valid": u > 0.5},
        units={"x_nm": "nm", "u_kT": "kT", "valid": "1"},
        provenance=PROV,
        attrs={"shard": 2, "options": {"backend": "openmm"}},
        counters={"labels": 1000},
    )
    d = read_h5(path, "energies")
    np.testing.assert_array_equal(d["x_nm"], x)
    np.testing.assert_array_equal(d["u_kT"], u)
    assert d["valid"].dtype == bool
    assert d.units == {"x_nm": "nm", "u_kT": "kT", "valid": "1"}
    assert d.counters == {"labels": 1000}
    assert d.attrs["kind"] == "energies"
    assert d.attrs["format_version"] == KINDS["energies"]
    assert d.attrs["package_version"] == cgflow.__version__
    assert d.attrs["shard"] == 2
    assert d.provenance.iteration == 3 and d.provenance.seed == 42
    assert d.provenance.kT_kJ_per_mol == pytest.approx(2.494)
    # large arrays are compressed
    with h5py.File(path) as f:
        assert f["x_nm"].compression == "gzip"


def test_reader_refuses_wrong_kind_version_and_missing_dataset(tmp_path):
    path = write_h5(tmp_path / "p.h5", "points", {"s": np.zeros((3, 2))}, {"s": "rad"}, PROV)
    with pytest.raises(DataFormatError, match="is a 'points' file, expected a 'labels' file"):
        read_h5(path, "labels")
    with pytest.raises(DataFormatError, match="lacks dataset"):
        read_h5(path, "points", datasets=["s", "split"])
    with h5py.File(path, "a") as f:
        f.attrs["format_version"] = 99
    with pytest.raises(DataFormatError, match="format version 99 is not supported"):
        read_h5(path, "points")
    other = tmp_path / "plain.h5"
    with h5py.File(other, "w") as f:
        f["x"] = 1
    with pytest.raises(DataFormatError, match="not a cgflow file"):
        read_h5(other, "points")
    junk = tmp_path / "junk.h5"
    junk.write_text("not hdf5")
    with pytest.raises(DataFormatError, match="not a readable HDF5 file"):
        read_h5(junk, "points")
    with pytest.raises(FileNotFoundError, match="no 'points' file"):
        read_h5(tmp_path / "missing.h5", "points")
    with pytest.raises(DataFormatError, match="unknown file kind"):
        read_h5(path, "nonsense")
    assert read_kind(path) == "points"


def test_writer_requires_units_and_known_kind(tmp_path):
    with pytest.raises(DataFormatError, match="no units given"):
        write_h5(tmp_path / "a.h5", "points", {"s": np.zeros(3)}, {}, PROV)
    with pytest.raises(DataFormatError, match="unknown file kind"):
        write_h5(tmp_path / "a.h5", "bogus", {"s": np.zeros(3)}, {"s": "1"}, PROV)
    with pytest.raises(DataFormatError, match="reserved"):
        write_h5(tmp_path / "a.h5", "points", {}, {}, PROV, attrs={"seed": 1})
    assert not list(tmp_path.iterdir())


def test_write_is_atomic_and_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "labels.h5"
    write_h5(path, "labels", {"F_kT": np.arange(3.0)}, {"F_kT": "kT"}, PROV)

    class Boom:
        def __array__(self, *a, **k):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_h5(path, "labels", {"F_kT": Boom()}, {"F_kT": "kT"}, PROV)
    np.testing.assert_array_equal(read_h5(path, "labels")["F_kT"], np.arange(3.0))
    assert [p.name for p in tmp_path.iterdir()] == ["labels.h5"]  # no temp file left


def test_file_mode_follows_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_h5(tmp_path / "m.h5", "points", {"s": np.zeros(2)}, {"s": "rad"}, PROV)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_atomic_path_removes_temp_on_error(tmp_path):
    with pytest.raises(ValueError), atomic_path(tmp_path / "x.txt") as tmp:
        tmp.write_text("partial")
        raise ValueError
    assert list(tmp_path.iterdir()) == []


def test_identical_inputs_give_identical_bytes(tmp_path):
    arrays = {"s": np.random.default_rng(1).normal(size=(5000, 2))}
    a = write_h5(tmp_path / "a.h5", "points", arrays, {"s": "rad"}, PROV)
    b = write_h5(tmp_path / "b.h5", "points", arrays, {"s": "rad"}, PROV)
    assert a.read_bytes() == b.read_bytes()


def test_config_hash_is_order_independent():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})
