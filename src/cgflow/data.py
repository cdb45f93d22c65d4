"""HDF5 exchange files: atomic writes, typed file kinds, provenance and units.

Every array a workflow rule hands to another goes through :func:`write_h5` / :func:`read_h5`.

* **Atomic**: the file is written under a hidden temporary name in the destination folder and
  renamed into place, so a killed job never leaves a half-written file under a declared output
  name. The temporary file gets the usual umask-derived mode (``mkstemp`` would give 0600).
* **Typed**: each file has a ``kind`` (see :data:`KINDS`) and a format version; a reader asking
  for another kind or an unknown version gets a :class:`DataFormatError` naming both.
* **Provenance**: root attributes ``kind, format_version, system, iteration, seed,
  package_version, config_hash`` and ``kT_kJ_per_mol`` (molecules) or ``beta`` (dimensionless
  potentials). No timestamps, so identical inputs give identical bytes.
* **Units**: every dataset carries a ``units`` attribute (``"nm"``, ``"kJ/mol"``, ``"kT"``,
  ``"rad"``, ``"1"`` for dimensionless numbers and counts); writing an array without one fails.
* **Counters**: energy-evaluation counts by kind travel with the data that caused them, as
  attributes of the ``counters`` group.

Set ``HDF5_USE_FILE_LOCKING=FALSE`` on NFS/Lustre; files are opened with ``locking=False``
for reading when that variable is set.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from . import __version__

#: file kinds and the format version this release writes and reads
KINDS: dict[str, int] = {
    "start": 2,  # starting frames of a campaign and the energy minimum
    "md": 1,  # MD trajectories (frames, CG values)
    "points": 1,  # CG points with train/test split
    "samples": 1,  # flow draws x_FG and log q at CG points
    "energies": 1,  # reduced energies + validity flags of a shard
    "labels": 3,  # free-energy labels F(s) in kT, ESS, held-out flag, draws per point
    "walkers": 1,  # CG walker end points, steps used, exhausted flag
    "train": 1,  # training history: losses, counters
    "reference": 1,  # ground-truth histograms
    "histogram": 1,  # one chunk of ground-truth histogram counts
}

_RESERVED_ATTRS = {
    "kind",
    "format_version",
    "system",
    "iteration",
    "seed",
    "package_version",
    "config_hash",
    "kT_kJ_per_mol",
    "beta",
}


class DataFormatError(ValueError):
    """A file is not of the expected kind or version, or lacks required content."""


@dataclass(frozen=True)
class Provenance:
    """Who made a file: system, iteration, seed, configuration and temperature."""

    system: str
    iteration: int = -1
    seed: int = -1
    config_hash: str = ""
    kT_kJ_per_mol: float | None = None
    beta: float | None = None
    package_version: str = __version__

    def attrs(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "system": self.system,
            "iteration": int(self.iteration),
            "seed": int(self.seed),
            "config_hash": self.config_hash,
            "package_version": self.package_version,
        }
        if self.kT_kJ_per_mol is not None:
            out["kT_kJ_per_mol"] = float(self.kT_kJ_per_mol)
        if self.beta is not None:
            out["beta"] = float(self.beta)
        return out


@dataclass
class H5Data:
    """Content of one exchange file."""

    kind: str
    arrays: dict[str, np.ndarray]
    units: dict[str, str]
    attrs: dict[str, Any]
    counters: dict[str, int] = field(default_factory=dict)

    def __getitem__(self, name: str) -> np.ndarray:
        try:
            return self.arrays[name]
        except KeyError:
            raise DataFormatError(
                f"{self.kind!r} file has no dataset {name!r}; it has {sorted(self.arrays)}"
            ) from None

    @property
    def provenance(self) -> Provenance:
        a = self.attrs
        return Provenance(
            system=a.get("system", ""),
            iteration=int(a.get("iteration", -1)),
            seed=int(a.get("seed", -1)),
            config_hash=a.get("config_hash", ""),
            kT_kJ_per_mol=a.get("kT_kJ_per_mol"),
            beta=a.get("beta"),
            package_version=a.get("package_version", ""),
        )


def config_hash(config: Mapping[str, Any]) -> str:
    """Stable short hash of a JSON-serialisable configuration (key order irrelevant)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it into place on success.

    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, _umask_mode())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _to_attr(value: Any) -> Any:
    if isinstance(value, (dict, list, tuple)) and not isinstance(value, np.ndarray):
        return json.dumps(value, sort_keys=True, default=str)
    if value is None:
        return "null"
    return value


