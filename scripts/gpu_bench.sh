#!/usr/bin/env bash
# The benchmark on a CUDA device: every model-head preset in bf16, a token sweep with plots, and a GRPO
# step (memops.linear_grpo_loss, bf16). Writes tables (*.md), JSON and PNG plots (when matplotlib is
# installed) under $OUT (default ./gpu-bench-out). The 4 cross-entropy runs are cut at 110 s each and
# the GRPO run at 90 s, so the script ends within 9 minutes 20 s.
# Dry run on a CPU: MEMOPS_BENCH_DEVICE=cpu MEMOPS_BENCH_TOKENS=16 MEMOPS_BENCH_ARGS="--hidden 8 --vocab 64"
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-bench-out}"
DEVICE="${MEMOPS_BENCH_DEVICE:-cuda}"
TOKENS="${MEMOPS_BENCH_TOKENS:-8192}"
PY="${PYTHON:-python}"
read -r -a EXTRA <<< "${MEMOPS_BENCH_ARGS:-}"
mkdir -p "$OUT"
PLOT=1
"$PY" -c "import matplotlib" 2>/dev/null || PLOT=0
"$PY" -c "
import torch
print('torch', torch.__version__, '| cuda', torch.version.cuda)
try:
    import triton; print('triton', triton.__version__)
except ImportError:
    print('triton not installed')
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print('gpu', torch.cuda.get_device_name(0), '|', p.total_memory // 2**20, 'MiB')
" > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
status=0
run() {  # name, time limit (s), then bench arguments; each run is bounded so one hang cannot eat the budget
  local name=$1 limit=$2; shift 2
  local plot=()
  [ "$PLOT" = 1 ] && plot=(--plot "$OUT/$name.png")
  echo "== $name: python -m memops bench --device $DEVICE $* ${EXTRA[*]}"
  timeout "$limit" "$PY" -m memops bench --device "$DEVICE" "$@" "${EXTRA[@]}" --json "$OUT/$name.json" \
      "${plot[@]}" > "$OUT/$name.md" 2> "$OUT/$name.log"
  local rc=$?
  cat "$OUT/$name.md"
  if [ "$rc" -ne 0 ]; then echo "!! $name exited with $rc"; tail -5 "$OUT/$name.log"; status=1; fi
}
for preset in llama3-8b gemma2-2b qwen2.5-7b; do
  run "$preset-bf16" 110 --preset "$preset" --dtype bfloat16 --tokens "$TOKENS" --reps 5
done
run "sweep-tokens-llama3-8b-bf16" 110 --preset llama3-8b --dtype bfloat16 --tokens "$((TOKENS * 2))" \
    --sweep tokens --reps 3 --no-check --methods eager,compile,torch_lce,memops,floor,cce,liger
run "grpo-llama3-8b-bf16" 90 --loss grpo --preset llama3-8b --dtype bfloat16 --tokens "$TOKENS" --batch 8 \
    --reps 5 --methods eager,compile,memops
exit $status
