"""The Snakemake workflow end to end on the Müller–Brown test overlay (config/test_mb.yaml).

Each test runs in a private copy of the workflow files, so results/ and .snakemake/ of the
repository are never touched.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).parents[1]
CAMPAIGN = "results/mb_test"
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
#: what the workflow needs besides the package: its files and the torch-free config module
WORKFLOW_FILES = (
    "Snakefile",
    "workflow",
    "config",
    "envs",
    "profiles",
    "data/baselines/speedup",
    "src/cgflow/config.py",
    "src/cgflow/config.schema.yaml",
)


def workdir(tmp: Path) -> Path:
    for name in WORKFLOW_FILES:
        src, dst = REPO / name, tmp / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    return tmp


def snakemake(
    wd: Path,
    *args: str,
    targets: tuple[str, ...] = (),
    env: dict | None = None,
    check: bool = True,
    timeout: int = 900,
):
    # targets first: options taking several values would swallow them
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        *targets,
        "--configfile",
        "config/test_mb.yaml",
        "--cores",
        "2",
        "--force-use-threads",  # as both profiles: the cheap rules run in this process
        *args,
    ]
    res = subprocess.run(
        cmd, cwd=wd, env=env or ENV, capture_output=True, text=True, timeout=timeout
    )
    if check and res.returncode != 0:
        raise AssertionError(
            f"snakemake {' '.join(args)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        )
    return res


def comparable(summary: Path) -> pd.DataFrame:
    df = pd.read_csv(summary)
    return df[[c for c in df.columns if not c.startswith("seconds_")]]


def assert_same_summary(a: Path, b: Path) -> None:
    da, db = comparable(a), comparable(b)
    assert list(da.columns) == list(db.columns)
    for col in da.columns:
        if col.startswith(("evals_", "cum_evals_", "n_")) or col in (
            "iteration",
            "N",
            "converged",
            "reason",
        ):
            assert list(da[col]) == list(db[col]), col
        else:
            pd.testing.assert_series_equal(
                da[col], db[col], rtol=1e-6, atol=1e-9, check_names=False
            )


@pytest.fixture(scope="module")
def complete_run(tmp_path_factory):
    wd = workdir(tmp_path_factory.mktemp("wf_full"))
    t0 = time.perf_counter()
    snakemake(wd)
    print(f"Müller–Brown test overlay: {time.perf_counter() - t0:.0f} s")
    return wd


def test_end_to_end(complete_run):
    wd = complete_run
    df = pd.read_csv(wd / CAMPAIGN / "summary.csv")
    assert list(df["iteration"]) == [0, 1, 2, 3]  # max_iterations 3: reaches iteration 2 and beyond
    assert df["N"].is_monotonic_increasing and df["N"].iloc[0] == df["cum_evals_start_md"].iloc[0]
    assert bool(df["converged"].iloc[-1]) and df["reason"].iloc[-1] in (
        "max iterations",
        "walkers exhausted",
    )
    assert (df["evals_labels"].iloc[1:] > 0).all() and (df["evals_training"].iloc[1:] > 0).all()
    assert "seconds_finetune" in df.columns
    for k in (1, 2, 3):
        it = wd / CAMPAIGN / f"iter_{k:03d}"
        for name in (
            "flow.pt",
            "train.h5",
            "labels.h5",
            "ensemble.pt",
            "metrics.json",
            "pmf.png",
            "walkers.h5",
            "points.h5",
            "status.json",
        ):
            assert (it / name).exists(), it / name
        assert sorted(p.name for p in (it / "energies").iterdir()) == ["shard_0.h5", "shard_1.h5"]
        assert (wd / CAMPAIGN / "logs" / "finetune" / f"iter_{k:03d}.log").exists()
    assert (wd / CAMPAIGN / "convergence.png").stat().st_size > 1000
    assert not (wd / CAMPAIGN / "backmap").exists()  # Müller–Brown has no all-atom topology
    # no temporary file left behind
    assert not list((wd / CAMPAIGN).rglob(".*.tmp*"))
    again = snakemake(wd, "-n")
    assert "Nothing to be done" in again.stdout + again.stderr


def test_overhead_benchmark_reads_every_job(complete_run):
    """benchmarks/workflow_overhead.py pairs each job's benchmark file with its step's timing."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from workflow_overhead import STEP_KEYS, job_times
    finally:
        sys.path.pop(0)
    jobs = job_times(complete_run / CAMPAIGN)
    assert {"finetune", "sample", "energy", "gather", "ensemble", "check"} <= set(jobs["rule"])
    assert (jobs["rule"] == "energy").sum() == 2 * 3  # two shards, three iterations
    steps = jobs.dropna(subset=list(STEP_KEYS))
    assert len(steps) == len(jobs), jobs[jobs[list(STEP_KEYS)].isna().any(axis=1)]
    assert (steps["compute_s"] >= 0).all() and (steps["s"] > 0).all()