def write_h5(
    path: str | os.PathLike,
    kind: str,
    arrays: Mapping[str, Any],
    units: Mapping[str, str],
    provenance: Provenance,
    attrs: Mapping[str, Any] | None = None,
    counters: Mapping[str, int] | None = None,
    compress_above: int = 1 << 16,
) -> Path:
    """Write ``arrays`` atomically as a file of ``kind``.

    Args:
        arrays: name -> array (numpy or anything ``np.asarray`` takes; torch tensors are
            converted on the CPU).
        units: name -> unit string for every array (``"1"`` if dimensionless).
        attrs: extra root attributes (dicts/lists are stored as JSON strings).
        counters: energy evaluations by kind caused by making this file.
        compress_above: arrays with more bytes are gzip-compressed with shuffle, chunked along
            the first axis.
    """
    if kind not in KINDS:
        raise DataFormatError(f"unknown file kind {kind!r}; known kinds: {sorted(KINDS)}")
    missing = [name for name in arrays if name not in units]
    if missing:
        raise DataFormatError(f"no units given for dataset(s) {missing} of {kind!r} file {path}")
    clash = _RESERVED_ATTRS & set(attrs or {})
    if clash:
        raise DataFormatError(f"attribute name(s) {sorted(clash)} are reserved for provenance")
    converted = {}
    for name, value in arrays.items():
        if hasattr(value, "detach"):
            value = value.detach().cpu().numpy()
        converted[name] = np.asarray(value)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["kind"] = kind
        f.attrs["format_version"] = KINDS[kind]
        for key, value in provenance.attrs().items():
            f.attrs[key] = value
        for key, value in (attrs or {}).items():
            f.attrs[key] = _to_attr(value)
        for name, arr in converted.items():
            options: dict[str, Any] = {}
            if arr.ndim >= 1 and arr.nbytes > compress_above and arr.dtype.kind in "fiub":
                row_bytes = max(1, arr.nbytes // max(1, arr.shape[0]))
                rows = int(max(1, min(arr.shape[0], (256 * 1024) // row_bytes)))
                options = dict(
                    compression="gzip",
                    compression_opts=4,
                    shuffle=True,
                    chunks=(rows, *arr.shape[1:]),
                )
            ds = f.create_dataset(name, data=arr, **options)
            ds.attrs["units"] = units[name]
        group = f.create_group("counters")
        for key, value in (counters or {}).items():
            group.attrs[key] = int(value)
    return Path(path)


def _open_for_reading(path: Path) -> h5py.File:
    locking = os.environ.get("HDF5_USE_FILE_LOCKING", "").upper() not in {"FALSE", "0"}
    try:
        return h5py.File(path, "r", locking=locking)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise DataFormatError(f"{path} is not a readable HDF5 file ({exc})") from None


def read_h5(path: str | os.PathLike, kind: str, datasets: list[str] | None = None) -> H5Data:
    """Read a file of ``kind``; refuse other kinds and unknown versions by name.

    Args:
        datasets: names to load (default: all). A missing name is an error naming it.
    """
    path = Path(path)
    if kind not in KINDS:
        raise DataFormatError(f"unknown file kind {kind!r}; known kinds: {sorted(KINDS)}")
    if not path.exists():
        raise FileNotFoundError(f"no {kind!r} file at {path}")
    with _open_for_reading(path) as f:
        found = f.attrs.get("kind")
        if found is None:
            raise DataFormatError(f"{path} has no 'kind' attribute: not a cgflow file")
        if found != kind:
            raise DataFormatError(f"{path} is a {found!r} file, expected a {kind!r} file")
        version = int(f.attrs.get("format_version", -1))
        if version != KINDS[kind]:
            raise DataFormatError(
                f"{path}: {kind!r} format version {version} is not supported by cgflow "
                f"{__version__} (reads version {KINDS[kind]})"
            )
        names = [n for n in f if isinstance(f[n], h5py.Dataset)]
        wanted = names if datasets is None else list(datasets)
        absent = [n for n in wanted if n not in names]
        if absent:
            raise DataFormatError(f"{path} ({kind!r}) lacks dataset(s) {absent}; has {names}")
        arrays = {n: f[n][()] for n in wanted}
        units = {n: str(f[n].attrs.get("units", "")) for n in wanted}
        attrs = {k: _from_attr(v) for k, v in f.attrs.items()}
        counters = {k: int(v) for k, v in f["counters"].attrs.items()} if "counters" in f else {}
    return H5Data(kind=kind, arrays=arrays, units=units, attrs=attrs, counters=counters)


def _from_attr(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_kind(path: str | os.PathLike) -> str:
    """The ``kind`` attribute of a file (for dispatch and error messages)."""
    with _open_for_reading(Path(path)) as f:
        return str(f.attrs.get("kind", ""))
