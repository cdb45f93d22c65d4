"""Paths, input functions, the convergence walk and the in-process step runner; no rules here.
The iteration rules depend on iteration k-1 through plain path functions and never touch a
checkpoint; only the final aggregator (rule summary) and the backmap of the final flow walk the
per-iteration checkpoints `check` (see `last_iteration`). Domain facts (which systems have an
all-atom topology, which points get relabelled, what the config snapshot holds) come from
src/cgflow/config.py, loaded by file path: it needs only the standard library, so planning a
campaign never imports torch. The cheap local rules (`run:` + `cgflow_step`) import cgflow when
they run, in this process: cgflow must be installed where Snakemake runs.
"""

import importlib.util
import json
import re
import shlex
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate


def _load_cgflow_config():
    path = Path(workflow.basedir) / "src" / "cgflow" / "config.py"
    spec = importlib.util.spec_from_file_location("cgflow_config", path)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


cgconfig = _load_cgflow_config()

# Fails before any job is planned, naming a wrong key or value; fills in the schema defaults.
validate(config, str(cgconfig.SCHEMA_PATH))
SHARDS = list(range(config["energy"]["shards"]))


wildcard_constraints:
    # only the configured campaign: the config snapshot belongs to exactly one campaign
    campaign=re.escape(config["campaign"]),
    # zero-padded, 001-999; iteration 000 (start, pretrain, initial points) has literal paths
    iteration=r"(?!000)\d{3}",
    # shard index 0..shards-1 without leading zeros
    shard=r"0|[1-9]\d*",


# ---------------------------------------------------------------------------------- paths
def campaign_dir(campaign):
    """results/<campaign>"""
    return cgconfig.campaign_dir("results", campaign)


def iteration_file(campaign, k, name):
    """results/<campaign>/iter_<kkk>/<name>"""
    return cgconfig.iteration_file(campaign_dir(campaign), k, name)


def summary_outputs(campaign):
    """The aggregator's files: the table of all iterations and the convergence curves."""
    return [
        f"{campaign_dir(campaign)}/summary.csv",
        f"{campaign_dir(campaign)}/convergence.png",
    ]


def final_output():
    """Targets of the default rule (all), i.e. the campaign summary (the aggregator walks the
    checkpoints), with baselines configured the speedup table, and, for systems with an
    all-atom topology, the backmapped structures of the final flow."""
    campaign = config["campaign"]
    return (
        summary_outputs(campaign)
        + (speedup_outputs(campaign) if config.get("baselines") else [])
        + (backmap_outputs(campaign) if backmap_wanted() else [])
    )


def speedup_outputs(campaign):
    """The campaign against the configured baselines (rule speedup)."""
    return [
        f"{campaign_dir(campaign)}/speedup.csv",
        f"{campaign_dir(campaign)}/speedup.md",
    ]


def baselines_file(wildcards):
    """The configured baseline points (input of rule speedup)."""
    if not config.get("baselines"):
        raise WorkflowError(
            "speedup.csv needs baseline points: set `baselines` in the config "
            "(e.g. data/baselines/speedup/points.csv)"
        )
    return config["baselines"]


def config_snapshot(wildcards):
    """The validated config written by rule config_snapshot; input `cfg` of every rule."""
    return f"{campaign_dir(wildcards.campaign)}/config.yaml"


def config_json(wildcards):
    """The config snapshot's content (validated, without stop and post-campaign keys) as
    JSON, for rule config_snapshot."""
    return json.dumps(cgconfig.snapshot(config), sort_keys=True)


def stop_options(wildcards):
    """CLI flags of `cgflow wf check`: the iteration limit and the optional metric rule."""
    stop = cgconfig.stop_settings(config)
    opts = f"--max-iterations {stop['max_iterations']}"
    if stop["stop_metric"]:
        opts += f" --stop-metric {stop['stop_metric']} --stop-threshold {stop['stop_threshold']}"
    return opts


# ----------------------------------------------------------------------------- iterations
def iteration(wildcards):
    """The iteration wildcard as an integer (passed to the CLI as --iteration)."""
    return int(wildcards.iteration)


def prev(wildcards):
    """Number of the previous iteration, k - 1."""
    return iteration(wildcards) - 1


def previous(name):
    """Input function: file `name` of iteration k - 1 (iter_000 is the start)."""

    def previous_file(wildcards):
        return iteration_file(wildcards.campaign, prev(wildcards), name)

    previous_file.__name__ = f"previous_{name.replace('.', '_')}"
    return previous_file


