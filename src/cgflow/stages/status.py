"""The convergence checkpoint of iteration k (``status.json``): walkers exhausted, a metric below
its threshold, or the last iteration. It imports neither torch nor the other stages, so the
``check`` job costs little more than reading two small files."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..data import atomic_path, read_h5


def check(
    iteration: int,
    walkers_in: Any,
    metrics_in: Any,
    out: Any,
    max_iterations: int,
    stop_metric: str | None = None,
    stop_threshold: float | None = None,
) -> dict[str, Any]:
    """Converged? Walkers exhausted (no ground truth needed), a metric below its threshold, or
    the last iteration. The stop settings come as arguments (the workflow keeps them out of the
    config snapshot so that a campaign can be extended)."""
    if stop_metric is not None and stop_threshold is None:
        raise ValueError(f"stop metric {stop_metric!r} needs a threshold")
    w = read_h5(walkers_in, "walkers", datasets=["points"])
    metrics = json.loads(Path(metrics_in).read_text())
    status = {"iteration": iteration, "converged": False, "reason": "continue"}
    if w.attrs["exhausted"] and len(w["points"]) == 0:
        status.update(converged=True, reason="walkers exhausted")
    elif stop_metric and metrics.get(stop_metric, math.inf) < stop_threshold:
        status.update(converged=True, reason=f"{stop_metric} < {stop_threshold}")
    elif iteration >= max_iterations:
        status.update(converged=True, reason="max iterations")
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(status, indent=1))
    return status


def read_status(path: Any) -> dict[str, Any]:
    """A checkpoint's status (``converged`` flag and reason); a clear error for anything else."""
    status = json.loads(Path(path).read_text())
    if not isinstance(status, dict) or not isinstance(status.get("converged"), bool):
        raise ValueError(f"{path}: expected a JSON object with a boolean 'converged'")
    return status
