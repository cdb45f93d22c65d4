"""Command line: ``cgflow <subcommand>``; heavy libraries are imported inside each command.

Subcommands:

* ``cgflow wf <step> ...`` — one workflow step (:mod:`cgflow.stages`); the Snakemake rules call these.
* ``cgflow run --configfile F`` — a whole campaign in this process, same files as the workflow.

:func:`run_step` runs a ``cgflow wf`` step inside the calling process (the workflow's cheap local
rules, in the Snakemake process), with its output in the job's log.

* ``cgflow reference export-engine OUT`` — torch force field + masses + start structures of
  alanine dipeptide (needs OpenMM once; chunks then need torch only).
* ``cgflow reference chunk --engine E --index k [--previous P] --out F`` — one resumable chunk
  of replica-exchange sampling (histogram counts at 300 K, time series, final state).
* ``cgflow reference merge CHUNK... --out REF`` — add chunks into the reference file and print
  its statistics (ESS, φ > 0 population, KLD noise floors).
* ``cgflow reference generate --dir D --chunks n`` — run/continue chunks in ``D`` until ``n``
  exist (skips finished ones), merging after each.
* ``cgflow baseline metad --out F`` — well-tempered metadynamics on φ/ψ (resumable).
* ``cgflow baseline opes --out F`` — OPES on φ/ψ, or on ``x - y`` of Müller–Brown (resumable).
* ``cgflow baseline speedup --campaign S... --md M --metad R... --opes R... --out-dir D`` —
  points of every method and seed (campaign, plain MD, metadynamics, OPES), the speedup table
  and the curves.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shlex
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

#: prefix of the line each workflow step prints last (read by benchmarks/workflow_overhead.py)
TIMING_PREFIX = "cgflow step seconds:"


#: per thread: the log file a step run by :func:`run_step` writes to (unset: the real streams)
_step_output = threading.local()
#: one in-process step at a time (the steps share torch's and matplotlib's global state)
_step_lock = threading.Lock()
_install_lock = threading.Lock()


class _ThreadRoutedStream(io.TextIOBase):
    """Stands in for ``sys.stdout``/``sys.stderr``: writes of a thread running a step go to its
    log file, every other thread's to the stream this one replaced."""

    def __init__(self, original: TextIO) -> None:
        self.original = original

    def _target(self) -> TextIO:
        return getattr(_step_output, "log", None) or self.original

    def write(self, text: str) -> int:
        return self._target().write(text)

    def flush(self) -> None:
        self._target().flush()

    def fileno(self) -> int:
        return self.original.fileno()

    def isatty(self) -> bool:
        return self._target().isatty()


def _route_streams() -> None:
    with _install_lock:
        if not isinstance(sys.stdout, _ThreadRoutedStream):
            sys.stdout = _ThreadRoutedStream(sys.stdout)
        if not isinstance(sys.stderr, _ThreadRoutedStream):
            sys.stderr = _ThreadRoutedStream(sys.stderr)


class StepError(RuntimeError):
    """A step run by :func:`run_step` ended with a non-zero status (its log says why)."""


def run_step(argv: list[str], log: str | os.PathLike, threads: int = 1) -> None:
    """Run ``cgflow <argv>`` in this process, its printed output going to ``log`` (created anew),
    as the workflow's run: rules do; raises :class:`StepError` if the step fails. A ``wf`` step
    computes with ``threads`` torch threads (a shell job reads ``CGFLOW_TORCH_THREADS``).

    Steps run one at a time (a lock), in whatever thread calls; other threads keep printing to
    the real streams. Output written below Python (C libraries) is not captured."""
    argv = [str(a) for a in argv]
    _route_streams()
    with _step_lock, open(log, "w", encoding="utf-8") as out:
        _step_output.log = out
        _step_output.threads = threads
        try:
            try:
                status = main(argv)
            except SystemExit as exc:  # argparse errors
                status = exc.code if isinstance(exc.code, int) else 2
            except Exception as exc:
                import traceback

                traceback.print_exc(file=out)
                raise StepError(f"`cgflow {shlex.join(argv)}` failed: {exc} (log: {log})") from exc
        finally:
            out.flush()
            _step_output.log = None
            _step_output.threads = None
    if status:
        raise StepError(f"`cgflow {shlex.join(argv)}` exited with status {status} (log: {log})")


