"""Energy+force throughput for alanine dipeptide (ff96 + OBC1), all backends, in one run.

Baseline (a): the OpenMM CPU platform, one Context (Threads=1), a Python loop over
configurations. Every other row is printed as a ratio to (a) measured in the same run.
Goals: torch float32 on one core >= 3x (a); on one GPU >= 100x (a).

    python benchmarks/energy_throughput.py [--seconds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

from cgflow.energy.openmm_backend import OpenMMEnergy, available_platforms
from cgflow.energy.torch_backend import TorchEnergy
from cgflow.md import langevin_md
from cgflow.systems import get_system


def rate(fn, n_per_call: int, seconds: float, sync=lambda: None) -> float:
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    args = ap.parse_args()

    torch.set_num_threads(1)
    system = get_system("alanine_dipeptide")
    frames = langevin_md(system, n_frames=512, stride=50, seed=1).frames
    omm = system.openmm_system

    def batch(n: int) -> np.ndarray:
        return frames[np.arange(n) % len(frames)]

    rows: list[tuple[str, float]] = []
    x_loop = batch(256)
    with OpenMMEnergy(omm, platform="CPU") as be:
        rows.append(
            (
                "(a) OpenMM CPU, 1 Context, Python loop",
                rate(lambda: be.energies_and_forces(x_loop), 256, args.seconds),
            )
        )
    x_pool = batch(2048)
    with OpenMMEnergy(omm, platform="CPU", n_workers=2, chunk_size=512) as be:
        rows.append(
            (
                "(b) openmm backend, 2 workers",
                rate(lambda: be.energies_and_forces(x_pool), 2048, args.seconds),
            )
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
                rows.append(
                    (
                        label,
                        rate(lambda be=be, x=x: be.energies_and_forces(x), n, args.seconds, sync),
                    )
                )
    if "CUDA" in available_platforms():
        with OpenMMEnergy(omm, platform="CUDA") as be:
            rows.append(
                (
                    "(d) OpenMM CUDA, 1 Context, Python loop",
                    rate(lambda: be.energies_and_forces(x_loop), 256, args.seconds),
                )
            )

    base = rows[0][1]
    print(
        f"alanine dipeptide energy+forces, {platform.processor() or platform.machine()}, torch {torch.__version__}"
    )
    print(f"{'path':<48} {'evals/s':>12} {'ratio to (a)':>13}")
    for label, r in rows:
        print(f"{label:<48} {r:>12.0f} {r / base:>12.2f}x")
    cpu32 = max(r for label, r in rows if "float32 cpu" in label)
    print(
        f"goal torch float32 1 core >= 3x (a): {'met' if cpu32 >= 3 * base else 'MISSED'} ({cpu32 / base:.2f}x)"
    )
    if torch.cuda.is_available():
        gpu32 = max(r for label, r in rows if "float32 cuda" in label)
        print(
            f"goal torch float32 1 GPU >= 100x (a): {'met' if gpu32 >= 100 * base else 'MISSED'} ({gpu32 / base:.1f}x)"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                [{"path": label, "evals_per_s": r, "ratio": r / base} for label, r in rows],
                fh,
                indent=1,
            )


if __name__ == "__main__":
    main()
