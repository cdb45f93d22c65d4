#!/usr/bin/env bash
# GPU check: on a machine with a CUDA device, in at most about 8 minutes, run the gpu-marked
# tests, the energy and flow-training benchmarks on the device, and two shrunk iterations of
# config/aldp_paper.yaml with the training energies on the device; print one line per check and
# the projected time of a full paper iteration. Without a CUDA device it says so and exits 0.
#
#   bash benchmarks/gpu_check.sh [--wheels DIR] [--python PY]
#
# --wheels DIR: install cgflow's dependencies from the wheels in DIR first, without network
# (a GPU node often has only Python and torch). Make DIR on a machine with network and the
# node's Python version and platform (README, "Benchmarks"):
#   pip wheel -w DIR "openmm[cuda12]" openmmtools mdtraj snakemake snakemake-executor-plugin-slurm \
#       h5py pandas pyyaml matplotlib scipy threadpoolctl
#   pip download --no-deps -d DIR zuko        # zuko without its torch
# Each check has its own time limit; a check that fails or times out is reported and the others
# still run. The exit status is the number of failed checks (0: all passed or no device).
set -u
cd "$(dirname "$0")/.."
PY=python3
WHEELS=""
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) WHEELS="$2"; shift 2 ;;
        --python) PY="$2"; shift 2 ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "gpu_check: unknown option $1" >&2; exit 2 ;;
    esac
done

if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "gpu_check: $PY cannot import torch; install torch (with CUDA) first" >&2
    exit 2
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible to torch ($("$PY" -c 'import torch; print(torch.__version__)')); nothing to check"
    exit 0
fi
"$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'gpu_check: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}')"

if [ -n "$WHEELS" ]; then
    if [ ! -d "$WHEELS" ]; then echo "gpu_check: --wheels $WHEELS is not a folder" >&2; exit 2; fi
    echo "gpu_check: installing from $WHEELS (no network)"
    DEPS="openmmtools mdtraj zuko snakemake h5py pandas pyyaml matplotlib scipy threadpoolctl"
    # openmm's CUDA plugin with its CUDA libraries, or (wheels without them) the plugin alone,
    # using the CUDA libraries the node's torch brings
    "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" "openmm[cuda12]" $DEPS \
        || { "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" openmm $DEPS \
            && "$PY" -m pip install --quiet --no-index --no-deps --find-links "$WHEELS" \
                openmm-cuda-12; } \
        || { echo "gpu_check: installing from $WHEELS failed" >&2; exit 2; }
    "$PY" -m pip install --quiet --no-index --no-deps --no-build-isolation -e . \
        || { echo "gpu_check: installing cgflow failed" >&2; exit 2; }
fi

OUT=$(mktemp -d)
FAILED=0
START=$(date +%s)
# check NAME LIMIT_S SUMMARY_REGEX CMD...: run CMD with a time limit, keep its output in $OUT,
# print the lines matching SUMMARY_REGEX (the ratio lines) and the status
check() {
    local name=$1 limit=$2 pattern=$3
    shift 3
    local t0=$(date +%s)
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$? dt=$(( $(date +%s) - t0 ))
    grep -E "$pattern" "$OUT/$name.log" | sed "s/^/  [$name] /"
    if [ $rc -eq 0 ]; then
        echo "gpu_check: $name passed (${dt} s)"
    else
        [ $rc -eq 124 ] && why="timed out after ${limit} s" || why="exit status $rc"
        echo "gpu_check: $name FAILED ($why; log $OUT/$name.log)"
        tail -n 5 "$OUT/$name.log" | sed "s/^/  [$name] /"
        FAILED=$((FAILED + 1))
    fi
}

check gpu_tests 90 "passed|failed|skipped" "$PY" -m pytest -q -m gpu -p no:cacheprovider tests
check energy 120 "goal|float32 cuda|OpenMM CUDA" \
    "$PY" benchmarks/energy_throughput.py --seconds 1 --rounds 3
check flow_training 90 "original|batch 1024|batch 256, 6x128" \
    "$PY" benchmarks/flow_training.py --device cuda --steps 3
check paper_iteration 180 "projected|shrunk campaign" \
    "$PY" benchmarks/paper_iteration.py --device cuda --shrink 10
echo "gpu_check: $FAILED failed check(s), $(( $(date +%s) - START )) s; logs in $OUT"
exit $FAILED
