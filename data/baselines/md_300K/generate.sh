#!/usr/bin/env bash
# Plain-MD baseline for alanine dipeptide (issue 6): the ground-truth engine without exchanges,
# 32 independent 300 K Langevin trajectories all started at the energy minimum, phi/psi every
# 100 steps (150 fs). Resumable: finished chunks are skipped. Usage (repository root):
#   data/baselines/md_300K/generate.sh [TOTAL_CHUNKS]      # 100,000 steps = 150 ps per chunk; 25 shipped
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
CGFLOW=$(command -v cgflow || echo .venv/bin/cgflow)
exec "$CGFLOW" reference generate \
  --dir data/baselines/md_300K \
  --out data/baselines/md_300K/merged.h5 \
  --chunks "${1:-25}" \
  --temperatures-K 300 --n-ladders 32 --start minimum \
  --steps 100000 --timestep-fs 1.5 --hydrogen-mass-amu 3.0 \
  --friction-per-ps 1.0 --exchange-every 50 --sample-every 10 --series-every 100 \
  --equilibration-steps 0 --discard-chunks 0 --seed 7 --device cpu --dtype float32
