"""After the campaign: the summary (``summary.csv``, ``convergence.png``), the speedup table
against the configured baselines, and all-atom structures of the final flow (``backmap/``)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..data import atomic_path, read_h5
from .settings import Settings

_BENCHMARK = re.compile(r"iter_(\d{3})(?:_shard_\d+)?\.tsv$")


def _wall_times(benchmarks: list[Any]) -> dict[int, dict[str, float]]:
    """Seconds per rule and iteration from Snakemake's benchmark files
    (``benchmarks/<rule>/iter_<kkk>[_shard_<j>].tsv``)."""
    out: dict[int, dict[str, float]] = {}
    for f in map(Path, benchmarks):
        m = _BENCHMARK.search(f.name)
        if m is None:
            raise ValueError(f"{f}: not a benchmark file of one iteration (iter_<kkk>...tsv)")
        try:
            seconds = float(f.read_text().splitlines()[1].split("\t")[0])
        except (IndexError, ValueError):
            raise ValueError(f"{f}: not a Snakemake benchmark file") from None
        row = out.setdefault(int(m.group(1)), {})
        key = f"seconds_{f.parent.name}"
        row[key] = row.get(key, 0.0) + seconds
    return out


def summary(
    st: Settings,
    start: Any,
    points: list[Any],
    train: list[Any],
    energies: list[Any],
    metrics: list[Any],
    status: list[Any],
    out: Any,
    plot_out: Any = None,
    benchmarks: list[Any] = (),
    baselines: Any = None,
) -> Any:
    """One row per iteration 0..n from exactly the files given (``points`` and ``metrics`` /
    ``status`` in iteration order): metrics, points, energy evaluations by kind (from the
    counters of ``start``, ``train`` and ``energies`` files), cumulative N, wall times from
    ``benchmarks``; with ``plot_out`` the convergence curves, with the curves of a ``baselines``
    points CSV if given."""
    import pandas as pd

    from ..energy.counting import COUNTED_KINDS, UNCOUNTED_KINDS

    n = len(metrics)
    if not (len(points) == n + 1 and len(status) == n and len(train) == n):
        raise ValueError(
            f"summary of {n} iterations needs {n + 1} points files and {n} train and status "
            f"files; got {len(points)}, {len(train)} and {len(status)}"
        )
    kinds = COUNTED_KINDS + UNCOUNTED_KINDS
    per_iteration = [dict.fromkeys(kinds, 0) for _ in range(n + 1)]
    its = range(1, n + 1)
    for kind, files, allowed in (
        ("start", [start], range(1)),
        ("train", train, its),
        ("energies", energies, its),
    ):
        for f in files:
            d = read_h5(f, kind, datasets=[])
            k = int(d.attrs["iteration"])
            if k not in allowed:
                raise ValueError(
                    f"{f}: a {kind} file of iteration {k}, outside {allowed.start}..{allowed.stop - 1}"
                )
            for key, c in d.counters.items():
                per_iteration[k][key] = per_iteration[k].get(key, 0) + c
    times = _wall_times(list(benchmarks))
    cumulative = dict.fromkeys(kinds, 0)
    rows = []
    for k, counts in enumerate(per_iteration):
        for key, c in counts.items():
            cumulative[key] = cumulative.get(key, 0) + c
        row: dict[str, Any] = {"iteration": k}
        if k > 0:
            m = json.loads(Path(metrics[k - 1]).read_text())
            row.update({f"metric_{key}": v for key, v in m.items() if key != "iteration"})
            s = json.loads(Path(status[k - 1]).read_text())
            row["converged"], row["reason"] = s["converged"], s["reason"]
        split = read_h5(points[k], "points", datasets=["split"])["split"]
        row["n_train_points"] = int((split == 0).sum())
        row["n_test_points"] = int((split == 1).sum())
        row.update({f"evals_{key}": c for key, c in counts.items()})
        row.update({f"cum_evals_{key}": c for key, c in cumulative.items()})
        row["N"] = sum(cumulative[key] for key in COUNTED_KINDS)
        row.update(times.get(k, {}))
        rows.append(row)
    df = pd.DataFrame(rows)
    with atomic_path(out) as tmp:
        df.to_csv(tmp, index=False)
    if plot_out is not None:
        from ..plots import convergence

        base = pd.read_csv(baselines) if baselines else None
        with atomic_path(plot_out) as tmp:
            convergence(tmp, df, f"{st['campaign']}: {st['system']['name']}", base)
    return df


def speedup(summary_in: Any, baselines_in: Any, out: Any, out_md: Any) -> Any:
    """The campaign against the shipped baselines: evaluations to reach each target, ratios
    (:func:`cgflow.baselines.campaign_speedup`), as CSV and Markdown."""
    from ..baselines import campaign_speedup, markdown_table

    table, _ = campaign_speedup(summary_in, baselines_in)
    with atomic_path(out) as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(out_md) as tmp:
        tmp.write_text(markdown_table(table))
    return table


def backmap(
    st: Settings, flow_in: Any, points_rad: dict[str, list[float]], n_structures: int, out_dir: Any
) -> dict[str, Any]:
    """All-atom structures of the flow at named CG points: ``<name>.pdb`` (topology + first
    frame) and ``<name>.dcd`` (all kept draws) in ``out_dir``, and ``backmap.json``."""
    import torch

    from ..backmap import backmap_point, mdtraj_topology, write_trajectory
    from ..flows import load_flow

    for name in points_rad:
        if not name.replace("_", "").isalnum():
            raise ValueError(f"backmap point name {name!r}: use letters, digits and _ only")
    topology = mdtraj_topology(st.system)
    flow, extra = load_flow(flow_in)
    flow = flow.to(st.dtype)
    iteration = int(extra["iteration"])
    seed = st.stage_seed(iteration, "backmap")
    gen = torch.Generator().manual_seed(seed)
    out = Path(out_dir)
    info: dict[str, Any] = {
        "flow": str(flow_in),
        "iteration": iteration,
        "seed": seed,
        "config_hash": st.hash,
        "energy_evaluations": 0,
        "points": {},
    }
    for name, s in points_rad.items():
        b = backmap_point(flow, st.system, s, n_structures, gen)
        write_trajectory(b.x_nm, topology, out / f"{name}.pdb", out / f"{name}.dcd")
        info["points"][name] = {
            "s_rad": list(b.s),
            "n_structures": len(b.x_nm),
            "n_drawn": b.n_drawn,
            "kept_fraction": len(b.x_nm) / b.n_drawn,
        }
        print(f"backmap {name}: {len(b.x_nm)} structures from {b.n_drawn} draws", flush=True)
    with atomic_path(out / "backmap.json") as tmp:
        tmp.write_text(json.dumps(info, indent=1, sort_keys=True))
    return info
