"""Reverse-KL training throughput of the alanine-dipeptide flow, energy and flow time apart.

Baseline: the original code's setting (float64 flow, batch 64, 12 blocks x 256 hidden), measured
in the same run; every row is printed as a ratio of samples/s to it. Energies come from the torch
backend (float32 unless the row says otherwise), on one thread.

    python benchmarks/flow_training.py [--steps 5] [--device cpu|cuda]

With ``--device cuda`` the flow, the batch and the torch energies live on the GPU (the baseline
too, so the ratios compare settings on the same device).
"""

from __future__ import annotations

import argparse
import time

import torch

from cgflow.energy.counting import EvaluationCounter
from cgflow.energy.torch_backend import TorchEnergy
from cgflow.flows import build_flow
from cgflow.systems import get_system
from cgflow.training import reverse_kl_losses, robust_mean


class TimedBackend:
    """Wraps a backend and accumulates the wall time of its energy+force calls."""

    def __init__(self, backend):
        self.backend = backend
        self.seconds = 0.0

    def energies_and_forces(self, x):
        t0 = time.perf_counter()
        out = self.backend.energies_and_forces(x)
        self.seconds += time.perf_counter() - t0
        return out


def measure(system, blocks, hidden, batch, flow_dtype, energy_dtype, steps, device="cpu"):
    flow = build_flow(system, n_blocks=blocks, hidden=hidden).to(device=device, dtype=flow_dtype)
    opt = torch.optim.Adam(flow.parameters(), lr=1e-6)
    backend = TimedBackend(
        TorchEnergy.from_openmm(system.openmm_system, dtype=energy_dtype, device=device)
    )
    x0, _ = system.initial_configuration()
    s = system.cg(torch.as_tensor(x0[None], dtype=flow_dtype)).expand(batch, -1).to(device)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    counter = EvaluationCounter()
    gen = torch.Generator(device=device).manual_seed(0)

    def step():
        losses, _ = reverse_kl_losses(flow, system, backend, s, counter, generator=gen)
        loss, _ = robust_mean(losses, 5)
        opt.zero_grad()
        if torch.isfinite(loss):
            loss.backward()
            opt.step()

    step()  # warm-up
    sync()
    backend.seconds = 0.0
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    total = time.perf_counter() - t0
    return {
        "samples_per_s": steps * batch / total,
        "energy_s_per_step": backend.seconds / steps,
        "flow_s_per_step": (total - backend.seconds) / steps,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="training steps per setting")
    ap.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: no CUDA device is available")
    torch.set_num_threads(1)
    system = get_system("alanine_dipeptide")
    f64, f32 = torch.float64, torch.float32
    settings = [
        ("original: f64, batch 64, 12x256", 12, 256, 64, f64, f64),
        ("f32, batch 64, 12x256", 12, 256, 64, f32, f32),
        ("f64, batch 256, 12x256", 12, 256, 256, f64, f32),
        ("f32, batch 256, 12x256", 12, 256, 256, f32, f32),
        ("f32, batch 1024, 12x256", 12, 256, 1024, f32, f32),
        ("f32, batch 256, 6x128", 6, 128, 256, f32, f32),
        ("f32, batch 1024, 6x128", 6, 128, 1024, f32, f32),
    ]
    rows = []
    for label, blocks, hidden, batch, fdt, edt in settings:
        rows.append(
            (label, measure(system, blocks, hidden, batch, fdt, edt, args.steps, args.device))
        )
    base = rows[0][1]["samples_per_s"]
    print(
        f"reverse-KL training, alanine dipeptide flow, {args.device} (1 CPU thread), "
        f"torch {torch.__version__}"
    )
    print(
        f"{'setting':<34} {'samples/s':>10} {'ratio':>7} {'energy s/step':>14} {'flow s/step':>12}"
    )
    for label, r in rows:
        print(
            f"{label:<34} {r['samples_per_s']:>10.0f} {r['samples_per_s'] / base:>6.2f}x "
            f"{r['energy_s_per_step']:>14.4f} {r['flow_s_per_step']:>12.4f}"
        )


if __name__ == "__main__":
    main()
