#!/usr/bin/env bash
# OPES baseline for alanine dipeptide: OPES_METAD on phi/psi with the authors' published
# settings (PACE 500, BARRIER 50 kJ/mol, SIGMA 0.15 rad, bias factor 10, kernels shrinking
# with the effective sample size, compression threshold 1), the dynamics of the metadynamics
# baseline (Langevin 1/ps, 1.5 fs, hydrogen masses 3 amu) from the energy minimum, 4e6 steps,
# a free-energy snapshot every 50,000 steps. Resumable: a run continues from its last snapshot.
# Usage (repository root), one core per run:
#   data/baselines/opes_300K/generate.sh SEED [N_STEPS]     # alanine dipeptide, 30-50 min
#   data/baselines/opes_300K/generate.sh mueller_brown [SEED]   # the Mueller-Brown validation, ~10 min
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
CGFLOW=$(command -v cgflow || echo .venv/bin/cgflow)
if [ "${1:?seed or mueller_brown}" = mueller_brown ]; then
  # one particle on U/kT = 0.1 U_MB at 300 K, CV s = x - y; kernels narrower than the
  # narrowest well along s (standard deviation ~0.05), barrier 15 kT
  exec "$CGFLOW" baseline opes --system mueller_brown \
    --out "data/baselines/opes_300K/mueller_brown_seed${2:-1}.h5" --seed "${2:-1}" \
    --n-steps 4000000 --record-every 100000 --pace 100 \
    --barrier-kJ-per-mol 37.4 --sigma 0.05 --bias-factor 15 \
    --timestep-fs 5 --friction-per-ps 20 --hydrogen-mass-amu 0 \
    --bias-grid 512 --fes-grid 200 --platform CPU --threads 1
fi
exec "$CGFLOW" baseline opes --system alanine_dipeptide \
  --out "data/baselines/opes_300K/run_seed$1.h5" --seed "$1" \
  --n-steps "${2:-4000000}" --record-every 50000 --pace 500 \
  --barrier-kJ-per-mol 50 --sigma 0.15 --bias-factor 10 \
  --timestep-fs 1.5 --friction-per-ps 1.0 --hydrogen-mass-amu 3.0 \
  --bias-grid 256 --fes-grid 90 --platform CPU --threads 1
