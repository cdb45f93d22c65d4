"""CG points of a campaign (``points.h5``): coordinates, held-out split, the iteration that
added each point, its group (the walker centre it was spread from) and the iteration's centres.

Held-out points (split 1) are labelled like the training points but neither train the flow nor
fit the ensemble; the held-out label error of each iteration is measured on them.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch

from ..data import read_h5, write_h5
from .settings import Settings

TRAIN, HELD_OUT = 0, 1


def read_points(path: str | os.PathLike) -> dict[str, Any]:
    """``s``, ``split``, ``tag``, ``group`` (tensors) and ``centres`` (array) of a points file."""
    d = read_h5(path, "points")
    return {
        "s": torch.as_tensor(d["s"]),
        "split": torch.as_tensor(d["split"]),
        "tag": torch.as_tensor(d["tag"]),
        "group": torch.as_tensor(d["group"]),
        "centres": np.asarray(json.loads(d.attrs.get("centres", "[]")), dtype=np.float64),
    }


def write_points(
    st: Settings, out: Any, iteration: int, s: Any, split: Any, tag: Any, group: Any, centres: Any
) -> None:
    write_h5(
        out,
        "points",
        {"s": s, "split": split, "tag": tag, "group": group},
        {"s": st.cg_units, "split": "1", "tag": "1", "group": "1"},
        st.provenance(iteration),
        attrs={
            "centres": np.asarray(centres, dtype=np.float64).tolist(),
            "split_codes": f"{TRAIN} = train, {HELD_OUT} = held out",
            "tag_meaning": "iteration whose selection added the point",
        },
    )


def held_out_split(n: int, test_fraction: float, seed: int) -> torch.Tensor:
    """Split codes of ``n`` new points: a random ``test_fraction`` of them held out (point by
    point, so every region the walkers found keeps most of its points for training)."""
    from ..sampling import split_points

    _, te = split_points(n, test_fraction, seed=seed)
    split = torch.full((n,), TRAIN, dtype=torch.int64)
    split[te] = HELD_OUT
    return split
