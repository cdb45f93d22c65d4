"""The campaign in one process: the workflow's stages (:mod:`cgflow.stages`) in the workflow's
order, with the workflow's files, seeds, backends and counting.

Use it where Snakemake is not wanted (a notebook, a quick laptop run, a test); the results
folder is the same as the workflow's, so either can continue what the other started. Like
Snakemake it skips a step whose outputs are newer than its inputs (so a killed run resumes)
and rewrites the config snapshot only when the configuration changed (which reruns
everything after it). Wall times go to the same benchmark files as the workflow's.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import config as cfgmod
from .config import benchmark_file, iteration_file, shard_file


def _fresh(outputs: list[Path], inputs: list[Path]) -> bool:
    if not all(p.exists() for p in outputs):
        return False
    newest_input = max((p.stat().st_mtime_ns for p in inputs), default=0)
    return min(p.stat().st_mtime_ns for p in outputs) >= newest_input


def _write_benchmark(path: str, seconds: float) -> None:
    from .data import atomic_path

    h, rest = divmod(int(seconds), 3600)
    with atomic_path(path) as tmp:
        tmp.write_text(f"s\th:m:s\n{seconds:.4f}\t{h}:{rest // 60:02d}:{rest % 60:02d}\n")


class _Runner:
    def __init__(self, root: Path, log: Callable[[str], None]) -> None:
        self.root, self.log = root, log

    def job(
        self,
        rule: str,
        outputs: list[Any],
        inputs: list[Any],
        fn: Callable[..., Any],
        *args: Any,
        k: int | None = None,
        shard: int | None = None,
        threads: int | None = None,
        **kwargs: Any,
    ) -> None:
        """``fn(*args, **kwargs)`` unless ``outputs`` are newer than ``inputs``; with
        ``threads``, torch uses that many CPU threads during the call (as the rule's
        ``threads`` in the workflow)."""
        if _fresh([Path(p) for p in outputs], [Path(p) for p in inputs]):
            return
        import torch

        before = torch.get_num_threads()
        t0 = time.perf_counter()
        try:
            if threads is not None:
                torch.set_num_threads(threads)
            fn(*args, **kwargs)
        finally:
            torch.set_num_threads(before)
        seconds = time.perf_counter() - t0
        where = ""
        if k is not None:
            _write_benchmark(benchmark_file(self.root, rule, k, shard), seconds)
            where = f" iteration {k}" + ("" if shard is None else f" shard {shard}")
        self.log(f"{rule}{where}: {seconds:.1f} s")


def run_campaign(
    config: dict[str, Any],
    results: str | os.PathLike = "results",
    log: Callable[[str], None] = print,
) -> Path:
    """Run (or resume) the campaign of ``config`` to convergence in ``<results>/<campaign>``;
    returns that folder (its ``summary.csv`` is the workflow's)."""
    import yaml

    from .config import write_snapshot
    from .stages import ensemble, evaluate, labels, report, select, start, status, train
    from .stages.settings import Settings

    cfg = cfgmod.validated(config)
    root = Path(cfgmod.campaign_dir(results, cfg["campaign"]))
    st = Settings(cfg)
    snap = root / "config.yaml"
    if not snap.exists() or yaml.safe_load(snap.read_text()) != st.cfg:
        write_snapshot(cfg, snap)
    job = _Runner(root, log).job

    def f(k: int, name: str) -> Path:
        return Path(iteration_file(root, k, name))

    start_h5, flow0, points0 = f(0, "start.h5"), f(0, "flow.pt"), f(0, "points.h5")
    job("start", [start_h5], [snap], start.start, st, start_h5, k=0)
    job("pretrain", [flow0], [snap, start_h5], start.pretrain, st, start_h5, flow0, k=0)
    job(
        "initial_points",
        [points0],
        [snap, start_h5],
        start.initial_points,
        st,
        start_h5,
        points0,
        k=0,
    )
    stop = cfgmod.stop_settings(cfg)
    n_shards = int(cfg["energy"]["shards"])
    last = 0
    for k in range(1, stop["max_iterations"] + 1):
        prev_flow, prev_points = f(k - 1, "flow.pt"), f(k - 1, "points.h5")
        flow, train_h5 = f(k, "flow.pt"), f(k, "train.h5")
        focus = f(k - 1, "ensemble.pt") if cfgmod.trains_with_ensemble(cfg, k) else None
        prio = f(k - 1, "labels.h5") if cfgmod.prioritizes_training(cfg, k) else None
        job(
            "finetune",
            [flow, train_h5],
            [snap, prev_flow, prev_points, *(x for x in (focus, prio) if x is not None)],
            train.finetune,
            st,
            k,
            prev_flow,
            prev_points,
            flow,
            train_h5,
            focus,
            prio,
            k=k,
            threads=cfg["threads"],
        )
        samples = [Path(shard_file(root, k, "samples", j)) for j in range(n_shards)]
        energies = [Path(shard_file(root, k, "energies", j)) for j in range(n_shards)]
        allocation = (
            [f(k - 1, "ensemble.pt"), f(k - 1, "labels.h5")]
            if cfgmod.allocates_draws(cfg, k)
            else [None, None]
        )
        for j in range(n_shards):
            job(
                "sample",
                [samples[j]],
                [snap, flow, prev_points, *[a for a in allocation if a is not None]],
                labels.sample,
                st,
                k,
                flow,
                prev_points,
                j,
                n_shards,
                samples[j],
                *allocation,
                k=k,
                shard=j,
            )
            job(
                "energy",
                [energies[j]],
                [snap, samples[j]],
                labels.energy,
                st,
                samples[j],
                j,
                energies[j],
                k=k,
                shard=j,
            )
        labels_h5 = f(k, "labels.h5")
        previous = f(k - 1, "labels.h5") if cfgmod.needs_previous_labels(cfg, k) else None
        job(
            "gather",
            [labels_h5],
            [snap, prev_points, *samples, *energies, *([previous] if previous else [])],
            labels.gather,
            st,
            k,
            prev_points,
            samples,
            energies,
            labels_h5,
            previous,
            k=k,
        )
        ens = f(k, "ensemble.pt")
        job(
            "ensemble",
            [ens],
            [snap, labels_h5],
            ensemble.ensemble,
            st,
            k,
            labels_h5,
            ens,
            k=k,
            threads=cfg["threads"],
        )
        metrics, plot = f(k, "metrics.json"), f(k, "pmf.png")
        job(
            "evaluate",
            [metrics, plot],
            [snap, ens, prev_points, labels_h5],
            evaluate.evaluate,
            st,
            k,
            ens,
            prev_points,
            labels_h5,
            metrics,
            plot,
            k=k,
        )
        walkers, points = f(k, "walkers.h5"), f(k, "points.h5")
        job(
            "walkers",
            [walkers],
            [snap, ens, prev_points, start_h5],
            select.walkers,
            st,
            k,
            ens,
            prev_points,
            start_h5,
            walkers,
            k=k,
        )
        job(
            "select",
            [points],
            [snap, walkers, prev_points],
            select.select,
            st,
            k,
            walkers,
            prev_points,
            points,
            k=k,
        )
        status_file = f(k, "status.json")
        job(
            "check",
            [status_file],
            [walkers, metrics],
            status.check,
            k,
            walkers,
            metrics,
            status_file,
            k=k,
            **stop,
        )
        last = k
        if status.read_status(status_file)["converged"]:
            break
    summary_csv, convergence = root / "summary.csv", root / "convergence.png"
    inputs = cfgmod.summary_files(root, last, n_shards)
    files = [inputs["start"], *[p for key, v in inputs.items() if key != "start" for p in v]]
    job(
        "summary",
        [summary_csv, convergence],
        [snap, *files],
        report.summary,
        st,
        **inputs,
        out=summary_csv,
        plot_out=convergence,
        baselines=cfg["baselines"],
    )
    if cfg["baselines"]:
        table, md = root / "speedup.csv", root / "speedup.md"
        job(
            "speedup",
            [table, md],
            [summary_csv, cfg["baselines"]],
            report.speedup,
            summary_csv,
            cfg["baselines"],
            table,
            md,
        )
    if cfgmod.has_topology(cfg) and cfg["backmap"]["points"]:
        out, final = root / "backmap", f(last, "flow.pt")
        job(
            "backmap",
            [out / "backmap.json"],
            [snap, final],
            report.backmap,
            st,
            final,
            cfg["backmap"]["points"],
            cfg["backmap"]["structures"],
            out,
        )
    return root
