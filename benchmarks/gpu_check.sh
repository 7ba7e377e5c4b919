#!/usr/bin/env bash
# The project's one prepared GPU check: the CUDA C++ build, the tests only a card runs (CUDA
# graphs, sync-debug, full sizes, > 2**31 elements; --full: every test, each fused backend's
# grid on the card too), a compute-sanitizer memcheck of each fused backend where the tool
# exists, the loss micro-benchmarks, the training benchmark, the host's time per eager call and
# the static reports, with logs, JSON and plots written to OUTDIR and a summary printed last (the
# static estimate beside the measured times, so the model can be recalibrated).
#
#   bash benchmarks/gpu_check.sh OUTDIR [--full | --sweep]
#
# Where only a few files may come back from the machine (this project's device tool returns
# eight), run it into a scratch folder and send back one archive:
#   bash benchmarks/gpu_check.sh /tmp/gc; rc=$?; tar czf "$OUT/gc.tgz" -C /tmp gc; exit $rc
#
# Installs nothing: it runs with the machine's own python (override with PYTHON=...). Each stage
# has a time cap, so the whole check ends within 7 minutes on an H100 (--full: the full test
# suite and grids, with caps of hours). --sweep, the second call when time is left: the build
# and the configuration sweep (benchmarks/sweep.py) only, within 5.5 minutes; put its sweep.json
# beside the first call's files and `python -m benchmarks.summary DIR` sets the static estimate
# beside the sweep's graph-replayed times. A failing stage is logged and the later stages still
# run; the exit status is nonzero when any stage failed.
set -uo pipefail

if [[ $# -lt 1 || $# -gt 2 || ( $# -eq 2 && $2 != --full && $2 != --sweep ) ]]; then
    echo "usage: bash benchmarks/gpu_check.sh OUTDIR [--full | --sweep]" >&2
    exit 2
fi
OUT=$1
MODE=${2:-}
PY=${PYTHON:-$(command -v python || command -v python3 || echo python)}
# an absolute, writable OUTDIR, or nothing runs (an empty OUT would put the logs in /)
if ! mkdir -p "$OUT" 2>/dev/null || ! OUT=$(cd "$OUT" 2>/dev/null && pwd) || [[ ! -w $OUT ]]; then
    echo "gpu_check.sh: OUTDIR $1 is not a writable directory" >&2
    exit 2
fi
cd "$(dirname "$0")/.." || exit 2

# Without --full the check must end within 7 minutes: every stage gets what is left of TOTAL_S,
# less what the later stages need at least, and the benchmarks stop starting new cases at their
# --budget-s (their cap less the time to start up and to finish the case in flight).
TOTAL_S=400 EXT_MAX=120 EXT_RESERVE=300 TESTS_MAX=120 MEMCHECK_MAX=40 LOSS_MAX=90 TRAIN_MAX=60 STATIC_MAX=90
QUICK=(--quick)
# the tests that only a card runs (on an H100, 46 s; whole files did not end in 120 s: each test
# compiles its own kernels there); --full: all of them
TESTS=(tests/test_cuda_gpu.py tests/test_backends.py tests/test_ops.py
    -k "cuda_gpu or full_size or 2_31 or cuda_graph or sync or fullgraph")
# the static report of the baseline cases (all ten did not end in 90 s on the H100's CPU); --full: all
STATIC_CASES=(--cases 8x19x512x1024-fp32-nchw,8x19x512x1024-bf16-nchw,16x150x512x512-fp32-nchw,16x150x512x512-bf16-nchw)
if [[ $MODE == --full ]]; then
    TOTAL_S=36000 EXT_MAX=1800 TESTS_MAX=3600 MEMCHECK_MAX=600 LOSS_MAX=14400 TRAIN_MAX=3600 STATIC_MAX=1800
    QUICK=()
    TESTS=(tests)
    STATIC_CASES=()
fi
if [[ $MODE == --sweep ]]; then  # 5.5 minutes: the build (if the first call's is gone), then the sweep
    TOTAL_S=330 EXT_RESERVE=150
fi
# nvcc for the card that is here only (the default list builds two architectures)
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null)}
# in the checkout (git-ignored), not in OUTDIR: a second call on a still-held machine gets a new
# OUTDIR but finds the CUDA C++ build of the first
export BLV_KERNELS_CACHE=${BLV_KERNELS_CACHE:-$PWD/build/kernel-cache}
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
# The CUDA C++ kernels build on first use (nvcc, a minute or two on a bare machine): build them
# here, in their own stage and log, so that the tests and benchmarks only load them. Their absence
# (no nvcc on the machine) is reported, not a failure: the CUDA rows are then skipped with the reason.
run_stage cuda-ext "$(cap $EXT_MAX $EXT_RESERVE)" "$PY" -c "import torch; from benchmarks.common import blv_backend_problem; \
print(blv_backend_problem('cuda', torch.device('cuda')) or 'the CUDA C++ backend runs')"
if [[ $MODE == --sweep ]]; then  # kernel_config's choice and CUDA C++ on every case first, then the variants
    SWEEP_CAP=$(cap 300 0)
    # the cap is 30 s at least: a budget of 0 (not negative, which --budget-s refuses) then times nothing
    run_stage sweep "$SWEEP_CAP" "$PY" -m benchmarks.sweep --budget-s $((SWEEP_CAP > 40 ? SWEEP_CAP - 40 : 0)) --out "$OUT"
    echo "stage      outcome             time   log"
    printf '%s\n' "${STAGES[@]}"
    tail -n 12 "$OUT/sweep.log"
    echo "GPU sweep: $([[ $FAILED -eq 0 ]] && echo passed || echo FAILED) (results in $OUT)"
    exit "$FAILED"