def read_step_timing(log: str | os.PathLike) -> dict[str, Any] | None:
    """The :data:`TIMING_PREFIX` line a step printed last in its log, as a dict (None: the
    log is missing or has no such line)."""
    path = Path(log)
    if not path.exists():
        return None
    for line in reversed(path.read_text(errors="replace").splitlines()):
        if line.startswith(TIMING_PREFIX):
            return json.loads(line[len(TIMING_PREFIX) :])
    return None


def process_age_s() -> float | None:
    """Seconds since this process started (Linux ``/proc``; None elsewhere)."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return None
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def _print_timing(step: str, started: float, imported: float, configured: float) -> None:
    """The step's own time apart from what the process spent before it: interpreter and cgflow
    start-up, the step's imports, reading the config and building the system."""
    now = time.perf_counter()
    if getattr(_step_output, "log", None) is not None:
        before: float | None = 0.0  # no interpreter started for it (run_step)
    else:
        age = process_age_s()
        before = None if age is None else max(age - (now - started), 0.0)
    timing = {
        "step": step,
        "startup_s": before,
        "imports_s": imported - started,
        "setup_s": configured - imported,
        "compute_s": now - configured,
    }
    if "torch" in sys.modules:  # the CPU threads the step computed with
        timing["torch_threads"] = sys.modules["torch"].get_num_threads()
    print(f"{TIMING_PREFIX} {json.dumps(timing)}", flush=True)


def _settings_from_args(args: argparse.Namespace):
    from .reference import ChunkSettings

    fields = {}
    for name in ChunkSettings.__dataclass_fields__:
        value = getattr(args, name, None)
        if value is not None:
            fields[name] = tuple(value) if name == "temperatures_K" else value
    return ChunkSettings(**fields)


def _add_chunk_options(p: argparse.ArgumentParser) -> None:
    """Options of a reference chunk (their defaults come from the reference module, which
    imports torch: the parser adds them only when the ``reference`` command is parsed)."""
    from .reference import ChunkSettings

    d = ChunkSettings()
    p.add_argument(
        "--temperatures-K",
        dest="temperatures_K",
        type=float,
        nargs="+",
        help=f"ladder (default {d.temperatures_K})",
    )
    for name, typ in (
        ("n_ladders", int),
        ("steps", int),
        ("timestep_fs", float),
        ("friction_per_ps", float),
        ("hydrogen_mass_amu", float),
        ("exchange_every", int),
        ("sample_every", int),
        ("series_every", int),
        ("equilibration_steps", int),
        ("seed", int),
        ("device", str),
        ("dtype", str),
        ("start", str),
    ):
        p.add_argument(
            "--" + name.replace("_", "-"), dest=name, type=typ, help=f"default {getattr(d, name)}"
        )


def _print_summary(path: Path) -> None:
    from .reference import load_reference

    ref = load_reference(path)
    print(json.dumps(json.loads(ref.attrs["summary"]), indent=1))


def cmd_reference(args: argparse.Namespace) -> int:
    from . import reference as r

    command = "cgflow " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if args.action == "export-engine":
        from .systems import get_system

        path = r.export_engine(get_system("alanine_dipeptide"), args.out)
        print(f"wrote {path}")
    elif args.action == "chunk":
        settings = _settings_from_args(args)
        path = r.run_chunk(
            args.engine, args.out, args.index, args.previous, settings, command=command
        )
        print(f"wrote {path}")
    elif args.action == "merge":
        path = r.merge_chunks(args.chunks, args.out, discard=args.discard_chunks)
        _print_summary(path)
    elif args.action == "generate":
        settings = _settings_from_args(args)
        folder = Path(args.dir)
        folder.mkdir(parents=True, exist_ok=True)
        engine = folder / "engine.pt"
        if not engine.exists():
            r.export_engine(_aldp(), engine)
        for k in range(args.chunks):
            out = folder / f"chunk_{k:04d}.h5"
            if out.exists():
                continue
            prev = folder / f"chunk_{k - 1:04d}.h5" if k else None
            r.run_chunk(engine, out, k, prev, settings, command=command)
            chunks = sorted(folder.glob("chunk_*.h5"))
            if len(chunks) <= args.discard_chunks:
                print(f"chunk {k} done (burn-in, not merged)", flush=True)
                continue
            merged = r.merge_chunks(chunks, args.out, discard=args.discard_chunks)
            print(f"chunk {k} done; merged {len(chunks)} chunks into {merged}", flush=True)
        if Path(args.out).exists():
            _print_summary(Path(args.out))
    return 0


