#!/usr/bin/env bash
# Well-tempered metadynamics baseline for alanine dipeptide (issue 6): openmm.app.Metadynamics
# on phi/psi with the published settings (Gaussian width 0.35 rad, initial height 1.2 kJ/mol,
# bias factor 8, a Gaussian every 500 steps), Langevin 1/ps, 1.5 fs, hydrogen masses 3 amu,
# from the energy minimum, one run per seed. Resumable: a run continues from its last snapshot
# (every 25,000 steps). Usage (repository root), one core per run:
#   data/baselines/metad_300K/generate.sh SEED [N_STEPS]      # default 2,000,000 steps (3 ns)
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
CGFLOW=$(command -v cgflow || echo .venv/bin/cgflow)
exec "$CGFLOW" baseline metad \
  --out "data/baselines/metad_300K/run_seed${1:?seed}.h5" --seed "$1" \
  --n-steps "${2:-2000000}" --record-every 25000 \
  --sigma-rad 0.35 --height-kJ-per-mol 1.2 --bias-factor 8 --deposit-every 500 \
  --timestep-fs 1.5 --friction-per-ps 1.0 --hydrogen-mass-amu 3.0 --grid-width 90 \
  --platform CPU --threads 1
