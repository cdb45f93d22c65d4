"""The campaign under the SLURM profile: resources resolved without Slurm, and the Müller–Brown
test overlay (config/test_mb.yaml) run end to end on a private single-node Slurm cluster.

The cluster (tests/slurm/cluster.sh) runs munged, slurmctld and slurmd from the Debian packages
with its own configuration, ports and state in a temporary folder, and offers two fake GPUs as
gres, so `sbatch --gpus=1` schedules and the job sees CUDA_VISIBLE_DEVICES. The campaign uses
tests/slurm/profile: profiles/slurm with resource sizes that fit a small machine, no account and
squeue for job status. These tests need root and the packages (CI installs them in .ci/run):

    apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge

and are skipped, saying why, without them.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import h5py
import pandas as pd
import pytest
import yaml

from test_workflow import CAMPAIGN, ENV, REPO, assert_same_summary, snakemake, workdir

CLUSTER_SCRIPT = REPO / "tests" / "slurm" / "cluster.sh"
TEST_PROFILE = REPO / "tests" / "slurm" / "profile"
SHIPPED_PROFILE = REPO / "profiles" / "slurm"
SLURM_BINARIES = ("slurmctld", "slurmd", "munged", "sbatch", "srun", "squeue", "scontrol")
#: rules declaring a GPU; they go to the `gpu` partition with `sbatch --gpus=1`
GPU_RULES = {"energy", "finetune"}
#: rules submitted as Slurm jobs (the others are localrules of the Snakefile)
SUBMITTED_RULES = {"start", "pretrain", "finetune", "sample", "energy", "ensemble"}
#: (rule or "default", resource) of the test profile that differ from profiles/slurm: resource
#: sizes for a small machine
TEST_OVERRIDES = {
    ("default", "mem_mb"),
    ("energy", "cpus_per_task"),
    ("energy", "mem_mb"),
    ("finetune", "cpus_per_task"),
    ("finetune", "mem_mb"),
    ("ensemble", "cpus_per_task"),
}
#: rules the test profile adds to set-resources (their own 4 GB memory requests are lowered)
TEST_ONLY_RULES = {"start", "pretrain", "sample"}
OVERLAY = yaml.safe_load((REPO / "config" / "test_mb.yaml").read_text())
SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (\S+)\)")


def _missing_requirements() -> str | None:
    if os.geteuid() != 0:
        return "needs root to run a private Slurm cluster (slurmd starts jobs as their user)"
    missing = [exe for exe in SLURM_BINARIES if shutil.which(exe) is None]
    if missing:
        return (
            f"Slurm not installed ({', '.join(missing)} missing): apt-get install -y "
            "--no-install-recommends slurmctld slurmd slurm-client munge"
        )
    return None


needs_slurm = pytest.mark.skipif(
    _missing_requirements() is not None, reason=str(_missing_requirements())
)


# ------------------------------------------------------------------- without Slurm
def test_test_profile_follows_the_shipped_profile():
    """tests/slurm/profile repeats profiles/slurm except the listed resource sizes, so the
    end-to-end test exercises the shipped settings."""
    shipped = yaml.safe_load((SHIPPED_PROFILE / "config.yaml").read_text())
    test = yaml.safe_load((TEST_PROFILE / "config.yaml").read_text())
    for key, value in shipped.items():
        if key == "default-resources":
            for res, v in value.items():
                if ("default", res) not in TEST_OVERRIDES:
                    assert test[key].get(res) == v, (key, res)
        elif key == "set-resources":
            assert set(test[key]) == set(value) | TEST_ONLY_RULES
            for rule, resources in value.items():
                for res, v in resources.items():
                    if (rule, res) not in TEST_OVERRIDES:
                        assert test[key][rule].get(res) == v, (key, rule, res)
        else:
            assert test.get(key) == value, key
    for rule, res in TEST_OVERRIDES:
        section = test["default-resources"] if rule == "default" else test["set-resources"][rule]
        assert res in section, (rule, res)
    assert test["slurm-no-account"] is True and test["slurm-status-command"] == "squeue"


def dry_run_resources(wd: Path, profile: Path) -> dict[str, dict[str, str]]:
    """Resources of every job of a dry run with the profile, by rule (as Snakemake prints
    them: the rule's own resources, then set-resources, then default-resources)."""
    res = snakemake(wd, "-n", "--profile", str(profile), timeout=600)
    rules: dict[str, dict[str, str]] = {}
    rule = None
    for line in (res.stdout + res.stderr).splitlines():
        head = re.match(r"^(?:local)?(?:rule|checkpoint) (\w+):", line)
        if head:
            rule = head.group(1)
        elif line.strip().startswith("resources:") and rule is not None:
            items = line.strip().removeprefix("resources:").split(", ")
            rules[rule] = dict(item.strip().split("=", 1) for item in items)
    return rules


@pytest.mark.parametrize("profile", [SHIPPED_PROFILE, TEST_PROFILE], ids=["shipped", "test"])
def test_profile_resolves_every_rule_resource(tmp_path, profile):
    """Dry run with the SLURM profile (no Slurm needed): every job of the first iteration gets
    a partition, wall time, memory and CPUs, and exactly the GPU rules get one GPU on the gpu
    partition."""
    wd = workdir(tmp_path)
    rules = dry_run_resources(wd, profile)
    assert SUBMITTED_RULES <= set(rules), sorted(rules)
    for rule, res in rules.items():
        for key in ("slurm_partition", "runtime", "mem_mb", "cpus_per_task"):
            assert key in res and res[key] != "<TBD>", (rule, key, res)
        assert int(res["runtime"]) > 0 and int(res["mem_mb"]) > 0, (rule, res)
        if rule in GPU_RULES:
            assert res.get("gpu") == "1" and res["slurm_partition"] == "gpu", (rule, res)
        else:
            assert "gpu" not in res and res["slurm_partition"] == "cpu", (rule, res)


def sbatch_options(resources: dict[str, str]) -> str:
    """The sbatch options the SLURM executor plugin builds for a job with these resources."""
    submit = pytest.importorskip("snakemake_executor_plugin_slurm.submit_string")
    utils = pytest.importorskip("snakemake_executor_plugin_slurm.utils")

    class Resources(dict):
        __getattr__ = dict.__getitem__

    values = Resources({k: int(v) if v.isdigit() else v for k, v in resources.items()})
    job = SimpleNamespace(resources=values, threads=1, name="job", is_group=lambda: False)
    params = {
        "run_uuid": "run",
        "slurm_logfile": "log",
        "comment_str": "comment",
        "account": "",
        "partition": f"-p {values['slurm_partition']}",
        "workdir": ".",
    }
    return submit.get_submit_command(job, params) + utils.set_gres_string(job)


def test_plugin_turns_the_gpu_resource_into_sbatch_gpus(tmp_path):
    """The shipped profile's energy job becomes `sbatch ... --gpus=1` (a real sbatch accepts it:
    see the end-to-end test); CPU jobs ask for no GPU."""
    rules = dry_run_resources(workdir(tmp_path), SHIPPED_PROFILE)
    energy = shlex.split(sbatch_options(rules["energy"]))
    assert "--gpus=1" in energy and "--cpus-per-task=4" in energy
    assert energy[energy.index("--mem") + 1] == "8000" and energy[energy.index("-t") + 1] == "60"
    assert energy[energy.index("-p") + 1] == "gpu"
    sample = sbatch_options(rules["sample"])
    assert "--gpus" not in sample and "gres" not in sample and "-p cpu" in sample


# ------------------------------------------------------------------ on a Slurm cluster
@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A private Slurm cluster for this module; the environment that reaches it."""
    if _missing_requirements():
        pytest.skip(_missing_requirements())
    folder = tmp_path_factory.mktemp("slurm")
    run = [str(CLUSTER_SCRIPT)]
    try:
        start = subprocess.run(
            [*run, "start", str(folder)], capture_output=True, text=True, timeout=600
        )
        if start.returncode != 0:
            pytest.fail(f"the test cluster did not start:\n{start.stdout}\n{start.stderr}")
        exports = subprocess.run(
            [*run, "env", str(folder)], capture_output=True, text=True, check=True
        ).stdout
        env = dict(ENV)
        for line in exports.splitlines():
            name, value = line.removeprefix("export ").split("=", 1)
            env[name] = value.replace("$PATH", ENV["PATH"])
        env["CGFLOW_SLURM_DIR"] = str(folder)
        yield env
    finally:
        subprocess.run([*run, "stop", str(folder)], capture_output=True, text=True, timeout=300)


def start_local_run(wd: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "snakemake", "--configfile", "config/test_mb.yaml", "--cores", "2"]
    cmd.append("--force-use-threads")  # as the local profile
    return subprocess.Popen(
        cmd, cwd=wd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


@pytest.fixture(scope="module")
def campaigns(cluster, tmp_path_factory):
    """The test overlay under the SLURM test profile, and the same campaign run locally (in
    parallel: the Slurm run mostly waits for the scheduler)."""
    local_wd = workdir(tmp_path_factory.mktemp("mb_local"))
    local = start_local_run(local_wd)
    try:
        wd = workdir(tmp_path_factory.mktemp("mb_slurm"))
        t0 = time.perf_counter()
        res = snakemake(wd, "--profile", str(TEST_PROFILE), env=cluster, check=False, timeout=3600)
        if res.returncode != 0:
            pytest.fail(
                f"snakemake on Slurm failed:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}\n"
                + cluster_diagnostics(cluster)
            )
        print(f"Müller–Brown test overlay on Slurm: {time.perf_counter() - t0:.0f} s")
        local_log, _ = local.communicate(timeout=3600)
    finally:
        if local.poll() is None:
            local.kill()
            local.wait()
    assert local.returncode == 0, f"local run failed:\n{local_log[-3000:]}"
    return SimpleNamespace(slurm=wd, local=local_wd, log=res.stdout + res.stderr, env=cluster)


def cluster_diagnostics(env: dict) -> str:
    """sinfo, squeue and the ends of the daemon logs of the test cluster."""
    folder = Path(env["CGFLOW_SLURM_DIR"])
    status = subprocess.run(
        [str(CLUSTER_SCRIPT), "status", str(folder)], capture_output=True, text=True, timeout=60
    )
    text = status.stdout + status.stderr
    for log in sorted((folder / "log").glob("*.log")):
        text += f"\n---- {log.name}\n" + "\n".join(log.read_text().splitlines()[-20:])
    return text


def iterations(campaigns) -> range:
    """Iterations 1..N of the Slurm run (from its summary)."""
    df = pd.read_csv(campaigns.slurm / CAMPAIGN / "summary.csv")
    return range(1, int(df["iteration"].iloc[-1]) + 1)


def submitted_jobs(log: str) -> dict[str, str]:
    """Slurm job id -> rule, from Snakemake's 'has been submitted' lines."""
    jobs = {}
    for _, slurm_id, logfile in SUBMITTED.findall(log):
        rule = re.search(r"/rule_(\w+)/", logfile)
        assert rule, logfile
        jobs[slurm_id] = rule.group(1)
    return jobs


def scontrol_job(env: dict, job_id: str) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "--oneliner", "show", "job", job_id],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return dict(f.split("=", 1) for f in out.split() if "=" in f)


