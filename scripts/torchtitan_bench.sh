#!/usr/bin/env bash
# memops' loss vs torchtitan's own (its default ChunkedLossWrapper of CrossEntropyLoss) in torchtitan's trainer:
# llama3 debug model (D=256, V=2048, 6 layers), 2 ranks over gloo on the CPU, FSDP2 and TP=2, fp32 parameters,
# SEQ tokens x BATCH sequences per rank, STEPS steps. Per rank: step losses, seconds per forward+backward
# (the first step left out) and peak resident memory (VmHWM, malloc's mmap threshold at 64 KiB so freed blocks
# go back). Run it in a venv with torch==2.13.0, torchtitan==0.3.0, triton and memops (what .ci/run's
# torchtitan step installs). Writes benchmarks/torchtitan_<parallel>_<loss>.rank<r>.json and prints a table.
set -euo pipefail
cd "$(dirname "$0")/.."
SEQ="${SEQ:-2048}" BATCH="${BATCH:-4}" STEPS="${STEPS:-3}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python tests/torchtitan/harness.py --assets "$work"
for parallel in fsdp2 tp2; do
  case $parallel in
    fsdp2) degree=(--parallelism.data_parallel_shard_degree 2) ;;
    tp2) degree=(--parallelism.tensor_parallel_degree 2) ;;
  esac
  for loss in torchtitan memops; do
    extra=()
    [ "$loss" = memops ] && extra=(--override.imports memops.integrations.torchtitan.memops_cross_entropy)
    (cd "$work" && OMP_NUM_THREADS=1 MALLOC_MMAP_THRESHOLD_=65536 python -m torch.distributed.run \
      --nproc_per_node 2 --master_port $((29500 + RANDOM % 1000)) "$OLDPWD/tests/torchtitan/harness.py" \
      "$OLDPWD/benchmarks/torchtitan_${parallel}_${loss}" --module llama3 --config llama3_debugmodel \
      "${degree[@]}" --parallelism.spmd_backend partial_dtensor --training.steps "$STEPS" \
      --training.seq_len "$SEQ" --training.local_batch_size "$BATCH" --training.mixed_precision_param float32 \
      --checkpoint.no-enable --validator.no-enable --debug.seed 0 "${extra[@]}" >"$work/log" 2>&1) ||
      { tail -40 "$work/log"; exit 1; }
  done
done
python - "$SEQ" "$BATCH" <<'PY'
import json, sys
print(f"seq {sys.argv[1]} x batch {sys.argv[2]} per rank")
print("| parallel | loss | rank | step losses | s / step (after the first) | peak RSS MiB |")
print("|---|---|---|---|---|---|")
for parallel in ("fsdp2", "tp2"):
    for loss in ("torchtitan", "memops"):
        for rank in (0, 1):
            r = json.load(open(f"benchmarks/torchtitan_{parallel}_{loss}.rank{rank}.json"))
            secs = r["step_seconds"][1:]
            losses = " ".join(f"{x:.6f}" for x in r["losses"])
            print(f"| {parallel} | {loss} | {rank} | {losses} | {sum(secs) / len(secs):.2f} | {r['peak_rss_mib']:.0f} |")
PY
