#!/usr/bin/env bash
# Regenerate or extend the alanine-dipeptide ground truth (resumable: finished chunks are skipped).
# Usage: data/reference/aldp/generate.sh [TOTAL_CHUNKS]   (run from the repository root)
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
CGFLOW=$(command -v cgflow || echo .venv/bin/cgflow)
exec "$CGFLOW" reference generate \
  --dir data/reference/aldp \
  --out src/cgflow/references/aldp_ff96_obc1_300K.h5 \
  --chunks "${1:-200}" \
  --temperatures-K 300 356.3 423.2 502.6 596.9 708.9 842 1000 \
  --n-ladders 32 --steps 20000 --timestep-fs 1.5 --hydrogen-mass-amu 3.0 \
  --friction-per-ps 1.0 --exchange-every 50 --sample-every 10 --series-every 100 \
  --equilibration-steps 10000 --discard-chunks 2 --seed 2024 --device cpu --dtype float32
