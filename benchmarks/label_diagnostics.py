"""Why an alanine-dipeptide campaign's PMF is as good as it is: labels, regression and coverage
against the shipped reference, measured on a finished campaign without new energy evaluations.

    python benchmarks/label_diagnostics.py results/aldp_laptop [--iteration K]
        [--set ensemble.KEY=VALUE ...] [--noise 0.125 0.25 0.5] [--no-refit]

It prints, for iteration K (default: the last one with labels):

* the KLD (std100) of the campaign's own ensemble and each basin's share of it;
* the label error against the reference, F_label − F_ref (aligned by the median difference), over
  points where F_ref < 6 kT: mean, SD, by basin, and the labels' own standard errors there;
* where the labelled points lie: the fraction with F_ref > 8 kT or where the reference has no
  samples, and at the label cap;
* refits of the regression at the campaign's points (seed and split as the campaign's ensemble
  stage; ``--set`` overrides keys of the ``ensemble`` section for every refit): the campaign's
  own labels, the reference labels ("perfect labels"), and the reference labels with Gaussian
  noise of each ``--noise`` SD (kT).

F_ref is the reference's std100 histogram smoothed with a periodic Gaussian of one bin (so
sparse bins do not carry shot noise), −log of it, and NaN where the smoothed histogram has under
``MIN_COUNT`` samples per bin.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from cgflow.metrics import GRIDS, aldp_evaluation, basin_masks, model_probabilities
from cgflow.reference import load_reference
from cgflow.stages.points import TRAIN
from cgflow.stages.settings import Settings

#: smoothed reference counts per bin below which F_ref is undefined
MIN_COUNT = 5.0
#: "populated": F_ref below this (kT above the reference minimum)
POPULATED_KT = 8.0
#: label errors are measured where F_ref is below this (kT)
LABEL_ERROR_KT = 6.0


def smoothed_reference_F(counts: np.ndarray, sigma_bins: float = 1.0) -> np.ndarray:
    """``−log`` of the periodically Gaussian-smoothed histogram (min 0), NaN where it is sparse."""
    n = counts.shape[0]
    k = np.fft.fftfreq(n) * 2 * math.pi
    kernel = np.exp(-0.5 * sigma_bins**2 * (k[:, None] ** 2 + k[None, :] ** 2))
    smooth = np.real(np.fft.ifft2(np.fft.fft2(counts.astype(np.float64)) * kernel))
    with np.errstate(divide="ignore", invalid="ignore"):
        F = -np.log(np.clip(smooth, 1e-300, None) / smooth.sum())
    F[smooth < MIN_COUNT] = np.nan
    return F - np.nanmin(F)


def at_points(grid_F: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Values of a std100 grid at standard (φ, ψ) points (the bin they fall in)."""
    return grid_F.reshape(-1)[GRIDS["std100"].flat_index(s)]


def region_kld(F_model_std100: np.ndarray, counts: np.ndarray) -> dict[str, float]:
    """Each basin's share of the forward KLD on std100 (they sum to the KLD)."""
    p = counts.astype(np.float64) / counts.sum()
    q = model_probabilities(F_model_std100)
    term = np.zeros_like(p)
    m = p > 0
    term[m] = p[m] * np.log(p[m] / q[m])
    return {name: float(term[mask].sum()) for name, mask in basin_masks(GRIDS["std100"]).items()}


def refit(st: Settings, iteration: int, s: torch.Tensor, F: torch.Tensor, se: torch.Tensor, ref):
    """KLD and basin ΔF error of the ensemble stage's fit to labels ``F`` at ``s``."""
    from cgflow.free_energy import fit_ensemble

    t0 = time.perf_counter()
    ens = fit_ensemble(
        st["ensemble"],
        list(st.system.cg_spec.periodic),
        s,
        F,
        st.stage_seed(iteration, "ensemble"),
        se,
    )
    m = aldp_evaluation(ens.predict, ref)
    return {
        "kld_std100": m["kld_std100"],
        "kld_std36": m["kld_std36"],
        "dF_phi_pos_err_kT": m["dF_phi_pos_err_kT"],
        "fit_s": time.perf_counter() - t0,
    }


def read_any_labels(path: Path) -> dict[str, torch.Tensor]:
    """The label datasets this tool needs, from a labels file of any format version that has
    them (so runs made by earlier releases can be diagnosed too)."""
    import h5py

    need = ("s", "split", "F_kT", "se_kT", "ess", "n_draws")
    with h5py.File(path, "r") as f:
        missing = [n for n in need if n not in f]
        if missing:
            raise SystemExit(f"{path}: no dataset(s) {missing}; this tool needs {list(need)}")
        out = {n: torch.as_tensor(f[n][()]) for n in need}
        if "log_w_gap_iteration" in f:  # labels gathered before it existed lack it
            out["log_w_gap_iteration"] = torch.as_tensor(f["log_w_gap_iteration"][()])
        return out


