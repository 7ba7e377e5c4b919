#!/usr/bin/env bash
# The project's one prepared GPU check: the test suite, the loss micro-benchmarks and the
# training benchmark, with logs, JSON and plots written to OUTDIR and a summary printed last.
#
#   bash benchmarks/gpu_check.sh OUTDIR [--full]
#
# Installs nothing: it runs with the machine's own python (override with PYTHON=...). Each stage
# has a time cap, so the whole check ends within 6 minutes on an H100 (--full: the full grids,
# with caps of hours). A failing stage is logged and the later stages still run; the exit status
# is nonzero when any stage failed.
set -uo pipefail

if [[ $# -lt 1 || $# -gt 2 || ( $# -eq 2 && $2 != --full ) ]]; then
    echo "usage: bash benchmarks/gpu_check.sh OUTDIR [--full]" >&2
    exit 2
fi
OUT=$1
FULL=${2:-}
PY=${PYTHON:-$(command -v python || command -v python3 || echo python)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 2

# Without --full the check must end within 6 minutes: every stage gets what is left of TOTAL_S,
# less what the later stages need at least, and the benchmarks stop starting new cases at their
# --budget-s (their cap less the time to start up and to finish the case in flight).
TOTAL_S=340 EXT_MAX=150 TESTS_MAX=140 LOSS_MAX=120 TRAIN_MAX=75
QUICK=(--quick)
if [[ $FULL == --full ]]; then
    TOTAL_S=36000 EXT_MAX=1800 TESTS_MAX=3600 LOSS_MAX=14400 TRAIN_MAX=3600
    QUICK=()
fi
T0=$SECONDS

# cap MAX_S RESERVE_S: MAX_S, or less when fewer than MAX_S + RESERVE_S seconds are left (30 at least)
cap() {
    local left=$((TOTAL_S - (SECONDS - T0) - $2))
    local chosen=$(($1 < left ? $1 : left))
    echo $((chosen > 30 ? chosen : 30))
}

STAGES=()
FAILED=0

# run_stage NAME CAP_S COMMAND...: run with a time cap, log to OUT/NAME.log, remember the outcome.
run_stage() {
    local name=$1 cap=$2
    shift 2
    local start=$SECONDS rc
    echo "== $name (cap ${cap} s): $*"
    timeout --kill-after=10 "$cap" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    local outcome=ok
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then
        outcome="timed out"
    elif [[ $rc -ne 0 ]]; then
        outcome="failed (exit $rc)"
    fi
    if [[ $outcome == "timed out" ]]; then
        # A first-use build of the CUDA extension killed mid-way leaves torch's lock file behind,
        # and every later load would wait on it until its stage's cap: the builder is dead, remove it.
        find "${TORCH_EXTENSIONS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/torch_extensions}" -maxdepth 3 \
            -path '*blv_kernels_cuda*' -name lock -delete 2>/dev/null
    fi
    if [[ $outcome != ok ]]; then
        FAILED=1
        echo "-- $name $outcome; last lines of $OUT/$name.log:"
        tail -n 15 "$OUT/$name.log"
    fi
    STAGES+=("$(printf '%-10s %-18s %5d s   %s' "$name" "$outcome" $((SECONDS - start)) "$OUT/$name.log")")
}

run_stage env 15 bash -c "nvidia-smi; $PY -c 'import sys, torch, triton; print(sys.version); \
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__); \
print(torch.cuda.get_device_name())'; git log -1 --format='commit %H %cd'; git status --short"
# The CUDA C++ backend builds on first use (minutes of nvcc on a bare machine): build it here, in
# its own stage and log, so that the tests and benchmarks only load it. Its absence is no failure.
run_stage cuda-ext "$(cap $EXT_MAX 200)" "$PY" -c "import torch; from benchmarks.common import blv_backend_problem; \
print(blv_backend_problem('cuda', torch.device('cuda')) or 'the CUDA C++ backend runs')"
run_stage tests "$(cap $TESTS_MAX 130)" "$PY" -m pytest tests -x -q
LOSS_CAP=$(cap $LOSS_MAX 60)
run_stage loss "$LOSS_CAP" "$PY" -m benchmarks.loss "${QUICK[@]}" --budget-s $((LOSS_CAP - 30)) --out "$OUT"
TRAIN_CAP=$(cap $TRAIN_MAX 10)
run_stage training "$TRAIN_CAP" "$PY" -m benchmarks.training "${QUICK[@]}" --budget-s $((TRAIN_CAP - 30)) --out "$OUT"

echo
timeout 30 "$PY" -m benchmarks.summary "$OUT" || FAILED=1
echo "stage      outcome             time   log"
printf '%s\n' "${STAGES[@]}"
echo "GPU check: $([[ $FAILED -eq 0 ]] && echo passed || echo FAILED) (results in $OUT)"
exit "$FAILED"