def shard_files(folder):
    """Input function: every shard file `<folder>/shard_<j>.h5` of iteration k."""

    def all_shards(wildcards):
        root = campaign_dir(wildcards.campaign)
        return [
            cgconfig.shard_file(root, iteration(wildcards), folder, j) for j in SHARDS
        ]

    all_shards.__name__ = f"all_{folder}_shards"
    return all_shards


def n_shards(wildcards):
    """Number of energy shards (from the config)."""
    return len(SHARDS)


def gather_inputs(wildcards):
    """Inputs of gather: previous points, all sample and energy shards, and the previous
    iteration's labels when labels are carried over (cgflow.config.needs_previous_labels).
    """
    k = iteration(wildcards)
    inputs = {
        "cfg": config_snapshot(wildcards),
        "points": iteration_file(wildcards.campaign, k - 1, "points.h5"),
        "samples": shard_files("samples")(wildcards),
        "energies": shard_files("energies")(wildcards),
    }
    if cgconfig.needs_previous_labels(config, k):
        inputs["previous_labels"] = iteration_file(
            wildcards.campaign, k - 1, "labels.h5"
        )
    return inputs


def finetune_inputs(wildcards):
    """Inputs of finetune: the previous flow and points, the previous ensemble when the
    training focuses on populated points or weights only those by their gap
    (cgflow.config.trains_with_ensemble), the previous labels when it weights old points by
    their gap (cgflow.config.prioritizes_training)."""
    k = iteration(wildcards)
    inputs = {
        "cfg": config_snapshot(wildcards),
        "flow": iteration_file(wildcards.campaign, k - 1, "flow.pt"),
        "points": iteration_file(wildcards.campaign, k - 1, "points.h5"),
    }
    if cgconfig.trains_with_ensemble(config, k):
        inputs["ensemble"] = iteration_file(wildcards.campaign, k - 1, "ensemble.pt")
    if cgconfig.prioritizes_training(config, k):
        inputs["labels"] = iteration_file(wildcards.campaign, k - 1, "labels.h5")
    return inputs


def previous_options(wildcards, input):
    """`--ensemble <file>` and `--labels <file>` for those of iteration k - 1's files the job
    has as inputs (finetune, sample), else nothing."""
    keys = input.keys()
    return " ".join(f"--{k} {input[k]}" for k in ("ensemble", "labels") if k in keys)


def sample_inputs(wildcards):
    """Inputs of sample: the flow of iteration k, the previous points, and iteration k - 1's
    ensemble and labels when draws are allocated (cgflow.config.allocates_draws)."""
    k = iteration(wildcards)
    inputs = {
        "cfg": config_snapshot(wildcards),
        "flow": iteration_file(wildcards.campaign, k, "flow.pt"),
        "points": iteration_file(wildcards.campaign, k - 1, "points.h5"),
    }
    if cgconfig.allocates_draws(config, k):
        inputs["ensemble"] = iteration_file(wildcards.campaign, k - 1, "ensemble.pt")
        inputs["labels"] = iteration_file(wildcards.campaign, k - 1, "labels.h5")
    return inputs


def previous_labels_option(wildcards, input):
    """`--previous-labels <file>` when gather has that input, else nothing."""
    if "previous_labels" in input.keys():
        return f"--previous-labels {input.previous_labels}"
    return ""


# ----------------------------------------------------------------------- convergence walk
def read_status(path):
    """The `converged` flag of a checkpoint's status.json."""
    with open(path) as fh:
        status = json.load(fh)
    if not isinstance(status, dict) or not isinstance(status.get("converged"), bool):
        raise WorkflowError(
            f"{path}: expected a JSON object with a boolean 'converged'"
        )
    return status["converged"]


def last_iteration(campaign):
    """Walk the checkpoints k = 1, 2, ... until one is converged or max_iterations.

    checkpoints.check.get raises IncompleteCheckpointException while iteration k's status is
    missing; Snakemake then schedules that iteration and re-evaluates this function after the
    checkpoint job has run. Never catch that exception here.
    """
    n = config["max_iterations"]
    for k in range(1, n + 1):
        job = checkpoints.check.get(campaign=campaign, iteration=f"{k:03d}")
        if read_status(job.output.status):
            return k
    return n