def test_report_of_the_finished_campaign(complete_run):
    wd = complete_run
    t0 = time.perf_counter()
    snakemake(wd, "--report", "report.html")
    print(f"report: {time.perf_counter() - t0:.0f} s")
    html = (wd / "report.html").read_text(errors="replace")
    assert len(html) > 100_000
    for name in ("convergence.png", "summary.csv", "pmf.png"):
        assert name in html, name


def test_forcerun_redoes_iteration_two_onward(complete_run):
    wd = complete_run
    before = {
        p: p.stat().st_mtime_ns
        for p in (wd / CAMPAIGN).rglob("*")
        if p.is_file() and p.suffix in (".h5", ".pt", ".json")
    }
    snakemake(wd, "--forcerun", f"{CAMPAIGN}/iter_002/flow.pt")
    changed = {p for p, t in before.items() if p.stat().st_mtime_ns != t}
    assert changed, "nothing was rerun"
    iterations = {p.relative_to(wd / CAMPAIGN).parts[0] for p in changed}
    assert iterations <= {"iter_002", "iter_003"} and "iter_002" in iterations


def failing_cgflow(folder: Path, shard: int) -> dict:
    """An environment whose `cgflow` fails the energy job of one shard and runs the real
    command otherwise (failure injection stays in the tests)."""
    folder.mkdir(parents=True, exist_ok=True)
    fake = folder / "cgflow"
    real = Path(sys.executable).parent / "cgflow"
    fake.write_text(
        "#!/bin/sh\n"
        f'case " $* " in *" wf energy "*"--shard {shard} "*)\n'
        f'  echo "failure injected into energy shard {shard}" >&2; exit 1;;\n'
        "esac\n"
        f'exec "{real}" "$@"\n'
    )
    fake.chmod(0o755)
    return {**ENV, "PATH": f"{folder}{os.pathsep}{ENV['PATH']}"}


def test_failed_shard_reruns_only_that_shard(tmp_path, complete_run):
    wd = workdir(tmp_path / "wd")
    res = snakemake(wd, env=failing_cgflow(tmp_path / "bin", 1), check=False)
    assert res.returncode != 0
    failed_log = wd / CAMPAIGN / "logs" / "energy" / "iter_001_shard_1.log"
    assert "failure injected into energy shard 1" in failed_log.read_text()
    assert not (wd / CAMPAIGN / "iter_001" / "energies" / "shard_1.h5").exists()
    done = {p: p.stat().st_mtime_ns for p in (wd / CAMPAIGN).rglob("*.h5")}
    plan = snakemake(wd, "-n", "--quiet", "rules")
    assert (
        "energy" in plan.stdout
        and "start" not in plan.stdout.split()
        and "sample" not in plan.stdout.split()
    )
    snakemake(wd)
    assert all(p.stat().st_mtime_ns == t for p, t in done.items()), "a finished job was rerun"
    assert_same_summary(wd / CAMPAIGN / "summary.csv", complete_run / CAMPAIGN / "summary.csv")


def test_in_process_runner_gives_the_workflow_summary(tmp_path, complete_run):
    """One path: cgflow.campaign.run_campaign calls the rules' stage functions in the rules'
    order with their seeds and backends, so the summary is the workflow's (counts exact,
    metrics to rtol 1e-6), and Snakemake then finds nothing to do in its folder."""
    import yaml

    from cgflow.campaign import run_campaign

    wd = workdir(tmp_path)
    cfg = yaml.safe_load((wd / "config" / "test_mb.yaml").read_text())
    root = run_campaign(cfg, wd / "results", log=lambda m: None)
    assert_same_summary(root / "summary.csv", complete_run / CAMPAIGN / "summary.csv")
    res = snakemake(wd, "-n")
    assert "Nothing to be done" in res.stdout + res.stderr, res.stdout[-2000:]


def test_heavy_steps_in_process_give_the_same_summary(tmp_path, complete_run):
    """`steps_in_process: true` runs finetune, sample, energy and ensemble inside the Snakemake
    process (no interpreter per job: their logs report no start-up) with the same results;
    each step computes with its rule's threads (the tiny Müller–Brown networks give the same
    numbers with two)."""
    from cgflow.cli import read_step_timing

    wd = workdir(tmp_path)
    snakemake(wd, "--config", "steps_in_process=True", "threads=2")
    assert_same_summary(wd / CAMPAIGN / "summary.csv", complete_run / CAMPAIGN / "summary.csv")
    for rule, threads in (("finetune", 2), ("sample", 1), ("energy", 1), ("ensemble", 2)):
        timings = [read_step_timing(p) for p in (wd / CAMPAIGN / "logs" / rule).glob("*.log")]
        assert timings and all(t["startup_s"] == 0.0 for t in timings), rule
        assert all(t["torch_threads"] == threads for t in timings), rule
        shell = [
            read_step_timing(p) for p in (complete_run / CAMPAIGN / "logs" / rule).glob("*.log")
        ]
        assert shell and all(t["startup_s"] > 0.0 for t in shell), rule


