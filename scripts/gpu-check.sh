#!/usr/bin/env bash
# The GPU check, one script for a machine with one CUDA GPU. It writes everything under
# reports/gpu/:
#   facts.txt          date (UTC), GPU model, driver, torch and its CUDA, commit
#   steps.txt          each step's exit status and seconds
#   pytest-cuda.log    the CUDA test subset (tests that skip without a CUDA device)
#   torch-cuda.json    bnspec check torch  --device cuda (every dtype: the default contract)
#   bnspec-cuda.json   bnspec check bnspec --device cuda (the reference on CUDA)
#   torch-sync-cuda.json, bnspec-sync-cuda.json   the synced check, world size 1, NCCL
#   results.json ...   bnspec report --device cuda (the conformance and timing report)
#   *.log              what each step printed
#
# Time: every step has a limit (below) and together they stay under 8 minutes once the
# environment is installed; a step that runs out is killed, recorded, and the next runs.
# PROFILE (default quick: 6 examples per property, all rank families, all dtypes)
# is the checks' hypothesis profile; PROFILE=ci runs 25 and needs more time than this.
#
# Environment: its own virtual environment, made the way `make setup` makes .venv, in
# VENV (default .venv-gpu, so a CPU-only .venv beside it is neither used nor changed).
# pip takes torch from its configured index; if that gives a build without CUDA, the
# script stops and says so (point pip at a CUDA build with pip's own settings, e.g.
# PIP_EXTRA_INDEX_URL, and run it again).
#
# Exit status: 0 when every step exited 0; 1 otherwise (steps.txt says which: a check's
# exit 1 is a "does not conform" verdict, 2 an unusable target or option, 124/137 the
# step's time limit); 2 when the environment is unusable (no GPU, torch without CUDA).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=reports/gpu
VENV=${VENV:-.venv-gpu}
PROFILE=${PROFILE:-quick}
PY="$VENV/bin/python"
BNSPEC="$VENV/bin/bnspec"

if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu-check: nvidia-smi not found: this script needs a machine with a CUDA GPU" >&2
    exit 2
fi
mkdir -p "$OUT"
make setup VENV="$VENV"
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu-check: torch in $VENV cannot use CUDA ($("$PY" -c 'import torch; print(torch.__version__)')):" \
         "install a CUDA build of torch there and run again" >&2
    exit 2
fi

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "gpu: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)"
    echo "driver: $(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -n 1)"
    echo "gpus: $(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)"
    echo "torch: $("$PY" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "profile: $PROFILE"
} > "$OUT/facts.txt"
: > "$OUT/steps.txt"

failed=()
# step NAME SECONDS COMMAND...: run COMMAND with a time limit, its output to $OUT/NAME.log.
step() {
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS status=0
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1 || status=$?
    echo "$name: exit $status after $((SECONDS - start)) s (limit $limit s)" | tee -a "$OUT/steps.txt"
    if [ "$status" -ne 0 ]; then
        failed+=("$name")
    fi
}

# Limits add up to 450 s (7.5 minutes).
step pytest-cuda 70 "$PY" -m pytest tests -k cuda -p no:cacheprovider -q -rs
step torch-cuda 110 "$BNSPEC" check torch --device cuda --profile "$PROFILE" --json "$OUT/torch-cuda.json"
step bnspec-cuda 110 "$BNSPEC" check bnspec --device cuda --profile "$PROFILE" --json "$OUT/bnspec-cuda.json"
step torch-sync-cuda 40 "$BNSPEC" check --world-size 1 torch-sync --device cuda --profile "$PROFILE" \
    --json "$OUT/torch-sync-cuda.json"
step bnspec-sync-cuda 40 "$BNSPEC" check --world-size 1 bnspec-sync --device cuda --profile "$PROFILE" \
    --json "$OUT/bnspec-sync-cuda.json"
# The report checks the two again (quick) and times them on the GPU.
step report-cuda 80 "$BNSPEC" report --candidates torch,bnspec --device cuda --profile quick --out "$OUT"

if [ "${#failed[@]}" -gt 0 ]; then
    echo "gpu-check: not every step exited 0: ${failed[*]} (see $OUT/steps.txt and the logs)" >&2
    exit 1
fi
echo "gpu-check: every step exited 0; results in $OUT"
