"""Energy+force throughput for alanine dipeptide (ff96 + OBC1), all backends, in one run.

Baseline (a): the OpenMM CPU platform, one Context (Threads=1), a Python loop over
configurations. Every other row is a ratio to (a) measured in the same round: the rows are
measured interleaved, ``--rounds`` times round-robin, so that a busy neighbour on the machine
slows the baseline and the row it is compared with alike; each row prints the median and the
range over rounds of its rate and of its ratio. Goals: torch float32, batch 4096, on one core
>= 5x (a); on one GPU >= 100x (a).

    python benchmarks/energy_throughput.py [--seconds 2] [--rounds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from cgflow.energy.openmm_backend import OpenMMEnergy, available_platforms
from cgflow.energy.torch_backend import TorchEnergy
from cgflow.md import langevin_md
from cgflow.systems import get_system

BASELINE = "(a) OpenMM CPU, 1 Context, Python loop"
GOALS = (("float32 cpu, batch 4096", 5.0, "1 core"), ("float32 cuda", 100.0, "1 GPU"))


def rate(fn: Callable[[], object], n_per_call: int, seconds: float, sync=lambda: None) -> float:
    """Evaluations per second of ``fn`` (one warm-up call, then repeat for ``seconds``)."""
    fn()
    sync()
    calls, t0 = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        sync()
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds and calls >= 2:
            return calls * n_per_call / elapsed


def spread(values: list[float]) -> tuple[float, float, float]:
    """Median, minimum and maximum."""
    return statistics.median(values), min(values), max(values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds over all rows")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    args = ap.parse_args()
    if args.rounds < 1:
        raise SystemExit("--rounds must be >= 1")

    torch.set_num_threads(1)
    system = get_system("alanine_dipeptide")
    frames = langevin_md(system, n_frames=512, stride=50, seed=1).frames
    omm = system.openmm_system

    def batch(n: int) -> np.ndarray:
        return frames[np.arange(n) % len(frames)]

    # each row: label -> a function measuring its rate once (backends stay open across rounds)
    rows: dict[str, Callable[[], float]] = {}
    closing = []
    x_loop = batch(256)
    cpu = OpenMMEnergy(omm, platform="CPU")
    closing.append(cpu)
    rows[BASELINE] = lambda: rate(lambda: cpu.energies_and_forces(x_loop), 256, args.seconds)
    x_pool = batch(2048)
    pool = OpenMMEnergy(omm, platform="CPU", n_workers=2, chunk_size=512)
    closing.append(pool)
    rows["(b) openmm backend, 2 workers"] = lambda: rate(
        lambda: pool.energies_and_forces(x_pool), 2048, args.seconds
    )
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        sizes = (256, 4096) if device == "cpu" else (4096, 65536)
        for dtype in (torch.float32, torch.float64):
            be = TorchEnergy.from_openmm(omm, device=device, dtype=dtype)
            for n in sizes:
                x = torch.as_tensor(batch(n), device=device, dtype=dtype)
                label = f"(c) torch {str(dtype).split('.')[-1]} {device}, batch {n}"
                if device == "cpu":
                    label += ", 1 thread"
                rows[label] = lambda be=be, x=x, n=n, sync=sync: rate(
                    lambda: be.energies_and_forces(x), n, args.seconds, sync
                )
    if "CUDA" in available_platforms():
        gpu = OpenMMEnergy(omm, platform="CUDA")
        closing.append(gpu)
        rows["(d) OpenMM CUDA, 1 Context, Python loop"] = lambda: rate(
            lambda: gpu.energies_and_forces(x_loop), 256, args.seconds
        )

    rates: dict[str, list[float]] = {label: [] for label in rows}
    ratios: dict[str, list[float]] = {label: [] for label in rows}
    try:
        for _ in range(args.rounds):
            measured = {label: fn() for label, fn in rows.items()}
            base = measured[BASELINE]
            for label, r in measured.items():
                rates[label].append(r)
                ratios[label].append(r / base)
    finally:
        for be in closing:
            be.close()

    print(
        f"alanine dipeptide energy+forces, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {args.rounds} interleaved rounds of {args.seconds} s per row"
    )
    print(f"{'path':<48} {'evals/s median [min, max]':>30} {'ratio to (a) median [min, max]':>32}")
    out = []
    for label in rows:
        r, r_lo, r_hi = spread(rates[label])
        q, q_lo, q_hi = spread(ratios[label])
        print(
            f"{label:<48} {r:>10.0f} [{r_lo:>7.0f}, {r_hi:>7.0f}]"
            f" {q:>14.2f}x [{q_lo:.2f}, {q_hi:.2f}]"
        )
        out.append(
            {
                "path": label,
                "evals_per_s_median": r,
                "evals_per_s_range": [r_lo, r_hi],
                "ratio_median": q,
                "ratio_range": [q_lo, q_hi],
            }
        )
    for key, goal, where in GOALS:
        hits = [label for label in rows if key in label]
        if not hits:
            continue
        q = statistics.median(ratios[hits[0]])
        verdict = "met" if q >= goal else "MISSED"
        print(f"goal torch {key} on {where} >= {goal:g}x (a): {verdict} (median {q:.2f}x)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