def cmd_wf(args: argparse.Namespace) -> int:
    """Workflow steps: parse, then call the stage function of :mod:`cgflow.stages`; the last
    line printed gives the seconds of start-up (interpreter and cgflow), of the step's imports
    and of the step itself (:data:`TIMING_PREFIX`)."""
    import os

    started = time.perf_counter()
    if args.step == "check":  # needs no configuration and no torch
        from .stages.status import check

        imported = time.perf_counter()

        status = check(
            args.iteration,
            args.walkers,
            args.metrics,
            args.out,
            args.max_iterations,
            args.stop_metric,
            args.stop_threshold,
        )
        print(json.dumps(status))
        _print_timing(args.step, started, imported, imported)
        return 0
    if args.step == "snapshot":  # no torch either
        from .config import write_snapshot

        imported = time.perf_counter()
        write_snapshot(json.loads(args.json), args.out)
        _print_timing(args.step, started, imported, imported)
        return 0
    import torch

    threads = getattr(_step_output, "threads", None)  # set by run_step
    torch.set_num_threads(threads or int(os.environ.get("CGFLOW_TORCH_THREADS", "1")))
    from . import config as cfgmod
    from .stages import ensemble, evaluate, labels, report, select, start, train
    from .stages.settings import Settings

    if args.step in ("pretrain", "finetune"):
        # torch.optim's first step imports torch._dynamo (about 1.8 s): an import, not compute
        import torch._dynamo

    imported = time.perf_counter()
    if args.step == "speedup":
        report.speedup(args.summary, args.baselines, args.out, args.out_md)
        _print_timing(args.step, started, imported, imported)
        return 0
    st = Settings.load(args.config)
    configured = time.perf_counter()
    a, k = args, getattr(args, "iteration", 0)
    calls = {
        "start": lambda: start.start(st, a.out),
        "pretrain": lambda: start.pretrain(st, a.start, a.out),
        "initial-points": lambda: start.initial_points(st, a.start, a.out),
        "finetune": lambda: train.finetune(
            st, k, a.flow, a.points, a.out_flow, a.out_train, a.ensemble, a.labels
        ),
        "sample": lambda: labels.sample(
            st, k, a.flow, a.points, a.shard, a.n_shards, a.out, a.ensemble, a.labels
        ),
        "energy": lambda: labels.energy(st, a.samples, a.shard, a.out),
        "gather": lambda: labels.gather(
            st, k, a.points, a.samples, a.energies, a.out, a.previous_labels
        ),
        "ensemble": lambda: ensemble.ensemble(st, k, a.labels, a.out),
        "evaluate": lambda: evaluate.evaluate(
            st, k, a.ensemble, a.points, a.labels, a.out_metrics, a.out_plot
        ),
        "walkers": lambda: select.walkers(st, k, a.ensemble, a.points, a.start, a.out),
        "select": lambda: select.select(st, k, a.walkers, a.points, a.out),
        "backmap": lambda: report.backmap(
            st, a.flow, json.loads(a.points), a.structures, a.out_dir
        ),
        "summary": lambda: report.summary(
            st,
            **cfgmod.summary_files(a.campaign_dir, a.iterations, st["energy"]["shards"]),
            out=a.out,
            plot_out=a.out_plot,
            baselines=a.baselines,
        ),
    }
    calls[args.step]()
    _print_timing(args.step, started, imported, configured)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """The campaign of a config file in this process (the workflow's stages and files)."""
    import os

    import torch
    import yaml

    from .campaign import run_campaign

    torch.set_num_threads(int(os.environ.get("CGFLOW_TORCH_THREADS", "1")))
    cfg = yaml.safe_load(args.configfile.read_text()) or {}
    for item in args.config or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--config {item!r}: use KEY=VALUE (VALUE in YAML)")
        cfg[key] = yaml.safe_load(value)
    root = run_campaign(cfg, args.results, log=lambda m: print(m, flush=True))
    print(f"summary: {root / 'summary.csv'}")
    return 0


