"""Iteration 0: starting data and the energy minimum (``start.h5``), pre-training by example
(``flow.pt``) and the initial CG points (``points.h5``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..data import read_h5, write_h5
from ..energy.counting import EvaluationCounter
from .points import held_out_split, write_points
from .settings import Settings


def start(st: Settings, out: Any) -> None:
    """The energy minimum (counted once, here) and a short MD (molecules) or Metropolis
    (analytic) run from it; every evaluation counted."""
    from ..md import short_run

    seed = st.stage_seed(0, "start")
    counter = EvaluationCounter()
    x_min, n_min = st.system.initial_configuration()
    counter.add("minimisation", n_min)
    sampler = dict(st["start"]["sampler"])
    if sampler.get("x0") is None:
        sampler["x0"] = x_min
    run = short_run(st.system, st["start"]["n_frames"], st["start"]["stride"], seed=seed, **sampler)
    counter.merge([run.counts])
    s = st.system.cg(torch.as_tensor(run.frames)).numpy()
    units = st.system.length_unit
    write_h5(
        out,
        "start",
        {"x": run.frames, "s": s, "x_min": np.asarray(x_min, dtype=np.float64)},
        {"x": units, "s": st.cg_units, "x_min": units},
        st.provenance(0, seed),
        attrs={"stride": run.stride, "sampler": st["start"]["sampler"]},
        counters=counter.as_dict(),
    )


def minimum(start_h5: Any) -> np.ndarray:
    """The energy-minimised configuration recorded by :func:`start`."""
    return np.asarray(read_h5(start_h5, "start", datasets=["x_min"])["x_min"])


def within_window(
    s: torch.Tensor, x_fg: torch.Tensor, window: list[list[float]] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the frames whose CG values lie in ``window`` (``[low, high]`` per coordinate)."""
    if window is None:
        return s, x_fg
    inside = torch.ones(len(s), dtype=torch.bool)
    for j, (lo, hi) in enumerate(window):
        inside &= (s[:, j] >= lo) & (s[:, j] <= hi)
    if not bool(inside.any()):
        raise ValueError(f"no starting frame has CG values inside start.cg_window {window}")
    return s[inside], x_fg[inside]


def _start_values(st: Settings, start_h5: Any) -> tuple[torch.Tensor, torch.Tensor]:
    from ..training import cg_values

    d = read_h5(start_h5, "start", datasets=["x"])
    return within_window(*cg_values(st.system, d["x"], st.dtype), st["start"]["cg_window"])


def pretrain(st: Settings, start_h5: Any, out: Any) -> None:
    """Training by example on the starting frames; writes the flow with its history."""
    from ..flows import build_flow, save_flow
    from ..training import ExampleConfig, train_by_example

    s, x_fg = _start_values(st, start_h5)
    seed = st.stage_seed(0, "start")
    torch.manual_seed(seed)
    flow = build_flow(st.system, reference=minimum(start_h5), **st["flow"]).to(st.dtype)
    ex = ExampleConfig(**st["example"], seed=seed)
    opt = torch.optim.Adam(flow.parameters(), lr=ex.lr)
    hist = train_by_example(flow, s, x_fg, ex, optimizer=opt)
    save_flow(
        flow,
        out,
        extra={"iteration": 0, "nll": hist["nll"], "config_hash": st.hash, "dtype": st["dtype"]},
        optimizer=opt,
    )


def grid_points(system: Any, per_axis: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A regular grid of CG points at bin centres (periodic ends are not duplicated)."""
    axes = []
    for lo, hi in system.cg_spec.bounds:
        width = (hi - lo) / per_axis
        axes.append(lo + (torch.arange(per_axis, dtype=dtype) + 0.5) * width)
    mesh = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([m.reshape(-1) for m in mesh], dim=1)


def initial_points(st: Settings, start_h5: Any, out: Any) -> None:
    """CG points of the starting frames (optionally a random subset) with a random held-out
    fraction; in the grid mode the regular grid instead."""
    seed = st.stage_seed(0, "initial_points")
    if st.grid_mode:
        s = grid_points(st.system, int(st["grid"]["per_axis"]))
    else:
        s, _ = _start_values(st, start_h5)
        n = st["start"]["n_points"]
        if n and n < len(s):
            gen = torch.Generator().manual_seed(seed)
            s = s[torch.randperm(len(s), generator=gen)[:n]]
        s = s.to(torch.float64)
    split = held_out_split(len(s), st["start"]["test_fraction"], seed)
    zeros = torch.zeros(len(s), dtype=torch.int64)
    write_points(st, out, 0, s, split, zeros, torch.arange(len(s)), [])
