#!/usr/bin/env bash
# The peers scripts/gpu_bench.sh compares against, as wheels in scripts/wheels/ (git-ignored) for a GPU
# machine without network: pure Python + Triton packages, installed there with --no-deps --no-index (verl without
# its dependencies: `python -m memops bench --loss verl` loads its two kernel modules from its files).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --no-deps --dest scripts/wheels "liger-kernel" "cut-cross-entropy" "verl==0.9.1"
ls -l scripts/wheels
