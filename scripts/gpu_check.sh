#!/usr/bin/env bash
# The prepared check for a GPU session (H100/H200; torch 2.11 + triton 3.6 there; no network).
#
#   bash scripts/gpu_check.sh                   # results in ./gpu_out (or $OUT)
#   BENCH_ARGS="--n 8192 --v 50257" bash scripts/gpu_check.sh     # a smaller benchmark grid
#   TEST_TIMEOUT / BENCH_TIMEOUT (seconds, default 240 / 420) bound the two steps; the benchmark
#   rewrites its table after every row, so a run cut short keeps what it measured.
#
# 1. installs Liger-Kernel from wheels/liger_kernel-*.whl if one is there (never the network),
# 2. runs the kernel tests natively on the GPU,
# 3. runs the benchmark, writing $OUT/bench.md and $OUT/bench.json,
# 4. runs the whole pipeline with the GPU preset (GPT-2-small size, bf16, kernels on) into
#    $OUT/pipeline, with each stage's wall time and the results table (PIPELINE_TIMEOUT, default 420;
#    SKIP_PIPELINE=1 skips it).
# The full log is $OUT/gpu_check.log; the short table is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_out}"
BENCH_ARGS="${BENCH_ARGS:-}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1

{
  echo "== gpu_check $(date -u +%FT%TZ) on $(hostname)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "no nvidia-smi"
  python -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.cuda.is_available())"

  echo "== liger-kernel"
  shopt -s nullglob
  wheels=(wheels/liger_kernel-*.whl)
  if ((${#wheels[@]})); then
    python -m pip install --no-index --no-deps "${wheels[@]}" || echo "liger wheel install failed: its rows will say 'not installed'"
  else
    echo "no wheels/liger_kernel-*.whl: the liger rows will say 'not installed'"
  fi

  echo "== tests (native)"
  timeout "${TEST_TIMEOUT:-240}" python -m pytest tests/test_kernels.py -x -q -rs
  rc=$?; echo "tests exit status: $rc"; echo "tests=$rc" >"$OUT/status.txt"

  echo "== benchmark"
  # shellcheck disable=SC2086
  timeout "${BENCH_TIMEOUT:-420}" python kernels/bench.py --out "$OUT/bench.md" $BENCH_ARGS
  rc=$?; echo "bench exit status: $rc"; echo "bench=$rc" >>"$OUT/status.txt"

  if [ -z "${SKIP_PIPELINE:-}" ]; then
    echo "== pipeline (GPU preset)"
    timeout "${PIPELINE_TIMEOUT:-420}" python pipeline.py --preset gpu --out "$OUT/pipeline" --data "$OUT/pipeline/data"
    rc=$?; echo "pipeline exit status: $rc"; echo "pipeline=$rc" >>"$OUT/status.txt"
  fi
} 2>&1 | tee "$LOG"

echo
echo "== short table ($OUT/bench.md; full log $LOG)"
cat "$OUT/bench.md" 2>/dev/null || echo "no benchmark table: see $LOG"
grep -A 12 "^=== done in" "$LOG" 2>/dev/null | head -14
cat "$OUT/pipeline/eval/results.md" 2>/dev/null
cat "$OUT/status.txt" 2>/dev/null
# non-zero exit when the tests or the benchmark failed
! grep -qv '=0$' "$OUT/status.txt" 2>/dev/null
