"""Alanine-dipeptide campaigns of several seeds against the method's targets and metadynamics.

    python benchmarks/method_acceptance.py results/s0/aldp_laptop/summary.csv \\
        results/s1/aldp_laptop/summary.csv ... [--points data/baselines/speedup/points.csv]

For each seed (one ``summary.csv`` each) it prints the KLD (std100) per iteration, the φ > 0
basin ΔF error, the median label ESS, the flow's ESS fraction and the label standard error
where the mass is, and how N splits into start, training and labels. Then the targets, each
with PASS / MISS and the figures behind it:

* median final KLD ≤ 0.006 (goal 0.004), every seed ≤ 0.008, at N ≤ 3e6;
* |ΔF(φ > 0 vs rest) error| ≤ 0.3 kT at the last two iterations of every seed;
* every seed reaches KLD ≤ 0.01 by N = 2e6 (and stays there), with the shipped metadynamics
  runs' KLD at N = 2e6 for comparison (interpolated on log N).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
KLD = "metric_kld_std100"
DF = "metric_dF_phi_pos_err_kT"


def seed_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per iteration: N, KLD, ΔF error, label ESS, flow ESS fraction, label SE."""
    cols = {
        "N": "N",
        KLD: "kld_std100",
        DF: "dF_phi_pos_err_kT",
        "metric_label_ess_median": "label_ess",
        "metric_flow_ess_fraction": "flow_ess_frac",
        "metric_label_se_populated_kT": "label_se_pop_kT",
        "metric_heldout_rmse_kT": "heldout_rmse_kT",
    }
    it = df[df["iteration"] > 0]
    out = it[["iteration", *[c for c in cols if c in it]]].rename(columns=cols)
    return out.set_index("iteration")


def at_n(df: pd.DataFrame, n: float) -> float:
    """The KLD of the last iteration with N ≤ n (NaN before the first)."""
    it = df[(df["iteration"] > 0) & (df["N"] <= n)]
    return float(it[KLD].iloc[-1]) if len(it) else float("nan")


def reaches(df: pd.DataFrame, target: float, n_max: float) -> float | None:
    """First N ≤ n_max from which the KLD stays ≤ target to the end of the run, or None."""
    it = df[df["iteration"] > 0]
    ok = (it[KLD] <= target).to_numpy()
    for i in range(len(ok)):
        if ok[i:].all():
            n = float(it["N"].iloc[i])
            return n if n <= n_max else None
    return None


def metad_at(points: Path, n: float) -> dict[str, float]:
    """KLD (std100) of each shipped metadynamics run at ``n`` evaluations (log-N interpolation)."""
    p = pd.read_csv(points)
    out = {}
    for run, g in p[p["method"] == "metadynamics"].groupby("run"):
        g = g.sort_values("evaluations")
        out[run] = float(np.interp(np.log(n), np.log(g["evaluations"]), g["kld_std100"]))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("summaries", type=Path, nargs="+", help="summary.csv of each seed")
    ap.add_argument("--points", type=Path, default=ROOT / "data/baselines/speedup/points.csv")
    a = ap.parse_args(argv)
    runs = {str(p): pd.read_csv(p) for p in a.summaries}
    finals = []
    for name, df in runs.items():
        last = df.iloc[-1]
        snap = Path(name).parent / "config.yaml"
        seed = yaml.safe_load(snap.read_text())["seed"] if snap.exists() else "?"
        print(f"\n== {name} (seed {seed})")
        print(seed_table(df).to_string(float_format=lambda v: f"{v:.4g}"))
        split = {
            k: float(last[f"cum_evals_{k}"])
            for k in ("start_md", "minimisation", "training", "labels")
        }
        print("N by kind: " + ", ".join(f"{k} {v:.3g}" for k, v in split.items()))
        finals.append(at_n(df, 3e6))
    finals = np.asarray(finals)
    med = float(np.median(finals))
    print("\n== targets")
    print(
        f"{'PASS' if med <= 0.006 and (finals <= 0.008).all() else 'MISS'} final KLD at N <= 3e6: "
        f"median {med:.4f} (target 0.006, goal 0.004), per seed {np.round(finals, 4).tolist()} "
        "(each <= 0.008)"
    )
    last_two = [df[df["iteration"] > 0][DF].iloc[-2:].abs().max() for df in runs.values()]
    print(
        f"{'PASS' if max(last_two) <= 0.3 else 'MISS'} |dF(phi > 0) error| at the last two "
        f"iterations: worst per seed {np.round(last_two, 3).tolist()} kT (each <= 0.3)"
    )
    reach = [reaches(df, 0.01, 2e6) for df in runs.values()]
    print(
        f"{'PASS' if all(r is not None for r in reach) else 'MISS'} KLD <= 0.01 by N = 2e6 "
        f"(and after): first N per seed {[None if r is None else f'{r:.3g}' for r in reach]}"
    )
    for run, v in metad_at(a.points, 2e6).items():
        print(f"     metadynamics {run}: KLD {v:.4f} at N = 2e6")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
