"""Campaign configuration: the schema (the one source of defaults), validation, the snapshot,
the file layout of a campaign and the domain facts the workflow's DAG needs.

This module imports nothing but the standard library (and Snakemake's validator, lazily): the
Snakefile loads it by file path, so the Snakemake process never imports torch and works under
``--sdm conda``, where cgflow is installed only in the rules' environment.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

#: the JSON schema of a campaign's configuration, with every default
SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")

#: keys that only decide when to stop: kept out of the snapshot (passed to `check` instead),
#: so raising max_iterations or changing the stop rule extends a campaign instead of rerunning it
STOP_KEYS = ("max_iterations", "stop")
#: keys that only shape outputs after the campaign (summary plot, backmap): kept out of the
#: snapshot, so changing them never reruns the campaign
POST_KEYS = ("backmap", "baselines")
#: keys that only decide how the steps run (CPU threads, which process): kept out of the snapshot
RUN_KEYS = ("threads", "steps_in_process")

#: systems with an all-atom topology (the only ones whose structures can be backmapped)
TOPOLOGY_SYSTEMS = ("alanine_dipeptide",)


#: validated configs of this process, as JSON text keyed by the JSON text of the input: the
#: validator reads and parses the schema on every call (~0.1 s), and the steps that run inside
#: the Snakemake process validate the same snapshot once per job
_VALIDATED: dict[str, str] = {}


def validated(cfg: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``cfg`` checked against :data:`SCHEMA_PATH` with every default filled in.

    Raises ``ValueError`` naming the offending key or value.
    """
    try:
        key = json.dumps(cfg, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError):  # not plain JSON data: validate without the cache
        key = None
    if key is not None and key in _VALIDATED:
        return json.loads(_VALIDATED[key])
    out = _validate(cfg)
    if key is not None:
        _VALIDATED[key] = json.dumps(out)
    return out


def _validate(cfg: dict[str, Any]) -> dict[str, Any]:
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    out = copy.deepcopy(dict(cfg))
    try:
        validate(out, str(SCHEMA_PATH))
    except WorkflowError as exc:  # the message names the key and the rule it breaks
        raise ValueError(f"invalid configuration: {exc}") from None
    # the validator fills defaults with the schema's own objects: detach them
    out = json.loads(json.dumps(out))
    lab = out["labels"]
    if lab["allocate"] and not lab["min_draws"] <= lab["draws"] <= lab["max_draws"]:
        raise ValueError(
            "invalid configuration: labels.allocate needs labels.min_draws <= labels.draws <= "
            f"labels.max_draws; got {lab['min_draws']}, {lab['draws']}, {lab['max_draws']}"
        )
    return out


def snapshot(cfg: dict[str, Any]) -> dict[str, Any]:
    """The part of a validated config that decides the campaign's results (no stop,
    post-campaign or run keys): what every step reads."""
    return {k: v for k, v in cfg.items() if k not in STOP_KEYS + POST_KEYS + RUN_KEYS}


def write_snapshot(cfg: dict[str, Any], out: str | Path) -> Path:
    """Write the campaign's config snapshot: validated, defaults filled in, without the stop,
    post-campaign and run keys (:data:`STOP_KEYS`, :data:`POST_KEYS`, :data:`RUN_KEYS`)."""
    import yaml

    from cgflow.data import atomic_path

    snap = snapshot(validated(cfg))
    with atomic_path(out) as tmp:
        tmp.write_text(yaml.safe_dump(snap, sort_keys=True))
    return Path(out)


def has_topology(cfg: dict[str, Any]) -> bool:
    """Does the configured system have an all-atom topology (backmapping possible)?"""
    return cfg["system"]["name"] in TOPOLOGY_SYSTEMS


def relabels_all(cfg: dict[str, Any]) -> bool:
    """Which points get labelled in iteration k: every point (the flow changed, so all labels
    are redrawn) or only those added in iteration k − 1 (earlier labels are carried over)."""
    return bool(cfg["labels"]["relabel_all"])


def pools_draws(cfg: dict[str, Any]) -> bool:
    """Do a point's labels combine the draws of every iteration (running sums of weights)?"""
    return bool(cfg["labels"]["pool_draws"])


def needs_previous_labels(cfg: dict[str, Any], k: int) -> bool:
    """Does iteration k's labels file build on iteration k − 1's (carried-over labels, or the
    running sums of pooled draws)?"""
    return (not relabels_all(cfg) or pools_draws(cfg)) and k >= 2


