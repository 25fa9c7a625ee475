#!/usr/bin/env bash
# The benchmark on a CUDA device, memops' torch heads and Triton heads side by side with eager, torch.compile,
# torch_lce (F.linear_cross_entropy), CCE and Liger in each run:
#   1. the issue's target shape: llama3-8b head (D=4096, V=128256), 16384 tokens, bf16, forward + backward;
#   2. gemma2-2b (soft-capped logits), bf16;
#   3. a token sweep of the llama3-8b head, bf16, with plots;
#   4. a GRPO step (bf16), memops vs the unfused code and TRL 1.16's chunked log-prob kernel plus its loss.
# Before them: a correctness check of the Triton heads against the torch heads on the device.
# Writes tables (*.md), JSON and PNG plots (when matplotlib is installed) under $OUT (default ./gpu-bench-out).
# Each run is cut at a time limit (150 + 90 + 110 + 110 s) so the script ends within about 8 minutes.
# Dry run on a CPU (the Triton heads under the interpreter), as the tests do:
#   MEMOPS_BENCH_DEVICE=cpu MEMOPS_BENCH_TOKENS=16 MEMOPS_BENCH_SWEEP=8,16 MEMOPS_BENCH_ARGS="--hidden 8 --vocab 64" \
#   scripts/gpu_bench.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-bench-out}"
DEVICE="${MEMOPS_BENCH_DEVICE:-cuda}"
TOKENS="${MEMOPS_BENCH_TOKENS:-16384}"
PY="${PYTHON:-python}"
SWEEP=()
[ -n "${MEMOPS_BENCH_SWEEP:-}" ] && SWEEP=(--sweep-values "$MEMOPS_BENCH_SWEEP")  # sizes of run 3 (default: N/8 .. N)
read -r -a EXTRA <<< "${MEMOPS_BENCH_ARGS:-}"
if [ "$DEVICE" = cpu ]; then export TRITON_INTERPRET=1; fi  # the Triton heads on CPU tensors: the interpreter
mkdir -p "$OUT"
PLOT=1
"$PY" -c "import matplotlib" 2>/dev/null || PLOT=0
"$PY" - "$DEVICE" > "$OUT/env.txt" 2>&1 <<'EOF'
import sys
import torch
print('torch', torch.__version__, '| cuda', torch.version.cuda)
try:
    import triton; print('triton', triton.__version__)
except ImportError:
    print('triton not installed')
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print('gpu', torch.cuda.get_device_name(0), '|', p.total_memory // 2**20, 'MiB')
# the Triton heads against the torch heads on this device: loss, lse, log-probs and every gradient
import memops
dev = sys.argv[1]
g = torch.Generator().manual_seed(0)
n, d, v = 64, 256, 5000
for dtype in (torch.bfloat16, torch.float32):
    x = torch.randn(n, d, generator=g).to(dev, dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g) / d**0.5).to(dev, dtype).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g).to(dev)
    t[::5] = -100
    out = {}
    for kind in ("torch", "triton"):
        with memops.kernels(kind):
            loss, lse = memops.linear_cross_entropy(x, w, t, label_smoothing=0.1, softcap=30.0, return_lse=True)
            lp, ent = memops.linear_logprobs(x[None], w, t.clamp(min=0)[None], return_entropy=True, temperature=0.7)
            grads = torch.autograd.grad(loss + (lp * 0.3 + ent * 0.1).sum(), (x, w))
        out[kind] = (loss, lse, lp, ent, *grads)
    worst = max(((a.double() - b.double()).abs().max() / (1 + b.double().abs().max())).item()
                for a, b in zip(out["triton"], out["torch"]))
    tol = 2.0**-6 if dtype == torch.bfloat16 else 1e-5
    print(f"triton vs torch heads, {dtype}: max relative difference {worst:.2e} (tolerance {tol:.1e}):",
          "OK" if worst <= tol else "FAIL")
from memops.ops import triton_heads
print('triton launches', dict(triton_heads.LAUNCHES))
EOF
cat "$OUT/env.txt"
status=0
grep -q "FAIL\|Traceback" "$OUT/env.txt" && status=1
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
CE=eager,compile,torch_lce,memops_torch,memops_triton,floor,cce,liger
run "target-llama3-8b-bf16" 150 --preset llama3-8b --dtype bfloat16 --tokens "$TOKENS" --reps 5 --methods "$CE"
run "gemma2-2b-bf16" 90 --preset gemma2-2b --dtype bfloat16 --tokens "$TOKENS" --reps 5 --methods "$CE"
run "sweep-tokens-llama3-8b-bf16" 110 --preset llama3-8b --dtype bfloat16 --tokens "$TOKENS" \
    --sweep tokens "${SWEEP[@]}" --reps 3 --no-check --methods "$CE"
run "grpo-llama3-8b-bf16" 110 --loss grpo --preset llama3-8b --dtype bfloat16 --tokens "$TOKENS" --batch 8 \
    --reps 5 --methods eager,compile,memops_torch,memops_triton,trl
exit $status
