"""Projected wall time of one full iteration of ``config/aldp_paper.yaml`` on this machine, from
two shrunk iterations of it run in this process (``cgflow run``, same stages and files).

The shrunk campaign keeps the flow, the draws per point and the walkers of the paper config and
divides by ``--shrink`` (default 10) the number of CG points (starting frames and points spread
per centre) and every epoch count (pre-training, fine-tuning, ensemble). Each rule's measured
seconds in iteration 2 are scaled back linearly by the work it does: points x epochs for
fine-tuning and the ensemble, points for sampling, energies and labels, 1 for the rest (walkers,
selection, evaluation). On a GPU the small shrunk batches use the device less well than the
full ones, so the projection errs on the long side.

    python benchmarks/paper_iteration.py [--device cuda] [--shrink 10] [--keep DIR]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
#: how each rule's work scales with the shrink factor f: f**power
POWER = {"finetune": 2, "ensemble": 2, "sample": 1, "energy": 1, "gather": 1}


def shrunk_config(cfg: dict, shrink: int, device: str) -> dict:
    """The paper config with points and epochs divided by ``shrink``, run for 2 iterations."""
    c = copy.deepcopy(cfg)
    c["campaign"] = "aldp_paper_shrunk"
    c["start"]["n_frames"] = max(c["start"]["n_frames"] // shrink, 50)
    c["spreading"]["n_per_centre"] = max(c["spreading"]["n_per_centre"] // shrink, 5)
    c["example"]["epochs"] = max(c["example"]["epochs"] // shrink, 1)
    for phase in ("first", "later"):
        et = c["energy_training"][phase]
        et["epochs"] = max(et["epochs"] // shrink, 1)
        et["warmup_epochs"] = min(et["warmup_epochs"], et["epochs"])
        et["clip_switch_epoch"] = min(et["clip_switch_epoch"], et["epochs"])
    c["ensemble"]["epochs"] = max(c["ensemble"]["epochs"] // shrink, 1)
    c["backend"] = {**c["backend"], "device": device}
    c["max_iterations"] = 2
    c["stop"] = {"metric": None, "threshold": None}
    c.pop("baselines", None)
    return c


def rule_seconds(campaign_dir: Path, iteration: int) -> pd.Series:
    """Seconds per rule of one iteration (shards summed): the ``seconds_<rule>`` columns of the
    campaign's ``summary.csv``."""
    summary = pd.read_csv(campaign_dir / "summary.csv").set_index("iteration")
    row = summary.loc[iteration].filter(like="seconds_").dropna()
    if row.empty:
        raise SystemExit(f"{campaign_dir}/summary.csv has no seconds of iteration {iteration}")
    return row.rename(lambda c: c.removeprefix("seconds_")).astype(float)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="torch device of the training energies")
    p.add_argument("--shrink", type=int, default=10)
    p.add_argument("--config", type=Path, default=ROOT / "config" / "aldp_paper.yaml")
    p.add_argument("--keep", type=Path, default=None, help="results folder (default: temporary)")
    args = p.parse_args(argv)
    if args.shrink < 1:
        p.error("--shrink must be >= 1")
    import torch

    from cgflow.campaign import run_campaign

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: no CUDA device is available")
    cfg = shrunk_config(yaml.safe_load(args.config.read_text()), args.shrink, args.device)
    results = args.keep or Path(tempfile.mkdtemp(prefix="cgflow-paper-"))
    t0 = time.perf_counter()
    root = run_campaign(cfg, results, log=lambda m: print(m, flush=True))
    wall = time.perf_counter() - t0
    sec = rule_seconds(root, 2)
    scale = pd.Series({r: float(args.shrink ** POWER.get(r, 0)) for r in sec.index})
    table = pd.DataFrame({"shrunk_s": sec, "scale": scale, "projected_s": sec * scale})
    print(table.sort_values("projected_s", ascending=False).round(1).to_string())
    total = float(table["projected_s"].sum())
    print(
        f"shrunk campaign (iterations 0-2, 1/{args.shrink} of the points and epochs) on "
        f"{args.device}: {wall:.0f} s wall; iteration 2 took {sec.sum():.1f} s"
    )
    print(
        f"projected full aldp_paper iteration on {args.device}: {total / 60:.1f} min "
        f"({total / sec.sum():.1f}x the shrunk iteration)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