fi
run_stage tests "$(cap $TESTS_MAX 180)" "$PY" -m pytest "${TESTS[@]}" --maxfail=20 -q -rs
if command -v compute-sanitizer >/dev/null; then  # out-of-bounds and misaligned accesses of both fused backends
    run_stage memcheck "$(cap $MEMCHECK_MAX 150)" compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" -c "
import torch
from blv_kernels import blv_cross_entropy
for backend in ('triton', 'cuda'):
    for shape, cl in (((2, 19, 13, 17), False), ((2, 150, 6, 7), True), ((37, 1000), False)):
        x = torch.randn(shape, device='cuda', dtype=torch.bfloat16, requires_grad=True)
        if cl:
            x = x.detach().to(memory_format=torch.channels_last).requires_grad_(True)
        t = torch.randint(0, shape[1], shape[:1] + shape[2:], device='cuda')
        (blv_cross_entropy(x, t, class_counts=list(range(1, shape[1] + 1)), backend=backend) * 0.5).backward()
torch.cuda.synchronize()
print('memcheck: no errors')"
else
    STAGES+=("$(printf '%-10s %-18s' memcheck "skipped (no compute-sanitizer)")")
fi
LOSS_CAP=$(cap $LOSS_MAX 90)
run_stage loss "$LOSS_CAP" "$PY" -m benchmarks.loss "${QUICK[@]}" --budget-s $((LOSS_CAP - 30)) --out "$OUT"
TRAIN_CAP=$(cap $TRAIN_MAX 40)
run_stage training "$TRAIN_CAP" "$PY" -m benchmarks.training "${QUICK[@]}" --budget-s $((TRAIN_CAP - 30)) --out "$OUT"
# the host's Python per eager call on this machine's CPU, beside this project's CPU's (benchmarks/RESULTS.md),
# then the whole calls on the card: Triton's launcher (whole call - stubbed) and each call's device operations
run_stage host "$(cap 50 60)" env -u TRITON_INTERPRET bash -c "\
$PY -m benchmarks.host --calls 300 && $PY -m benchmarks.host --calls 300 --device cuda"
# the static estimates (compiled, not run), to set beside the measured times; the JSON written whole
# or not at all (a stage cut by its cap left an empty file, which the summary refused)
run_stage static "$(cap $STATIC_MAX 0)" env -u TRITON_INTERPRET bash -c "\
$PY -m benchmarks.static_report --json ${STATIC_CASES[*]} > '$OUT/static_report.json.partial' \
&& mv '$OUT/static_report.json.partial' '$OUT/static_report.json' && { $PY -m benchmarks.cuda_static_report || true; }"

echo
timeout 30 "$PY" -m benchmarks.summary "$OUT" || FAILED=1
echo "stage      outcome             time   log"
printf '%s\n' "${STAGES[@]}"
echo "GPU check: $([[ $FAILED -eq 0 ]] && echo passed || echo FAILED) (results in $OUT)"
exit "$FAILED"
