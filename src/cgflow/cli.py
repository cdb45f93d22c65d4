"""Command line: ``cgflow <subcommand>``; heavy libraries are imported inside each command.

Subcommands:

* ``cgflow reference export-engine OUT`` — torch force field + masses + start structures of
  alanine dipeptide (needs OpenMM once; chunks then need torch only).
* ``cgflow reference chunk --engine E --index k [--previous P] --out F`` — one resumable chunk
  of replica-exchange sampling (histogram counts at 300 K, time series, final state).
* ``cgflow reference merge CHUNK... --out REF`` — add chunks into the reference file and print
  its statistics (ESS, φ > 0 population, KLD noise floors).
* ``cgflow reference generate --dir D --chunks n`` — run/continue chunks in ``D`` until ``n``
  exist (skips finished ones), merging after each.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path


def _settings_from_args(args: argparse.Namespace):
    from .reference import ChunkSettings

    fields = {}
    for name in ChunkSettings.__dataclass_fields__:
        value = getattr(args, name, None)
        if value is not None:
            fields[name] = tuple(value) if name == "temperatures_K" else value
    return ChunkSettings(**fields)


def _add_chunk_options(p: argparse.ArgumentParser) -> None:
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


def _aldp():
    from .systems import get_system

    return get_system("alanine_dipeptide")


def build_parser() -> argparse.ArgumentParser:
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
    _add_chunk_options(p)
    ref.set_defaults(func=cmd_reference)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
