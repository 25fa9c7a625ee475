#!/usr/bin/env bash
# Everything a first GPU run must answer, most important first, in under 5 minutes; every result printed and
# saved as soon as it is measured, all of it packed (again after each step) into one archive:
# $OUT/gpu-bench.tar.gz (OUT defaults to ./gpu-bench-out).
#   0. peers (liger-kernel, cut-cross-entropy: pure Python + Triton) installed from wheels carried in the tree,
#      --no-deps --no-index, when scripts/wheels/*.whl exist (scripts/fetch_peer_wheels.sh puts them there);
#   1. python -m memops doctor: versions, GPU, kernel choice, chunk plan, every family (class-weighted CE too) against float64 on the
#      device (torch and Triton heads), the weight-gradient path, CUDA-graph captures of a cross-entropy and
#      a GRPO step replayed on new data, a torch.compile(mode="reduce-overhead") training step, batch-invariant
#      mode (a row alone bitwise equal to the row inside batches of other sizes), a speed probe;
#   2. the target step: llama3-8b head (D=4096, V=128256), 16384 tokens, bf16, forward + backward:
#      memops (Triton and torch heads, and sync-free) vs the three matmuls alone and torch.compile, then
#      eager, CCE, Liger
#      (no float64 reference at this size: run 3 checks errors);
#   3. errors against float64 at a small shape (N=1024, D=1024, V=32000, bf16), every method (memops in both
#      precisions: the default and precision="accurate", beside torch's F.linear_cross_entropy);
#   4. a GRPO step (bf16; memops default and sync-free) vs the unfused code and TRL's chunked log-prob kernel,
#      when TRL is installed;
#   5. gemma2-2b (soft-capped logits), bf16;
#   6. the fixed cost per call (--preset overhead);
#   7. multi-token prediction (3 depths, bf16): one memops call vs one per depth vs unfused;
#   7b. verl's fused log-prob head at verl's test shapes (1937x3584x152064, 8192x4096x102400; bf16): memops vs
#      verl's triton, liger and torch backends;
#   8. on a box with two or more GPUs (or MEMOPS_BENCH_TP=N): vocabulary-parallel CE and log-probs over N ranks
#      (NCCL), memops (replicated and sequence-parallel hidden states) vs gathered logits vs one GPU.
# Each step has its own time limit and the script stops starting steps at its deadline (MEMOPS_BENCH_BUDGET,
# default 290 s).  Inputs are drawn on the device from seeded generators.
# Dry run on a CPU (the Triton heads under the interpreter), as the tests do:
#   MEMOPS_BENCH_DEVICE=cpu MEMOPS_BENCH_TOKENS=16 MEMOPS_BENCH_SMALL="--tokens 16 --hidden 8 --vocab 64" \
#   MEMOPS_BENCH_ARGS="--hidden 8 --vocab 64" scripts/gpu_bench.sh
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
OUT="${OUT:-gpu-bench-out}"
DEVICE="${MEMOPS_BENCH_DEVICE:-cuda}"
TOKENS="${MEMOPS_BENCH_TOKENS:-16384}"
BUDGET="${MEMOPS_BENCH_BUDGET:-290}"
PY="${PYTHON:-python3}"
read -r -a EXTRA <<< "${MEMOPS_BENCH_ARGS:-}"
read -r -a SMALL <<< "${MEMOPS_BENCH_SMALL:---tokens 1024 --hidden 1024 --vocab 32000}"
if [ "$DEVICE" = cpu ]; then export TRITON_INTERPRET=1; fi  # the Triton heads on CPU tensors: the interpreter
mkdir -p "$OUT"
WORK="$(mktemp -d)/gpu-bench"  # the files; $OUT gets one archive of them
mkdir -p "$WORK"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$WORK/../inductor-cache}"  # shared by the steps
status=0
pack() { tar czf "$OUT/gpu-bench.tar.gz.tmp" -C "$(dirname "$WORK")" gpu-bench && mv "$OUT/gpu-bench.tar.gz.tmp" "$OUT/gpu-bench.tar.gz"; }
left() { echo $((BUDGET - (SECONDS - START))); }
step() {  # name, time limit (s), command...; cut at the limit or the deadline, whichever comes first
  local name=$1 limit=$2; shift 2
  local remaining
  remaining=$(left)
  if [ "$remaining" -lt 15 ]; then echo "!! $name not started: the ${BUDGET}s deadline"; status=1; return; fi
  [ "$limit" -gt "$remaining" ] && limit=$remaining
  echo "== $name (limit ${limit}s, $((SECONDS - START))s elapsed): $*"
  timeout --kill-after=5 "$limit" "$@" > >(tee "$WORK/$name.md") 2> "$WORK/$name.log"
  local rc=$?
  if [ "$rc" -ne 0 ]; then echo "!! $name exited with $rc"; tail -5 "$WORK/$name.log"; status=1; fi
  pack
}
{
  echo "date $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -4 || true
} > "$WORK/machine.txt"
cat "$WORK/machine.txt"
WHEELS=(scripts/wheels/*.whl)
if [ -e "${WHEELS[0]}" ]; then
  timeout 60 "$PY" -m pip install --no-deps --no-index --quiet "${WHEELS[@]}" > "$WORK/wheels.log" 2>&1 \
    || echo "!! installing ${WHEELS[*]} failed (see wheels.log)"
fi
pack
BENCH=("$PY" -m memops bench --device "$DEVICE")
step doctor 75 "$PY" -m memops doctor --device "$DEVICE" --seconds 15 "${EXTRA[@]}" --tokens "$TOKENS" \
    --json "$WORK/doctor.json"
step target-llama3-8b-bf16 80 "${BENCH[@]}" --preset llama3-8b --dtype bfloat16 --tokens "$TOKENS" --reps 5 --no-check \
    --methods memops_triton,floor,compile,memops_torch,memops_sync_free,memops_accurate,eager,cce,liger "${EXTRA[@]}" \
    --json "$WORK/target-llama3-8b-bf16.json"
step errors-small-bf16 40 "${BENCH[@]}" --dtype bfloat16 --reps 2 "${SMALL[@]}" \
    --methods eager,compile,memops_torch,memops_triton,memops_accurate,torch_lce,cce,liger \
    --json "$WORK/errors-small-bf16.json"
step grpo-llama3-8b-bf16 50 "${BENCH[@]}" --loss grpo --preset llama3-8b --dtype bfloat16 --tokens "$TOKENS" --batch 8 \
    --reps 3 --no-check --methods memops_triton,memops_torch,memops_sync_free,compile,eager,trl "${EXTRA[@]}" \
    --json "$WORK/grpo-llama3-8b-bf16.json"
step gemma2-2b-bf16 35 "${BENCH[@]}" --preset gemma2-2b --dtype bfloat16 --tokens "$TOKENS" --reps 3 --no-check \
    --methods memops_triton,memops_torch,compile,floor "${EXTRA[@]}" --json "$WORK/gemma2-2b-bf16.json"
step overhead 20 "${BENCH[@]}" --preset overhead --json "$WORK/overhead.json"
# log-probs as the sampler drew them: a top-p-sized sampling mask (1000 kept ids per token) on Qwen's vocabulary,
# and what batch-invariant mode costs there
step sampling-mask-qwen-bf16 40 "${BENCH[@]}" --loss logprobs --kept 1000 --dtype bfloat16 --tokens "$TOKENS" \
    --hidden 3584 --vocab 151936 --batch 8 --reps 2 --no-check --methods memops,memops_batch_invariant,compile,eager \
    "${EXTRA[@]}" \
    --json "$WORK/sampling-mask-qwen-bf16.json"
# multi-token prediction: 3 depths against the llama3-8b head, one memops call vs one call per depth vs unfused
step mtp3-llama3-8b-bf16 40 "${BENCH[@]}" --loss mtp --depths 3 --preset llama3-8b --dtype bfloat16 --tokens $((TOKENS / 4)) \
    --reps 2 --no-check --methods memops,memops_per_depth,compile,eager "${EXTRA[@]}" \
    --json "$WORK/mtp3-llama3-8b-bf16.json"
# verl's fused log-prob head (log-probs + entropy, bf16) at verl's own test shapes: memops vs verl's triton, liger
# and torch backends (verl's wheel from scripts/wheels, loaded without its dependencies)
for shape in "1937 3584 152064" "8192 4096 102400"; do
  read -r n d v <<< "$shape"
  step "verl-${n}x${d}x${v}-bf16" 35 "${BENCH[@]}" --loss verl --dtype bfloat16 --tokens $((TOKENS < n ? TOKENS : n)) \
      --hidden "$d" --vocab "$v" --reps 3 --no-check --methods memops,verl_triton,verl_liger,verl,compile,floor \
      "${EXTRA[@]}" --json "$WORK/verl-${n}x${d}x${v}-bf16.json"
done
GPUS=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU" || true)
TP="${MEMOPS_BENCH_TP:-$([ "${GPUS:-0}" -ge 2 ] && echo 2 || echo 0)}"
if [ "$TP" -ge 2 ]; then
  for loss in cross_entropy logprobs; do
    step "tp$TP-$loss-bf16" 40 "$PY" -m memops bench --tp "$TP" --loss "$loss" --dtype bfloat16 --tokens "$TOKENS" \
        --hidden 4096 --vocab 128256 --reps 3 "${EXTRA[@]}" --json "$WORK/tp$TP-$loss-bf16.json"
  done
fi
echo "done in $((SECONDS - START))s: $OUT/gpu-bench.tar.gz"
pack
exit $status
