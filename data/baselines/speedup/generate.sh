#!/usr/bin/env bash
# The speedup table of issue 6 and the raw points behind it (repository root):
#   data/baselines/speedup/generate.sh
# Needs the finished campaigns results/aldp_laptop (make run), results/aldp_laptop_seed1
# (make run SNAKEMAKE_ARGS="--config seed=1 campaign=aldp_laptop_seed1") and results/aldp_grid
# (make run SNAKEMAKE_ARGS="--configfile config/aldp_grid.yaml"), the plain-MD trajectories
# (data/baselines/md_300K/generate.sh) and the metadynamics runs
# (data/baselines/metad_300K/generate.sh SEED N_STEPS). Copies the campaigns' summary.csv next
# to the table, so every row can be traced to its points.
set -euo pipefail
CGFLOW=$(command -v cgflow || echo .venv/bin/cgflow)
out=data/baselines/speedup
mkdir -p "$out/campaigns"
cp results/aldp_laptop/summary.csv "$out/campaigns/aldp_laptop_summary.csv"
cp results/aldp_laptop_seed1/summary.csv "$out/campaigns/aldp_laptop_seed1_summary.csv"
cp results/aldp_grid/summary.csv "$out/campaigns/aldp_grid_summary.csv"
exec "$CGFLOW" baseline speedup \
  --campaign "campaign=$out/campaigns/aldp_laptop_summary.csv" \
  --campaign "campaign (seed 1)=$out/campaigns/aldp_laptop_seed1_summary.csv" \
  --campaign "grid=$out/campaigns/aldp_grid_summary.csv" \
  --md data/baselines/md_300K/merged.h5 \
  --metad data/baselines/metad_300K/run_seed*.h5 \
  --out-dir "$out"
