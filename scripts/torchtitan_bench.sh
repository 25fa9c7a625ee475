#!/usr/bin/env bash
# memops' loss vs torchtitan's own (its default ChunkedLossWrapper of CrossEntropyLoss) in torchtitan's trainer:
# llama3 debug model (D=256, V=2048, 6 layers), 2 ranks over gloo on the CPU, FSDP2 and TP=2, fp32 parameters,
# SEQ tokens x BATCH sequences per rank, STEPS steps, ROUNDS rounds of the two losses alternating (a step's
# time on this shared 2-core host moves by several percent from run to run). Per rank: step losses, seconds per
# forward+backward (the first step left out) and peak resident memory (VmHWM, malloc's mmap threshold at 64 KiB
# so freed blocks go back). Run it in a venv with torch==2.13.0, torchtitan==0.3.0, triton and memops (what
# .ci/run's torchtitan step installs). Writes benchmarks/torchtitan_<parallel>_<loss>_r<round>.rank<r>.json,
# then the loss alone at the TP shape (scripts/tp_loss_parallel_bench.py: benchmarks/torchtitan_tp2_loss_only.json),
# and prints a table.
set -euo pipefail
cd "$(dirname "$0")/.."
SEQ="${SEQ:-2048}" BATCH="${BATCH:-4}" STEPS="${STEPS:-4}" ROUNDS="${ROUNDS:-2}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python tests/torchtitan/harness.py --assets "$work"
for parallel in fsdp2 tp2; do
  case $parallel in
    fsdp2) degree=(--parallelism.data_parallel_shard_degree 2) ;;
    tp2) degree=(--parallelism.tensor_parallel_degree 2) ;;
  esac
  for round in $(seq 1 "$ROUNDS"); do for loss in torchtitan memops; do
    extra=()
    [ "$loss" = memops ] && extra=(--override.imports memops.integrations.torchtitan.memops_cross_entropy)
    (cd "$work" && OMP_NUM_THREADS=1 MALLOC_MMAP_THRESHOLD_=65536 python -m torch.distributed.run \
      --nproc_per_node 2 --master_port $((29500 + RANDOM % 1000)) "$OLDPWD/tests/torchtitan/harness.py" \
      "$OLDPWD/benchmarks/torchtitan_${parallel}_${loss}_r${round}" --module llama3 --config llama3_debugmodel \
      "${degree[@]}" --parallelism.spmd_backend partial_dtensor --training.steps "$STEPS" \
      --training.seq_len "$SEQ" --training.local_batch_size "$BATCH" --training.mixed_precision_param float32 \
      --checkpoint.no-enable --validator.no-enable --debug.seed 0 "${extra[@]}" >"$work/log" 2>&1) ||
      { tail -40 "$work/log"; exit 1; }
  done; done
done
# the loss alone at the TP=2 shape: memops vs PyTorch's loss_parallel (torchtitan's own loss under TP)
OMP_NUM_THREADS=1 python -m torch.distributed.run --nproc_per_node 2 --master_port $((29500 + RANDOM % 1000)) \
  scripts/tp_loss_parallel_bench.py benchmarks/torchtitan_tp2_loss_only.json >"$work/log" 2>&1 ||
  { tail -40 "$work/log"; exit 1; }
python - "$SEQ" "$BATCH" "$ROUNDS" <<'PY'
import json, sys
print(f"seq {sys.argv[1]} x batch {sys.argv[2]} per rank")
print("| parallel | loss | round | step losses (rank 0) | s / step (after the first; rank 0, rank 1) | peak RSS MiB |")
print("|---|---|---|---|---|---|")
for parallel in ("fsdp2", "tp2"):
    for loss in ("torchtitan", "memops"):
        for k in range(1, int(sys.argv[3]) + 1):
            r = [json.load(open(f"benchmarks/torchtitan_{parallel}_{loss}_r{k}.rank{rank}.json")) for rank in (0, 1)]
            secs = [x["step_seconds"][1:] for x in r]
            losses = " ".join(f"{x:.6f}" for x in r[0]["losses"])
            per = ", ".join(f"{sum(s) / len(s):.2f}" for s in secs)
            rss = " / ".join(f"{x['peak_rss_mib']:.0f}" for x in r)
            print(f"| {parallel} | {loss} | {k} | {losses} | {per} | {rss} |")
r = json.load(open("benchmarks/torchtitan_tp2_loss_only.json"))
for k in ("loss_parallel", "memops"):
    print(f"loss alone, TP=2, {r['tokens']} tokens: {k} median {r[k]['median_ms']:.1f} ms, loss {r[k]['loss']:.4f}")
PY