def _add_wf(sub: argparse._SubParsersAction) -> None:
    wf = sub.add_parser("wf", help="workflow steps (one per Snakemake rule)")
    ws = wf.add_subparsers(dest="step", required=True)
    P = Path

    def step(name: str, *opts: tuple[str, dict], iteration: bool = False) -> None:
        p = ws.add_parser(name)
        if name not in ("snapshot", "check", "speedup"):
            p.add_argument("--config", type=P, required=True, help="the campaign's config snapshot")
        if iteration:
            p.add_argument("--iteration", type=int, required=True)
        for flag, kw in opts:
            p.add_argument(flag, **kw)

    req = {"type": P, "required": True}
    step("snapshot", ("--json", {"required": True}), ("--out", req))
    step("start", ("--out", req))
    step("pretrain", ("--start", req), ("--out", req))
    step("initial-points", ("--start", req), ("--out", req))
    step(
        "finetune",
        ("--flow", req),
        ("--points", req),
        ("--ensemble", {"type": P, "default": None}),
        ("--labels", {"type": P, "default": None}),
        ("--out-flow", req),
        ("--out-train", req),
        iteration=True,
    )
    step(
        "sample",
        ("--flow", req),
        ("--points", req),
        ("--shard", {"type": int, "required": True}),
        ("--n-shards", {"type": int, "required": True}),
        ("--ensemble", {"type": P, "default": None}),
        ("--labels", {"type": P, "default": None}),
        ("--out", req),
        iteration=True,
    )
    step("energy", ("--samples", req), ("--shard", {"type": int, "required": True}), ("--out", req))
    step(
        "gather",
        ("--points", req),
        ("--samples", {"type": P, "nargs": "+", "required": True}),
        ("--energies", {"type": P, "nargs": "+", "required": True}),
        ("--previous-labels", {"type": P, "default": None}),
        ("--out", req),
        iteration=True,
    )
    step("ensemble", ("--labels", req), ("--out", req), iteration=True)
    step(
        "evaluate",
        ("--ensemble", req),
        ("--points", req),
        ("--labels", req),
        ("--out-metrics", req),
        ("--out-plot", req),
        iteration=True,
    )
    step(
        "walkers",
        ("--ensemble", req),
        ("--points", req),
        ("--start", req),
        ("--out", req),
        iteration=True,
    )
    step("select", ("--walkers", req), ("--points", req), ("--out", req), iteration=True)
    step(
        "check",
        ("--walkers", req),
        ("--metrics", req),
        ("--out", req),
        ("--max-iterations", {"type": int, "required": True}),
        ("--stop-metric", {"default": None}),
        ("--stop-threshold", {"type": float, "default": None}),
        iteration=True,
    )
    step(
        "backmap",
        ("--flow", req),
        ("--points", {"required": True, "help": 'JSON {"name": [phi, psi], ...} (rad)'}),
        ("--structures", {"type": int, "required": True, "help": "structures per point"}),
        ("--out-dir", req),
    )
    step(
        "summary",
        ("--campaign-dir", {**req, "help": "results/<campaign>"}),
        ("--iterations", {"type": int, "required": True, "help": "last iteration n"}),
        ("--out", req),
        ("--out-plot", {"type": P, "default": None, "help": "convergence curves (PNG)"}),
        ("--baselines", {"type": P, "default": None, "help": "baseline points (CSV) to draw"}),
    )
    step("speedup", ("--summary", req), ("--baselines", req), ("--out", req), ("--out-md", req))
    wf.set_defaults(func=cmd_wf)