def test_kill_and_resume_gives_the_same_summary(tmp_path, complete_run):
    wd = workdir(tmp_path)
    cmd = [sys.executable, "-m", "snakemake", "--configfile", "config/test_mb.yaml", "--cores", "2"]
    cmd.append("--force-use-threads")
    proc = subprocess.Popen(
        cmd,
        cwd=wd,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    target = wd / CAMPAIGN / "iter_002" / "flow.pt"
    deadline = time.time() + 600
    while not target.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert target.exists(), "the run did not reach iteration 2"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (wd / CAMPAIGN / "summary.csv").exists()
    # no half-written file under a declared output name: every HDF5 output opens
    from cgflow.data import read_kind

    for p in (wd / CAMPAIGN).rglob("*.h5"):
        assert read_kind(p)
    snakemake(wd, "--unlock")  # a killed Snakemake leaves its lock behind
    snakemake(wd, "--rerun-incomplete")
    assert_same_summary(wd / CAMPAIGN / "summary.csv", complete_run / CAMPAIGN / "summary.csv")


def test_dry_run_plans(tmp_path):
    wd = workdir(tmp_path)
    res = snakemake(wd, "-n", "--quiet", "rules", targets=(f"{CAMPAIGN}/iter_002/points.h5",))
    counts = {}
    for line in res.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
    expected = {
        "config_snapshot": 1,
        "start": 1,
        "pretrain": 1,
        "initial_points": 1,
        "finetune": 2,
        "sample": 4,
        "energy": 4,
        "gather": 2,
        "ensemble": 2,
        "walkers": 2,
        "select": 2,
    }
    assert {k: counts.get(k) for k in expected} == expected, res.stdout
    assert counts.get("total") == sum(expected.values())
    plain = snakemake(wd, "-n", "-p", "--config", "threads=2")
    assert "start" in plain.stdout
    # the steps that run alone get the config's threads (capped at --cores), the others one
    jobs = {m[1]: m[2] for m in re.finditer(r"rule (\w+):\n(.*?)(?=\n\[|\Z)", plain.stdout, re.S)}
    for step in ("finetune", "ensemble"):
        assert re.search(r"threads: 2\n", jobs[step]), jobs[step]
    assert "threads:" not in jobs["sample"]


def test_bad_config_key_fails_before_any_job(tmp_path):
    wd = workdir(tmp_path)
    res = snakemake(wd, "-n", "--config", "bogus_key=1", check=False)
    assert res.returncode != 0 and "bogus_key" in res.stdout + res.stderr
    assert not (wd / "results").exists()


def test_speedup_without_baselines_names_the_missing_key(tmp_path):
    wd = workdir(tmp_path)
    res = snakemake(wd, "-n", targets=(f"{CAMPAIGN}/speedup.csv",), check=False)
    assert res.returncode != 0 and "set `baselines` in the config" in res.stdout + res.stderr


def test_lint_and_format():
    res = subprocess.run(
        [sys.executable, "-m", "snakemake", "--lint"],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    fmt = subprocess.run(
        [str(Path(sys.executable).parent / "snakefmt"), "--check", "Snakefile", "workflow"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_slurm_profile_dry_run_resolves_resources(tmp_path):
    wd = workdir(tmp_path)
    res = snakemake(wd, "-n", "--profile", "profiles/slurm")
    assert res.returncode == 0


@pytest.mark.parametrize(
    "config",
    ["config.yaml", "mueller_brown.yaml", "aldp_paper.yaml", "aldp_grid.yaml", "test_mb.yaml"],
)
def test_every_shipped_config_validates_and_plans(tmp_path, config):
    wd = workdir(tmp_path)
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-n",
        "--configfile",
        f"config/{config}",
        "--cores",
        "1",
    ]
    res = subprocess.run(cmd, cwd=wd, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "start" in res.stdout
    # backmapped structures and the speedup table against the shipped baselines only for the
    # molecule (a system with an all-atom topology and the reference)
    assert ("backmap" in res.stdout) == config.startswith(("config", "aldp"))
    assert ("speedup" in res.stdout) == config.startswith(("config", "aldp"))