def summary_inputs(wildcards):
    """Every file the aggregator reads, for iterations 1..N found by the walk
    (cgflow.config.summary_files, which the summary step reads too): points (0..N), train,
    every energy shard, metrics, status and every job's benchmark file; nothing else is read,
    so a stale shard of an earlier run in the same folder is not counted."""
    campaign = wildcards.campaign
    n = last_iteration(campaign)
    inputs = cgconfig.summary_files(campaign_dir(campaign), n, len(SHARDS))
    if config.get("baselines"):
        inputs["baselines"] = config["baselines"]
    return inputs


def campaign_folder(wildcards):
    """results/<campaign>, for `cgflow wf summary --campaign-dir`."""
    return campaign_dir(wildcards.campaign)


def summary_iterations(wildcards, input):
    """N, the last iteration found by the walk (= number of status files in the input).
    While the walk waits for a checkpoint, the input is only that checkpoint's placeholder;
    the job is rebuilt (and this re-evaluated) after the checkpoint has run.
    """
    if "status" not in input.keys():
        return "<TBD>"
    return len(input.status)


def baselines_option(wildcards, input):
    """`--baselines <csv>` of `cgflow wf summary` when it has that input, else nothing."""
    if "baselines" in input.keys():
        return f"--baselines {shlex.quote(str(input.baselines))}"
    return ""


# ---------------------------------------------------------------------------- backmapping
BACKMAP_POINTS = list(config["backmap"]["points"])


def backmap_wanted():
    """Backmap the final flow? Only for a system with a topology and at least one point."""
    return cgconfig.has_topology(config) and bool(BACKMAP_POINTS)


def backmap_outputs(campaign):
    """results/<campaign>/backmap/<point>.pdb and .dcd for every point, and backmap.json."""
    folder = f"{campaign_dir(campaign)}/backmap"
    return [f"{folder}/{p}.{ext}" for p in BACKMAP_POINTS for ext in ("pdb", "dcd")] + [
        f"{folder}/backmap.json"
    ]


def final_flow(wildcards):
    """The flow of the last iteration found by the convergence walk."""
    campaign = wildcards.campaign
    return iteration_file(campaign, last_iteration(campaign), "flow.pt")


def backmap_points_json(wildcards):
    """The backmap points {name: [phi, psi]} (rad) as JSON, for `cgflow wf backmap`."""
    return json.dumps(config["backmap"]["points"], sort_keys=True)


def backmap_folder(wildcards):
    """results/<campaign>/backmap, for `cgflow wf backmap --out-dir`."""
    return f"{campaign_dir(wildcards.campaign)}/backmap"


# ------------------------------------------------------------------------ in-process steps
def _wf_in_process(log, formatted, threads):
    """`cgflow wf <formatted>` inside this Snakemake process (cgflow.cli.run_step), split like
    a shell would, with `threads` torch threads and its output in the rule's log."""
    from cgflow.cli import run_step

    run_step(["wf", *shlex.split(formatted)], log[0], threads=threads)


def cgflow_step(log, command):
    """Run `cgflow wf <command>` inside this Snakemake process, its output in the rule's log:
    the cheap local rules start no interpreter and import torch once per campaign, not once
    per job. `command` is formatted like a shell directive ({input.x}, {params.k}, {x:q}) from
    the calling rule's namespace. With --force-use-threads (both profiles) the local executor
    runs such jobs in threads of this process; without it, it starts a Snakemake process per
    job (slower, same result).
    """
    from snakemake.utils import format as snakemake_format

    _wf_in_process(log, snakemake_format(command, stepout=2), threads=1)


def cgflow_job(log, threads, command):
    """A heavy step (finetune, sample, energy, ensemble): `cgflow wf <command>` as its own
    process, `threads` torch threads, output in the rule's log; with `steps_in_process` in
    the config, in this process like the cheap rules. `command` is formatted from the calling
    rule's namespace."""
    from snakemake.utils import format as snakemake_format

    formatted = snakemake_format(command, stepout=2)
    if config["steps_in_process"]:
        _wf_in_process(log, formatted, threads)
        return
    escaped = formatted.replace("{", "{{").replace("}", "}}")  # shell() formats again
    shell(
        f"CGFLOW_TORCH_THREADS={int(threads)} cgflow wf {escaped}"
        f" > {shlex.quote(str(log[0]))} 2>&1"
    )