def cmd_baseline(args: argparse.Namespace) -> int:
    """Baselines: metadynamics runs and the speedup table."""
    from dataclasses import fields

    from .baselines import DEFAULT_TARGETS

    if args.action == "metad":
        from .metadynamics import MetadSettings, run_metadynamics
        from .systems import get_system

        names = {f.name for f in fields(MetadSettings)}
        kw = {k: v for k, v in vars(args).items() if k in names and v is not None}
        run_metadynamics(
            get_system(args.system),
            MetadSettings(**kw),
            args.out,
            log=lambda m: print(m, flush=True),
        )
    elif args.action == "opes":
        from .opes import OPESSettings, exact_pmf_errors, run_opes
        from .systems import get_system

        names = {f.name for f in fields(OPESSettings)}
        kw = {k: v for k, v in vars(args).items() if k in names and v is not None}
        system = get_system(args.system)
        run_opes(system, OPESSettings(**kw), args.out, log=lambda m: print(m, flush=True))
        if hasattr(system, "exact_pmf"):
            last = exact_pmf_errors(args.out, system)[-1]
            print(
                f"exact PMF: max |dF| {last['max_abs_dF_kT']:.3f} kT where F <= 10 kT "
                f"at {last['evaluations']:.3g} evaluations"
            )
    elif args.action == "speedup":
        from .baselines import build_speedup
        from .reference import load_reference

        campaigns: dict[str, list[Path]] = {}
        for spec in args.campaign:
            name, sep, path = spec.partition("=")
            name, path = (name or "campaign", path) if sep else ("campaign", spec)
            if Path(path) in campaigns.get(name, []):
                raise ValueError(f"--campaign: {path} is given twice for {name!r}")
            campaigns.setdefault(name, []).append(Path(path))
        table = build_speedup(
            args.out_dir,
            campaigns,
            md_h5=args.md,
            metad_h5=args.metad,
            opes_h5=args.opes,
            targets=args.target or DEFAULT_TARGETS,
            reference=load_reference(args.reference) if args.reference else None,
        )
        print((args.out_dir / "speedup.md").read_text())
        print(f"{len(table)} rows; points, table and curves in {args.out_dir}")
    return 0


