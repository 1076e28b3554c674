#!/usr/bin/env bash
# The prepared check for a GPU session (H100/H200; torch 2.11 + triton 3.6 there; no network).
# It installs nothing from the network: Liger-Kernel travels as a wheel in wheels/ (see below).
#
#   bash scripts/gpu_check.sh kernels     # kernel tests natively, the launch sweep, the benchmark
#   bash scripts/gpu_check.sh pipeline    # the whole test suite, then the pipeline's GPU preset
#   bash scripts/gpu_check.sh all         # both, one after the other
#
# Results land in $OUT (default ./gpu_out): gpu_check.log (everything), bench.md/.json,
# sweep.md/.json, pytest.log, pipeline.log and report.md; the short table is printed last.
# Each step has its own time limit (seconds): TEST_TIMEOUT 150, SWEEP_TIMEOUT 120,
# BENCH_TIMEOUT 270, SUITE_TIMEOUT 280, PIPELINE_TIMEOUT 280. The benchmark rewrites its table
# after every row, so a step cut short keeps what it measured. BENCH_ARGS narrows the grid.
#
# Liger-Kernel (the benchmark's anchor) as a wheel, made once on a machine with pip:
#   pip download --no-deps -d wheels liger-kernel==0.8.5       # pure Python, any platform
# without it the liger rows say "not installed".
set -uo pipefail
cd "$(dirname "$0")/.."
PART="${1:-all}"
OUT="${OUT:-./gpu_out}"
BENCH_ARGS="${BENCH_ARGS:-}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
: >"$OUT/status.txt"

step() {  # step NAME TIMEOUT command...: run with a time limit, record its exit status
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s) $(date -u +%T)"
  local t0=$SECONDS
  timeout "$limit" "$@"
  local rc=$?
  echo "$name exit status: $rc after $((SECONDS - t0))s"
  echo "$name=$rc" >>"$OUT/status.txt"
}

{
  echo "== gpu_check $PART $(date -u +%FT%TZ) on $(hostname)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1 || echo "no nvidia-smi"
  python3 -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.cuda.is_available())"

  shopt -s nullglob
  wheels=(wheels/liger_kernel-*.whl)
  if ((${#wheels[@]})); then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "${wheels[@]}" \
      && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} \
      || echo "liger wheel install failed: its rows will say 'not installed'"
  else
    echo "no wheels/liger_kernel-*.whl: the liger rows will say 'not installed'"
  fi

  if [ "$PART" = kernels ] || [ "$PART" = all ]; then
    step kernel_tests "${TEST_TIMEOUT:-150}" python3 -m pytest tests/test_kernels.py -q -rs -p no:cacheprovider
    step sweep "${SWEEP_TIMEOUT:-120}" python3 kernels/bench.py --sweep --n 8192 --out "$OUT/sweep.md"
    # shellcheck disable=SC2086
    step bench "${BENCH_TIMEOUT:-270}" python3 kernels/bench.py --out "$OUT/bench.md" $BENCH_ARGS
  fi
  if [ "$PART" = pipeline ] || [ "$PART" = all ]; then
    # the CPU-pinned tests (every stage runs --device cpu in them) beside the GPU pipeline: the
    # machine has 16 cores, the pipeline needs one or two of them
    timeout "${SUITE_TIMEOUT:-280}" python3 -m pytest -q -rs -p no:cacheprovider >"$OUT/pytest.log" 2>&1 &
    suite=$!
    # each line stamped with the seconds since the pipeline started: a run cut short still shows
    # how long each stage took
    step pipeline "${PIPELINE_TIMEOUT:-280}" bash -c "python3 pipeline.py --preset gpu --out /tmp/gpu_run --data /tmp/gpu_run/data 2>&1 | while IFS= read -r l; do printf '%4ds %s\n' \$SECONDS \"\$l\"; done | tee '$OUT/pipeline.log'"
    cp /tmp/gpu_run/report.md "$OUT/report.md" 2>/dev/null
    wait $suite; rc=$?
    echo "suite exit status: $rc"; echo "suite=$rc" >>"$OUT/status.txt"
    tail -n 15 "$OUT/pytest.log"
  fi
} 2>&1 | tee "$LOG"

echo
echo "== short table (full log $LOG)"
[ -f "$OUT/sweep.md" ] && grep -E "default|^\| op" "$OUT/sweep.md"
[ -f "$OUT/bench.md" ] && cat "$OUT/bench.md"
[ -f "$OUT/pipeline.log" ] && grep -E "s === |=== done in|^ *[0-9]+s   [a-z]+ " "$OUT/pipeline.log"
cat "$OUT/status.txt"
# non-zero exit when a step failed
! grep -qv '=0$' "$OUT/status.txt"
