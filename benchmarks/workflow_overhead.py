"""What the workflow costs beyond the science: per rule, the jobs' wall time against the time
their step spent computing, and the campaign's wall time against its in-process compute.

Runs ``snakemake --profile profiles/local --configfile CONFIG`` in a fresh copy of the workflow
(or, with ``--campaign-dir``, only reads a finished campaign and the wall time you give). Each
job's wall time comes from its ``benchmark:`` file; each step prints, as the last line of its log,
the seconds it spent on interpreter and cgflow start-up, on its own imports, on reading the config
(and building the system), and computing (:data:`cgflow.cli.TIMING_PREFIX`). Per rule it prints
the sums of these and the overhead, job time minus compute time (start-up, imports, set-up, I/O
outside the step). ``--in-process`` also runs the same config with ``cgflow run`` (one process,
no Snakemake) and prints its wall time and per-rule compute, the baseline of the ratios.

Figures against the workflow's targets (on 2 cores with nothing else running):

* a Müller–Brown campaign end to end <= 120 s (goal 60 s), final max |ΔF| <= 0.5 kT
  (previously measured: 377 s);
* start-up, imports and set-up <= 10 % of the campaign's wall time;
* ``cgflow wf check --help`` <= 0.3 s (previously measured: 1.6-2.2 s).

    python benchmarks/workflow_overhead.py [--config config/mueller_brown.yaml] [--cores 2]
        [--in-process]
    python benchmarks/workflow_overhead.py --campaign-dir results/aldp_laptop --wall-s 1700
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

from cgflow.cli import read_step_timing

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
#: figures measured before the workflow's start-up was cut (2-core machine)
BEFORE = {"mueller_brown_wall_s": 377.0, "check_help_s": 1.6}
STEP_KEYS = ("startup_s", "imports_s", "setup_s", "compute_s")


def step_timing(log: Path) -> dict[str, float] | None:
    """The timing line a step printed last in its log (None: no such line)."""
    t = read_step_timing(log)
    return None if t is None else {k: float(t[k] or 0.0) for k in STEP_KEYS}


def job_times(campaign_dir: Path) -> pd.DataFrame:
    """One row per job: rule, job, wall seconds ``s`` (benchmark files) and the step's own
    timing from its log (NaN where the log has none)."""
    rows = []
    for tsv in sorted((campaign_dir / "benchmarks").glob("*/*.tsv")):
        t = pd.read_csv(tsv, sep="\t")
        row = {"rule": tsv.parent.name, "job": tsv.stem, "s": float(t["s"].iloc[-1])}
        timing = step_timing(campaign_dir / "logs" / tsv.parent.name / f"{tsv.stem}.log")
        row.update(timing or {k: float("nan") for k in STEP_KEYS})
        rows.append(row)
    if not rows:
        raise SystemExit(f"no benchmark files under {campaign_dir / 'benchmarks'}")
    return pd.DataFrame(rows)


def _copy_workflow() -> Path:
    tmp = Path(tempfile.mkdtemp(prefix="cgflow-overhead-"))
    for name in COPIED:
        src, dst = ROOT / name, tmp / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    return tmp


def _env() -> dict[str, str]:
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")


def run_workflow(config: Path, cores: int) -> tuple[Path, float]:
    """Run the campaign of ``config`` with Snakemake in a temporary copy; its folder, wall s."""
    tmp = _copy_workflow()
    campaign = yaml.safe_load(config.read_text())["campaign"]
    cmd = [sys.executable, "-m", "snakemake", "--profile", "profiles/local"]
    cmd += ["--configfile", str(config.resolve()), "--cores", str(cores)]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=tmp, env=_env(), check=True, capture_output=True)
    return tmp / "results" / campaign, time.perf_counter() - t0


def run_in_process(config: Path) -> tuple[Path, float]:
    """The same campaign with ``cgflow run`` (one process); its folder and wall seconds."""
    tmp = Path(tempfile.mkdtemp(prefix="cgflow-inprocess-"))
    campaign = yaml.safe_load(config.read_text())["campaign"]
    cmd = [sys.executable, "-m", "cgflow.cli", "run", "--configfile", str(config.resolve())]
    cmd += ["--results", str(tmp / "results")]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=_env(), check=True, capture_output=True)
    return tmp / "results" / campaign, time.perf_counter() - t0


def help_seconds(repeats: int = 5) -> float:
    """Median wall seconds of ``cgflow wf check --help`` in a new process."""
    exe = Path(sys.executable).parent / "cgflow"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "cgflow.cli"]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([*cmd, "wf", "check", "--help"], check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def final_max_dF(campaign_dir: Path) -> float | None:
    """The last iteration's max |ΔF| (systems with an exact PMF), from ``summary.csv``."""
    path = campaign_dir / "summary.csv"
    if not path.exists():
        return None
    s = pd.read_csv(path)
    col = "metric_max_abs_dF_kT"
    return float(s[col].dropna().iloc[-1]) if col in s and s[col].notna().any() else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=ROOT / "config" / "mueller_brown.yaml")
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--campaign-dir", type=Path, help="read a finished campaign instead of running")
    p.add_argument("--wall-s", type=float, help="its measured wall time (with --campaign-dir)")
    p.add_argument("--in-process", action="store_true", help="also run it with `cgflow run`")
    args = p.parse_args(argv)
    if args.campaign_dir is not None:
        if args.wall_s is None:
            p.error("--campaign-dir needs --wall-s")
        campaign_dir, wall = args.campaign_dir, args.wall_s
    else:
        campaign_dir, wall = run_workflow(args.config, args.cores)
    all_jobs = job_times(campaign_dir)
    jobs = all_jobs.dropna(subset=list(STEP_KEYS))  # jobs whose log has the timing line
    cols = ["s", *STEP_KEYS]
    per_rule = jobs.groupby("rule")[cols].sum()
    per_rule.insert(0, "jobs", jobs.groupby("rule").size())
    per_rule["overhead_s"] = per_rule["s"] - per_rule["compute_s"]
    per_rule = per_rule.sort_values("s", ascending=False)
    print(per_rule.round(1).to_string())
    total = jobs["s"].sum()
    compute = jobs["compute_s"].sum()
    before = jobs[["startup_s", "imports_s", "setup_s"]].sum().sum()
    print(f"\ncampaign             {campaign_dir}")
    print(f"jobs                 {len(all_jobs)}")
    if len(jobs) < len(all_jobs):
        print(
            f"                     {len(all_jobs) - len(jobs)} of them without a timing line in"
            " their log (a rule that is not a `cgflow wf` step, or an older release): left out"
            " of the sums below"
        )
    print(f"wall time            {wall:9.1f} s")
    print(
        f"sum of job times     {all_jobs['s'].sum():9.1f} s   (wall / sum ="
        f" {wall / all_jobs['s'].sum():.2f}x); of the jobs with a timing line {total:.1f} s"
    )
    print(f"sum of step compute  {compute:9.1f} s")
    print(
        f"start-up+imports+set-up {before:6.1f} s = {100 * before / wall:.1f} % of the wall time"
        f" (target <= 10 %: {'met' if before <= 0.1 * wall else 'MISSED'})"
    )
    print(
        f"job time - compute   {total - compute:9.1f} s = {100 * (total - compute) / wall:.1f} %"
        " of the wall time (start-up, imports, set-up, I/O outside the step)"
    )
    dF = final_max_dF(campaign_dir)
    if dF is not None:
        print(
            f"final max |dF|       {dF:9.2f} kT (criterion <= 0.5 kT: "
            f"{'met' if dF <= 0.5 else 'MISSED'}); wall {wall:.0f} s vs target 120 s (goal 60 s),"
            f" {BEFORE['mueller_brown_wall_s'] / wall:.1f}x faster than the"
            f" {BEFORE['mueller_brown_wall_s']:.0f} s measured before (Müller–Brown)"
        )
    if args.in_process:
        ip_dir, ip_wall = run_in_process(args.config)
        ip = job_times(ip_dir).groupby("rule")["s"].sum()
        print("\nin-process (`cgflow run`) compute per rule, s:")
        print(ip.sort_values(ascending=False).round(1).to_string())
        print(
            f"in-process wall time {ip_wall:9.1f} s; the workflow took {wall / ip_wall:.2f}x that"
        )
    h = help_seconds()
    print(
        f"cgflow wf check --help {h:7.2f} s (target <= 0.3 s: {'met' if h <= 0.3 else 'MISSED'};"
        f" {BEFORE['check_help_s'] / h:.1f}x faster than the {BEFORE['check_help_s']} s measured"
        " before)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
