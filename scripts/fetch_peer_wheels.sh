#!/usr/bin/env bash
# The peers scripts/gpu_bench.sh compares against, as wheels in scripts/wheels/ (git-ignored) for a GPU
# machine without network: pure Python + Triton packages, installed there with --no-deps --no-index.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --no-deps --dest scripts/wheels "liger-kernel" "cut-cross-entropy"
ls -l scripts/wheels