def last_labelled_iteration(run: Path) -> int:
    its = sorted(int(p.parent.name.split("_")[1]) for p in run.glob("iter_*/labels.h5"))
    if not its:
        raise SystemExit(f"{run}: no iter_*/labels.h5")
    return its[-1]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("run", type=Path, help="a finished alanine-dipeptide campaign folder")
    ap.add_argument("--iteration", type=int, default=None)
    ap.add_argument("--set", nargs="*", default=[], metavar="ensemble.KEY=VALUE")
    ap.add_argument("--noise", nargs="*", type=float, default=[0.125, 0.25, 0.5])
    ap.add_argument("--no-refit", action="store_true", help="only the label and coverage figures")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    a = ap.parse_args(argv)

    cfg = yaml.safe_load((a.run / "config.yaml").read_text())
    for item in a.set:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        if section != "ensemble" or not name:
            raise SystemExit(f"--set takes ensemble.KEY=VALUE; got {item!r}")
        cfg["ensemble"][name] = yaml.safe_load(value)
    st = Settings(cfg)
    if st.system.name != "alanine_dipeptide":
        raise SystemExit(
            f"{a.run} is a {st.system.name} campaign; this tool needs the ALDP reference"
        )
    k = a.iteration if a.iteration is not None else last_labelled_iteration(a.run)
    ref = load_reference()
    counts = np.asarray(ref["counts_std100"])
    F_ref_grid = smoothed_reference_F(counts)
    out: dict[str, Any] = {"run": str(a.run), "iteration": k}

    from cgflow.free_energy import FreeEnergyEnsemble
    from cgflow.metrics import grid_values

    ens_path = a.run / f"iter_{k:03d}" / "ensemble.pt"
    if ens_path.exists():
        ens = FreeEnergyEnsemble.load(ens_path)
        F_model = grid_values(ens.predict, GRIDS["std100"].centres_phi_psi())[0]
        m = aldp_evaluation(ens.predict, ref)
        out["campaign"] = {
            "kld_std100": m["kld_std100"],
            "dF_phi_pos_err_kT": m["dF_phi_pos_err_kT"],
            "kld_by_basin": region_kld(F_model, counts),
        }

    d = read_any_labels(a.run / f"iter_{k:03d}" / "labels.h5")
    train = d["split"] == TRAIN
    s = d["s"].numpy()
    F_lab, se = d["F_kT"].numpy(), d["se_kT"].numpy()
    F_ref = at_points(F_ref_grid, s)
    ok = np.isfinite(F_lab) & np.isfinite(F_ref)
    low = ok & (F_ref < LABEL_ERROR_KT)
    offset = float(np.median(F_lab[low] - F_ref[low]))
    err = F_lab - offset - F_ref
    basins = basin_masks(GRIDS["std100"])
    bin_of = GRIDS["std100"].flat_index(s)
    by_basin = {
        name: {
            "n": int((low & mask.reshape(-1)[bin_of]).sum()),
            "mean_kT": float(np.mean(err[low & mask.reshape(-1)[bin_of]]))
            if (low & mask.reshape(-1)[bin_of]).any()
            else math.nan,
        }
        for name, mask in basins.items()
    }
    in_basin = {name: mask.reshape(-1)[bin_of] for name, mask in basins.items()}
    gap = d["log_w_gap_iteration"].numpy() if "log_w_gap_iteration" in d else None
    # every labelled point by basin (whatever its reference F), with the flow's log-weight gap
    coverage = {
        name: {
            "n_points": int(m.sum()),
            "gap_median_nat": float(np.nanmedian(gap[m])) if gap is not None and m.any() else None,
        }
        for name, m in in_basin.items()
    }
    cap = st["ensemble"]["label_cap_kT"]
    fin = np.isfinite(F_lab)
    out["labels"] = {
        "n_points": len(F_lab),
        "n_train": int(train.sum()),
        "draws_median": float(np.median(d["n_draws"].numpy())),
        "ess_median": float(np.median(d["ess"].numpy())),
        "error_sd_kT": float(np.std(err[low])),
        "error_by_basin": by_basin,
        "points_by_basin": coverage,
        "se_median_populated_kT": float(np.nanmedian(se[low])),
        "frac_unpopulated": float(np.mean(~(np.isfinite(F_ref) & (F_ref < POPULATED_KT)))),
        "frac_at_cap": math.nan
        if cap is None
        else float(np.mean(F_lab[fin] >= F_lab[fin].min() + cap)),
    }

    if not a.no_refit:
        tr = torch.as_tensor(train)
        s_t = torch.as_tensor(s)[tr]
        se_t = torch.as_tensor(se)[tr]
        lab_t = torch.as_tensor(F_lab)[tr]
        # reference labels where the reference has samples; the campaign's label elsewhere
        perfect = np.where(np.isfinite(F_ref), F_ref + offset, F_lab)
        perf_t = torch.as_tensor(perfect)[tr]
        rows = {"own labels": refit(st, k, s_t, lab_t, se_t, ref)}
        print("own labels", rows["own labels"], flush=True)
        ref_se = torch.full_like(se_t, st["ensemble"]["se_floor_kT"])
        rows["reference labels"] = refit(st, k, s_t, perf_t, ref_se, ref)
        print("reference labels", rows["reference labels"], flush=True)
        gen = np.random.default_rng(0)
        for sd in a.noise:
            noisy = perf_t + torch.as_tensor(gen.normal(0.0, sd, len(perf_t)))
            se_n = torch.full_like(se_t, sd)
            rows[f"reference + noise {sd} kT"] = refit(st, k, s_t, noisy, se_n, ref)
            print(f"noise {sd}", rows[f"reference + noise {sd} kT"], flush=True)
        out["refits"] = rows
    print(json.dumps(out, indent=1))
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
