#!/usr/bin/env bash
# The speedup table and the raw points behind it (repository root):
#   data/baselines/speedup/generate.sh
# Campaigns: the three seeds of the default config, each from scratch,
#   cgflow run --configfile config/config.yaml --config seed=S --results DIR     (S = 0, 1, 2)
# with DIR/aldp_laptop/summary.csv kept as campaigns/aldp_laptop_method_seedS_summary.csv.
# Baselines: the plain-MD trajectories (data/baselines/md_300K/generate.sh), scored as
# histograms and as kernel densities, the metadynamics runs
# (data/baselines/metad_300K/generate.sh SEED 4000000, seeds 1-3) and the OPES runs
# (data/baselines/opes_300K/generate.sh SEED, seeds 1-3). Takes about a minute (mostly the MD kernel
# densities' cross-validation).
set -euo pipefail
CGFLOW=$(command -v cgflow || echo .venv/bin/cgflow)
out=data/baselines/speedup
campaigns=()
for s in 0 1 2; do
  campaigns+=(--campaign "campaign=$out/campaigns/aldp_laptop_method_seed${s}_summary.csv")
done
exec "$CGFLOW" baseline speedup "${campaigns[@]}" \
  --md data/baselines/md_300K/merged.h5 \
  --metad data/baselines/metad_300K/run_seed*.h5 \
  --opes data/baselines/opes_300K/run_seed*.h5 \
  --out-dir "$out"