def allocates_draws(cfg: dict[str, Any], k: int) -> bool:
    """Are iteration k's draw counts decided from iteration k − 1's ensemble and labels?"""
    return bool(cfg["labels"]["allocate"]) and k >= 2


def focuses_training(cfg: dict[str, Any], k: int) -> bool:
    """Does iteration k's fine-tuning use iteration k − 1's ensemble to pick its points?"""
    return bool(cfg["energy_training"]["focus_populated"]) and k >= 2


def prioritizes_training(cfg: dict[str, Any], k: int) -> bool:
    """Does iteration k's fine-tuning weight its old points by iteration k − 1's labels?"""
    return cfg["energy_training"]["priority"]["kind"] in ("gap", "populated_gap") and k >= 2


def trains_with_ensemble(cfg: dict[str, Any], k: int) -> bool:
    """Does iteration k's fine-tuning read iteration k − 1's ensemble (to focus on populated
    points, or to weight only those by their gap)?"""
    kind = cfg["energy_training"]["priority"]["kind"]
    return focuses_training(cfg, k) or (kind == "populated_gap" and k >= 2)


def stop_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """The convergence settings of `check` (of a validated config): iteration limit and the
    optional metric rule."""
    return {
        "max_iterations": int(cfg["max_iterations"]),
        "stop_metric": cfg["stop"]["metric"],
        "stop_threshold": cfg["stop"]["threshold"],
    }


# ------------------------------------------------------------------------------ file layout
def campaign_dir(results: str | Path, campaign: str) -> str:
    """``<results>/<campaign>``"""
    return f"{results}/{campaign}"


def iteration_file(root: str | Path, k: int, name: str) -> str:
    """``<root>/iter_<kkk>/<name>`` (``root`` is a campaign folder)."""
    return f"{root}/iter_{k:03d}/{name}"


def shard_file(root: str | Path, k: int, folder: str, shard: int) -> str:
    """``<root>/iter_<kkk>/<folder>/shard_<j>.h5`` (folder: samples or energies)."""
    return iteration_file(root, k, f"{folder}/shard_{shard}.h5")


def benchmark_file(root: str | Path, rule: str, k: int, shard: int | None = None) -> str:
    """``<root>/benchmarks/<rule>/iter_<kkk>[_shard_<j>].tsv``"""
    tail = f"_shard_{shard}" if shard is not None else ""
    return f"{root}/benchmarks/{rule}/iter_{k:03d}{tail}.tsv"


#: rules of iteration 0 and of every later iteration, in the order they run; sharded ones
#: run once per energy shard (the jobs whose benchmark files the summary reads).
START_RULES = ("start", "pretrain", "initial_points")
ITERATION_RULES = (
    "finetune",
    "sample",
    "energy",
    "gather",
    "ensemble",
    "evaluate",
    "walkers",
    "select",
    "check",
)
SHARDED_RULES = ("sample", "energy")


def iteration_benchmarks(root: str | Path, k: int, shards: int) -> list[str]:
    """Benchmark files of every job of iteration k (k = 0: the starting rules)."""
    if k == 0:
        return [benchmark_file(root, r, 0) for r in START_RULES]
    out = []
    for rule in ITERATION_RULES:
        if rule in SHARDED_RULES:
            out += [benchmark_file(root, rule, k, j) for j in range(shards)]
        else:
            out.append(benchmark_file(root, rule, k))
    return out


def summary_files(root: str | Path, last: int, shards: int) -> dict[str, Any]:
    """Every file the summary of iterations 1..``last`` reads — the rule's declared inputs and
    the in-process runner's: the start file, points of 0..last, and per iteration its train,
    energy shards, metrics, status and every job's benchmark file."""
    its = range(1, last + 1)
    return {
        "start": iteration_file(root, 0, "start.h5"),
        "points": [iteration_file(root, k, "points.h5") for k in range(last + 1)],
        "train": [iteration_file(root, k, "train.h5") for k in its],
        "energies": [shard_file(root, k, "energies", j) for k in its for j in range(shards)],
        "metrics": [iteration_file(root, k, "metrics.json") for k in its],
        "status": [iteration_file(root, k, "status.json") for k in its],
        "benchmarks": [b for k in range(last + 1) for b in iteration_benchmarks(root, k, shards)],
    }
