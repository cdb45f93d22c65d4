"""Selection of the next CG points: walkers on the ensemble of iteration k (``walkers.h5``) and
farthest points among them spread into new points (``points.h5``); the convergence checkpoint
is :mod:`.status`."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..data import read_h5, write_h5
from .points import held_out_split, read_points, write_points
from .settings import Settings
from .start import minimum


def _write_walkers(
    st: Settings, iteration: int, out: Any, points: Any, stop_steps: Any, attrs: dict
) -> None:
    write_h5(
        out,
        "walkers",
        {
            "points": np.asarray(points).reshape(-1, st.system.cg_spec.dim),
            "stop_steps": np.asarray(stop_steps),
        },
        {"points": st.cg_units, "stop_steps": "1"},
        st.provenance(iteration),
        attrs=attrs,
    )


def walkers(
    st: Settings, iteration: int, ensemble_in: Any, points_in: Any, start_in: Any, out: Any
) -> None:
    """CG walkers from the previous iteration's centres (first time: ``walkers.start`` or the
    CG value of the energy minimum recorded in ``start_in``)."""
    from ..free_energy import FreeEnergyEnsemble
    from ..sampling import cg_walkers

    if st.grid_mode:  # no walkers: nothing is added, the run ends at max_iterations
        attrs = {"exhausted": False, "steps_used": 0, "n_walkers": 0, "grid_mode": True}
        _write_walkers(st, iteration, out, np.zeros(0), np.zeros(0, dtype=np.int64), attrs)
        return
    ens = FreeEnergyEnsemble.load(ensemble_in)
    p = read_points(points_in)
    w = st["walkers"]
    if len(p["centres"]):
        starts = torch.as_tensor(p["centres"])
    elif w["start"] is not None:
        starts = torch.tensor([w["start"]], dtype=torch.float64)
    else:
        starts = st.system.cg(torch.as_tensor(minimum(start_in)[None], dtype=torch.float64))
    starts = starts.reshape(len(starts), -1)[torch.arange(w["n_walkers"]) % len(starts)]
    # the lowest predicted F over the labelled points: where the probability mass is
    F_low = float(ens.predict(p["s"])[0].min()) if len(p["s"]) else 0.0
    res = cg_walkers(
        ens.predict,
        starts,
        periodic=list(st.system.cg_spec.periodic),
        bounds=list(st.system.cg_spec.bounds),
        step_size=w["step_size"],
        threshold_kT=w["threshold_kT"],
        n_wanted=w["n_candidates"],
        max_steps=w["max_steps"],
        min_steps=w["min_steps"],
        beta=float(w["beta"]),
        seed=st.stage_seed(iteration, "walkers"),
        mass_temperature_kT=w["mass_temperature_kT"],
        F_low_kT=F_low,
        novelty_points=p["s"] if w["novelty_radius"] is not None else None,
        novelty_radius=w["novelty_radius"],
    )
    attrs = {
        "exhausted": bool(res.exhausted),
        "steps_used": int(res.steps_used),
        "n_walkers": w["n_walkers"],
        "F_low_kT": F_low,
    }
    _write_walkers(st, iteration, out, res.points, res.stop_steps, attrs)


def select(st: Settings, iteration: int, walkers_in: Any, points_in: Any, out: Any) -> None:
    """Farthest points among the stopped walkers, spread around each, a random held-out
    fraction, appended to the points of iteration k − 1."""
    from ..sampling import farthest_point_selection, spread

    found = torch.as_tensor(read_h5(walkers_in, "walkers")["points"])
    p = read_points(points_in)
    periodic = list(st.system.cg_spec.periodic)
    bounds = list(st.system.cg_spec.bounds)
    s, split, tag, group = p["s"], p["split"], p["tag"], p["group"]
    centres = found[:0]
    if len(found):
        n_sel = min(st["walkers"]["n_select"], len(found))
        seed = st.stage_seed(iteration, "select_fps")
        centres = found[farthest_point_selection(found, n_sel, periodic, bounds, seed=seed)]
        sp = st["spreading"]
        new = spread(
            centres,
            sp["n_per_centre"],
            sp["radius"],
            kind=sp["kind"],
            periodic=periodic,
            bounds=bounds,
            seed=st.stage_seed(iteration, "select_spread"),
        )
        groups = torch.arange(len(centres)).repeat_interleave(sp["n_per_centre"])
        new_split = held_out_split(
            len(new), sp["test_fraction"], st.stage_seed(iteration, "select_split")
        )
        s = torch.cat([s, new.to(s.dtype)])
        split = torch.cat([split, new_split])
        tag = torch.cat([tag, torch.full((len(new),), iteration, dtype=torch.int64)])
        group = torch.cat([group, int(group.max()) + 1 + groups if len(group) else groups])
    write_points(st, out, iteration, s, split, tag, group, centres.numpy())
