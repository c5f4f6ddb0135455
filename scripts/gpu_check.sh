#!/usr/bin/env bash
# Verify and decide in one GPU run: build, test every CUDA search strategy in its own process, benchmark
# "auto" and every strategy that passed against naive PyTorch, run compute-sanitizer on a tiny search per
# strategy, and write a verdict (OUTDIR/verdict.json, and its summary as the last lines printed).
#   usage: scripts/gpu_check.sh [--dry-run] OUTDIR      (OUTDIR defaults to $OUT, else ./gpu_out)
# --dry-run: on a machine without a GPU, every step runs against the installed build (no compile, CPU
# benchmark on the quick grid) so the script itself is checked end to end.
# Budget: DEADLINE_S (default 330 s) on one H100/H200 with 16 cores, build for sm_90 only included.
set -u
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUTDIR=${1:-${OUT:-gpu_out}}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$(dirname "$0")/.."
ROOT=$(pwd)
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
STRATEGIES="tiled aten filtered tensor_core fused_scan"
SCRIPT_START=$(date +%s)
# each step gets at most what is left of the budget, so the script returns its logs in time
left() { local l=$(( ${DEADLINE_S:-330} - ($(date +%s) - SCRIPT_START) )); [ "$l" -gt "$1" ] && echo "$1" || echo $(( l > 5 ? l : 5 )); }
step() { echo "== $1 ($(( $(date +%s) - SCRIPT_START )) s)"; }

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  nvcc --version 2>/dev/null | tail -1
} > "$OUTDIR/env.txt" 2>&1
cat "$OUTDIR/env.txt"

step build
if [ $DRY -eq 0 ]; then
  # The GPU image sets CXX to a second GCC whose libstdc++ copies crash against the process's own: build with
  # the system compiler, in a build folder per compiler.
  if [ -z "${XMODAL_GPU_CXX:-}" ] && [ -x /usr/bin/g++ ]; then export CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++; fi
  if ! XMODAL_CUDA=ON XMODAL_CUDA_ARCHS=${XMODAL_CUDA_ARCHS:-90} CMAKE_BUILD_PARALLEL_LEVEL=16 \
      timeout $(left 200) $PY -m pip install --no-build-isolation --no-deps -v -C build-dir=build/gpu-check . \
      > "$OUTDIR/build.log" 2>&1; then
    echo "build FAILED"; grep -E "error|Error" "$OUTDIR/build.log" | head -40; exit 1
  fi
fi
(cd /tmp && $PY -m xmodal info) > "$OUTDIR/info.txt" 2>&1; grep -E "CUDA kernels|GPU visible|plan cuda" "$OUTDIR/info.txt"

step "tests (everything but the forced strategies and the demo's training)"
timeout $(left 90) $PY -m pytest -q -p no:cacheprovider tests -rfE --maxfail=20 -k "not via_" \
    --deselect tests/test_encoders.py::test_demo_meets_its_targets > "$OUTDIR/tests.log" 2>&1
echo "exit $?: $(tail -1 "$OUTDIR/tests.log")"

step "tests per strategy, one process each (a fault cannot take the others down)"
passed=""
for s in $STRATEGIES; do
  timeout $(left 35) $PY -m pytest -q -p no:cacheprovider tests/test_topk_search_cuda.py -rfE --maxfail=3 \
      -k "via_$s" > "$OUTDIR/tests_$s.log" 2>&1
  rc=$?
  echo "$s: exit $rc: $(tail -1 "$OUTDIR/tests_$s.log")"
  if [ $rc -eq 0 ]; then passed="$passed,$s"; else grep -E "^(FAILED|ERROR) " "$OUTDIR/tests_$s.log" | head -3; fi
done
passed=${passed#,}
echo "$passed" > "$OUTDIR/strategies_passed.txt"

step "benchmark: auto${passed:+ and $passed} against naive"
if [ $DRY -eq 0 ]; then BENCH="--device cuda --repeats 5"; else BENCH="--device cpu --quick --repeats 1 --no-faiss"; fi
# in a dry run the CUDA-only strategies cannot run: time the ones the CPU has
VARIANTS=$passed
if [ $DRY -eq 1 ]; then VARIANTS=$(echo "$passed" | tr ',' '\n' | grep -E '^(tiled|aten)$' | paste -sd, -); fi
(cd /tmp && timeout $(left 150) $PY -m xmodal bench search $BENCH ${VARIANTS:+--variants $VARIANTS} \
    --json "$OUTDIR/bench_search.json" --markdown "$OUTDIR/bench_search.md") > "$OUTDIR/bench.log" 2>&1
echo "exit $?: $(grep -c '' "$OUTDIR/bench.log") lines of output"

step "compute-sanitizer: a tiny search per strategy"
if [ $DRY -eq 0 ] && command -v compute-sanitizer > /dev/null; then
  for s in $STRATEGIES; do
    timeout $(left 20) compute-sanitizer --tool memcheck --print-limit 10 $PY "$ROOT/scripts/tiny_search.py" "$s" \
        > "$OUTDIR/sanitizer_$s.log" 2>&1
    echo "$s: $(grep -E 'ERROR SUMMARY' "$OUTDIR/sanitizer_$s.log" | tail -1)"
  done
else
  for s in $STRATEGIES; do
    $PY "$ROOT/scripts/tiny_search.py" "$s" > "$OUTDIR/sanitizer_$s.log" 2>&1
    echo "$s (no sanitizer): $(tail -1 "$OUTDIR/sanitizer_$s.log")"
  done
fi

step verdict
$PY "$ROOT/scripts/gpu_verdict.py" "$OUTDIR"