@needs_slurm
def test_every_cluster_job_went_through_sbatch(campaigns):
    jobs = submitted_jobs(campaigns.log)
    n, shards = len(iterations(campaigns)), OVERLAY["energy"]["shards"]
    counts = {rule: list(jobs.values()).count(rule) for rule in set(jobs.values())}
    assert counts == {
        "start": 1,
        "pretrain": 1,
        "finetune": n,
        "sample": shards * n,
        "energy": shards * n,
        "ensemble": n,
    }, counts
    for job_id, rule in jobs.items():
        info = scontrol_job(campaigns.env, job_id)
        assert info["JobState"] == "COMPLETED", (rule, info)
        if rule in GPU_RULES:
            assert info["Partition"] == "gpu" and info.get("TresPerJob") == "gres:gpu:1", info
        else:
            assert info["Partition"] == "cpu" and "gpu" not in info.get("TresPerJob", ""), info


@needs_slurm
def test_each_energy_shard_saw_a_gpu(campaigns):
    energy_jobs = {i for i, rule in submitted_jobs(campaigns.log).items() if rule == "energy"}
    seen = set()
    for k in iterations(campaigns):
        for j in range(OVERLAY["energy"]["shards"]):
            shard = campaigns.slurm / CAMPAIGN / f"iter_{k:03d}" / "energies" / f"shard_{j}.h5"
            with h5py.File(shard, "r") as fh:
                attrs = {key: str(v) for key, v in fh.attrs.items() if key.startswith("env_")}
            assert attrs.get("env_CUDA_VISIBLE_DEVICES") in ("0", "1"), (shard, attrs)
            assert attrs.get("env_SLURM_JOB_ID") in energy_jobs, (shard, attrs)
            seen.add(attrs["env_SLURM_JOB_ID"])
            log = campaigns.slurm / CAMPAIGN / "logs" / "energy" / f"iter_{k:03d}_shard_{j}.log"
            assert "job environment:" in log.read_text(), log
            assert "CUDA_VISIBLE_DEVICES" in log.read_text(), log
    assert seen == energy_jobs  # one Slurm job per shard


@needs_slurm
def test_campaign_on_slurm_finishes_like_the_local_run(campaigns):
    summary = campaigns.slurm / CAMPAIGN / "summary.csv"
    last = iterations(campaigns)[-1]
    status = json.loads(
        (campaigns.slurm / CAMPAIGN / f"iter_{last:03d}" / "status.json").read_text()
    )
    assert status["converged"] is True
    assert status["reason"] in ("max iterations", "walkers exhausted")
    assert_same_summary(summary, campaigns.local / CAMPAIGN / "summary.csv")
