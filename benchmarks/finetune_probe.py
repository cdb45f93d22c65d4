"""One fine-tuning iteration of a finished alanine-dipeptide campaign redone with other
fine-tuning settings, against the campaign's own flow of that iteration: which labels does each
flow give where the reference has mass?

    python benchmarks/finetune_probe.py results/aldp_laptop --iteration 7 \
        --set energy_training.priority.kind=populated_gap [--draws 256] [--n-rest 150]

Iteration K's fine-tuning starts from iteration K − 1's flow, points, ensemble and labels, with
the campaign's config and seed and the ``--set`` overrides (``energy_training.KEY=VALUE``,
``energy_training.SECTION.KEY=VALUE``), through the workflow's own stage function
(:func:`cgflow.stages.train.finetune`). Both flows, the campaign's ``iter_K/flow.pt`` and the
new one, then label the same points with the same fresh draws' seed: every φ > 0 point of
iteration K − 1 whose reference F (see ``label_diagnostics.py``) is below 6 kT and ``--n-rest``
φ < 0 points below 6 kT. It prints, per flow, the mean and median label error at φ > 0 after
aligning on the φ < 0 median, the SD of the φ < 0 errors, and the median ESS / draws of each
group. Energies in float64 torch (the campaign's energy counters are not touched).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from cgflow.free_energy import WeightSums
from cgflow.metrics import GRIDS, basin_masks
from cgflow.reference import load_reference
from cgflow.stages import train
from cgflow.stages.settings import Settings

try:  # run as a script from the repository root or from benchmarks/
    from label_diagnostics import LABEL_ERROR_KT, at_points, smoothed_reference_F
except ImportError:  # pragma: no cover
    from benchmarks.label_diagnostics import LABEL_ERROR_KT, at_points, smoothed_reference_F


def override(cfg: dict[str, Any], item: str) -> None:
    """Apply one ``energy_training.[SECTION.]KEY=VALUE`` (VALUE in YAML) to ``cfg``."""
    key, sep, value = item.partition("=")
    parts = key.split(".")
    if not sep or parts[0] != "energy_training" or len(parts) not in (2, 3):
        raise SystemExit(f"--set takes energy_training.[SECTION.]KEY=VALUE; got {item!r}")
    node = cfg["energy_training"]
    for p in parts[1:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = yaml.safe_load(value)


def label_figures(
    flow_path: Path,
    st: Settings,
    s: torch.Tensor,
    F_ref: np.ndarray,
    n_pos: int,
    draws: int,
    seed: int,
) -> dict[str, float]:
    from cgflow.energy.counting import EvaluationCounter
    from cgflow.flows import load_flow
    from cgflow.training import label_log_weights

    flow, _ = load_flow(flow_path)
    flow = flow.to(st.dtype)
    backend = st.system.energy_backend("torch", dtype=torch.float64)
    lw = label_log_weights(flow, st.system, backend, s, draws, EvaluationCounter(), seed=seed)
    lab = WeightSums.from_log_weights(lw).labels()
    err = lab.F_kT.numpy() - F_ref
    err = err - np.median(err[n_pos:])
    ess = lab.ess.numpy() / draws
    return {
        "phi_pos_mean_err_kT": float(err[:n_pos].mean()),
        "phi_pos_median_err_kT": float(np.median(err[:n_pos])),
        "phi_neg_sd_kT": float(err[n_pos:].std()),
        "ess_frac_phi_pos": float(np.median(ess[:n_pos])),
        "ess_frac_phi_neg": float(np.median(ess[n_pos:])),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("run", type=Path, help="a finished alanine-dipeptide campaign folder")
    ap.add_argument("--iteration", type=int, required=True, help="the fine-tuning to redo (>= 2)")
    ap.add_argument("--set", nargs="*", default=[], metavar="energy_training.KEY=VALUE")
    ap.add_argument("--draws", type=int, default=256)
    ap.add_argument("--n-rest", type=int, default=150, help="φ < 0 points labelled")
    ap.add_argument("--seed", type=int, default=123, help="seed of the label draws")
    a = ap.parse_args(argv)
    k = a.iteration
    if k < 2:
        raise SystemExit("--iteration must be 2 or more (it needs iteration k - 1's labels)")
    cfg = yaml.safe_load((a.run / "config.yaml").read_text())
    for item in a.set:
        override(cfg, item)
    st = Settings(cfg)
    if st.system.name != "alanine_dipeptide":
        raise SystemExit(f"{a.run} is a {st.system.name} campaign; this needs the ALDP reference")
    prev, own = a.run / f"iter_{k - 1:03d}", a.run / f"iter_{k:03d}" / "flow.pt"
    for path in (prev / "flow.pt", prev / "points.h5", prev / "labels.h5", own):
        if not path.exists():
            raise SystemExit(f"missing {path}")
    from cgflow import config as cfgmod
    from cgflow.stages.points import read_points

    out = Path(tempfile.mkdtemp(prefix="cgflow-probe-"))
    ens = prev / "ensemble.pt" if cfgmod.trains_with_ensemble(st.cfg, k) else None
    labs = prev / "labels.h5" if cfgmod.prioritizes_training(st.cfg, k) else None
    t0 = time.perf_counter()
    train.finetune(
        st, k, prev / "flow.pt", prev / "points.h5", out / "flow.pt", out / "t.h5", ens, labs
    )
    seconds = time.perf_counter() - t0

    s_all = read_points(prev / "points.h5")["s"]
    F_ref_all = at_points(
        smoothed_reference_F(np.asarray(load_reference()["counts_std100"])), s_all.numpy()
    )
    pos = basin_masks(GRIDS["std100"])["phi_pos"].reshape(-1)[
        GRIDS["std100"].flat_index(s_all.numpy())
    ]
    ok = np.isfinite(F_ref_all) & (F_ref_all < LABEL_ERROR_KT)
    i_pos = np.nonzero(ok & pos)[0]
    i_neg = np.nonzero(ok & ~pos)[0]
    if len(i_pos) == 0:
        raise SystemExit(f"iteration {k - 1} has no φ > 0 point below {LABEL_ERROR_KT} kT")
    i_neg = np.random.default_rng(0).choice(i_neg, min(a.n_rest, len(i_neg)), replace=False)
    idx = np.concatenate([i_pos, i_neg])
    args = (st, s_all[idx], F_ref_all[idx], len(i_pos), a.draws, a.seed)
    result = {
        "run": str(a.run),
        "iteration": k,
        "set": a.set,
        "n_phi_pos": len(i_pos),
        "n_phi_neg": len(i_neg),
        "finetune_s": seconds,
        "campaign_flow": label_figures(own, *args),
        "probe_flow": label_figures(out / "flow.pt", *args),
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