def _add_baseline(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("baseline", help="baselines: metadynamics, OPES, plain MD curves, speedup")
    bs = b.add_subparsers(dest="action", required=True)
    p = bs.add_parser("metad", help="well-tempered metadynamics on the CG dihedrals (resumable)")
    p.add_argument("--out", type=Path, required=True, help="run file (HDF5); resumed if present")
    p.add_argument("--system", default="alanine_dipeptide")
    for flag, typ, hlp in (
        ("--n-steps", int, "total MD steps (= energy evaluations)"),
        ("--record-every", int, "steps between free-energy snapshots"),
        ("--sigma-rad", float, "Gaussian width (rad)"),
        ("--height-kJ-per-mol", float, "initial Gaussian height"),
        ("--bias-factor", float, "well-tempered bias factor"),
        ("--deposit-every", int, "steps between Gaussians"),
        ("--timestep-fs", float, None),
        ("--friction-per-ps", float, None),
        ("--hydrogen-mass-amu", float, "0 = no repartitioning"),
        ("--grid-width", int, "bias grid points per axis"),
        ("--seed", int, None),
        ("--platform", str, "OpenMM platform (CPU, CUDA, ...)"),
        ("--threads", int, "CPU platform threads"),
    ):
        p.add_argument(flag, type=typ, default=None, help=hlp)  # dest keeps the case: kJ
    p = bs.add_parser("opes", help="OPES (OPES_METAD) on the CG coordinates (resumable)")
    p.add_argument("--out", type=Path, required=True, help="run file (HDF5); resumed if present")
    p.add_argument("--system", default="alanine_dipeptide", help="or mueller_brown (s = x - y)")
    for flag, typ, hlp in (
        ("--n-steps", int, "total MD steps (= energy evaluations)"),
        ("--record-every", int, "steps between free-energy snapshots"),
        ("--pace", int, "steps between kernel deposits"),
        ("--barrier-kJ-per-mol", float, "the barrier parameter (sets epsilon)"),
        ("--sigma", float, "initial kernel width (CG units: rad, nm)"),
        ("--bias-factor", float, None),
        ("--compression-threshold", float, "merge a kernel within this many widths"),
        ("--timestep-fs", float, None),
        ("--friction-per-ps", float, None),
        ("--hydrogen-mass-amu", float, "0 = no repartitioning"),
        ("--bias-grid", int, "bias table points per axis"),
        ("--fes-grid", int, "free-energy snapshot points per axis"),
        ("--seed", int, None),
        ("--platform", str, "OpenMM platform (CPU, CUDA, ...)"),
        ("--threads", int, "CPU platform threads"),
    ):
        p.add_argument(flag, type=typ, default=None, help=hlp)
    p.add_argument(
        "--fixed-sigma",
        dest="shrink_sigma",
        action="store_const",
        const=False,
        default=None,
        help="keep the kernel width (default: shrink it with the effective sample size)",
    )
    p = bs.add_parser("speedup", help="points of every method and the speedup table")
    p.add_argument(
        "--campaign",
        action="append",
        required=True,
        help="[NAME=]summary.csv of a finished campaign (repeat, one per seed: the same NAME "
        "makes one method with several runs; the first NAME is the reference of the ratios)",
    )
    p.add_argument("--md", type=Path, default=None, help="plain-MD file with series_phi_psi")
    p.add_argument("--metad", type=Path, nargs="*", default=[], help="metadynamics run files")
    p.add_argument("--opes", type=Path, nargs="*", default=[], help="OPES run files")
    p.add_argument("--target", action="append", default=None, help="e.g. kld_std36<=0.05 (repeat)")
    p.add_argument("--reference", type=Path, default=None, help="reference file (default: shipped)")
    p.add_argument("--out-dir", type=Path, required=True)
    b.set_defaults(func=cmd_baseline)


def _aldp():
    from .systems import get_system

    return get_system("alanine_dipeptide")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The command-line parser; the reference chunk options (whose defaults need torch) are
    added only when ``argv`` is a ``reference`` command (or not given)."""
    full = argv is None or (len(argv) > 0 and argv[0] == "reference")
    parser = argparse.ArgumentParser(prog="cgflow", description="cgflow command line")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")

    ref = sub.add_parser("reference", help="alanine-dipeptide ground truth (replica exchange)")
    rsub = ref.add_subparsers(dest="action", required=True)
    p = rsub.add_parser("export-engine", help="write the torch engine file (needs OpenMM)")
    p.add_argument("out", type=Path)
    p = rsub.add_parser("chunk", help="run one chunk")
    p.add_argument("--engine", type=Path, required=True)
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--previous", type=Path, default=None)
    p.add_argument("--out", type=Path, required=True)
    if full:
        _add_chunk_options(p)
    p = rsub.add_parser("merge", help="merge chunks into a reference file")
    p.add_argument("chunks", type=Path, nargs="+")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--discard-chunks", type=int, default=0, help="burn-in chunks left out")
    p = rsub.add_parser("generate", help="run or continue chunks in a folder, merging after each")
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--chunks", type=int, required=True, help="total number of chunks wanted")
    p.add_argument("--out", type=Path, required=True, help="merged reference file")
    p.add_argument("--discard-chunks", type=int, default=0, help="burn-in chunks left out")
    if full:
        _add_chunk_options(p)
    ref.set_defaults(func=cmd_reference)
    _add_wf(sub)
    p = sub.add_parser("run", help="run or resume a campaign in this process (no Snakemake)")
    p.add_argument("--configfile", type=Path, required=True, help="campaign config (YAML)")
    p.add_argument("--config", action="append", help="KEY=VALUE override (VALUE in YAML; repeat)")
    p.add_argument("--results", type=Path, default=Path("results"), help="results folder")
    p.set_defaults(func=cmd_run)
    _add_baseline(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__

        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        print(f"cgflow {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
