"""Wall time of a whole campaign against the time its jobs took: the Snakemake overhead.

Runs ``snakemake --profile profiles/local --configfile CONFIG`` in a fresh copy of the workflow
(or, with ``--campaign-dir``, only reads a finished campaign and the wall time you give), then
prints the wall time, the sum of the jobs' wall times (from their ``benchmark:`` files), their CPU
time, and the overhead: wall time minus the sum of job times.
On more than one core jobs overlap, so the overhead can be negative; the ratio wall / sum is
printed too (baseline: the sum of job times measured in the same run).

    python benchmarks/workflow_overhead.py [--config config/mueller_brown.yaml] [--cores 2]
    python benchmarks/workflow_overhead.py --campaign-dir results/aldp_laptop --wall-s 2400
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
#: the workflow's files; the rules read the torch-free config module and schema from src/
COPIED = (
    "Snakefile",
    "workflow",
    "config",
    "profiles",
    "envs",
    "data/baselines/speedup",
    "src/cgflow/config.py",
    "src/cgflow/config.schema.yaml",
)


def job_times(campaign_dir: Path) -> pd.DataFrame:
    """One row per job: rule, job name, wall seconds ``s`` and ``cpu_time`` from the benchmarks."""
    rows = []
    for tsv in sorted((campaign_dir / "benchmarks").glob("*/*.tsv")):
        t = pd.read_csv(tsv, sep="\t")
        rows.append(
            {
                "rule": tsv.parent.name,
                "job": tsv.stem,
                "s": float(t["s"].iloc[-1]),
                "cpu_time": float(t["cpu_time"].iloc[-1]),
            }
        )
    if not rows:
        raise SystemExit(f"no benchmark files under {campaign_dir / 'benchmarks'}")
    return pd.DataFrame(rows)


def run_campaign(config: Path, cores: int) -> tuple[Path, float]:
    """Run the campaign of ``config`` in a temporary copy; returns its folder and the wall time."""
    tmp = Path(tempfile.mkdtemp(prefix="cgflow-overhead-"))
    for name in COPIED:
        src, dst = ROOT / name, tmp / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    campaign = yaml.safe_load(config.read_text())["campaign"]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "--profile",
        "profiles/local",
        "--configfile",
        str(config.resolve()),
        "--cores",
        str(cores),
    ]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=tmp, env=env, check=True, capture_output=True)
    return tmp / "results" / campaign, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=ROOT / "config" / "mueller_brown.yaml")
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--campaign-dir", type=Path, help="read a finished campaign instead of running")
    p.add_argument("--wall-s", type=float, help="its measured wall time (with --campaign-dir)")
    args = p.parse_args(argv)
    if args.campaign_dir is not None:
        if args.wall_s is None:
            p.error("--campaign-dir needs --wall-s")
        campaign_dir, wall = args.campaign_dir, args.wall_s
    else:
        campaign_dir, wall = run_campaign(args.config, args.cores)
    jobs = job_times(campaign_dir)
    per_rule = jobs.groupby("rule")[["s", "cpu_time"]].sum().sort_values("s", ascending=False)
    print(per_rule.round(1).to_string())
    total, cpu = jobs["s"].sum(), jobs["cpu_time"].sum()
    print(f"\ncampaign         {campaign_dir}")
    print(f"jobs             {len(jobs)}")
    print(f"wall time        {wall:9.1f} s")
    print(f"sum of job times {total:9.1f} s   (CPU time {cpu:.1f} s)")
    print(
        f"overhead         {wall - total:9.1f} s   (wall / sum of job times = {wall / total:.2f}x)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
