"""``python -m memops bench --loss verl``: verl's torch backend as a peer beside memops and the unfused code (the
CPU rows of BENCHMARKS.md), and the loader the GPU script uses where verl's own dependencies are missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("verl")


def test_bench_runs_verls_backend_beside_memops(tmp_path):
    """Every row runs and matches the float64 reference (fp32: 1e-5), verl's CUDA-only backends reported as
    skipped on CPU with the reason."""
    out = tmp_path / "verl.json"
    cmd = [sys.executable, "-m", "memops", "bench", "--loss", "verl", "--tokens", "64", "--hidden", "16"]
    cmd += ["--vocab", "300", "--reps", "1", "--methods", "eager,floor,memops,verl,verl_triton", "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    rows = {r["method"]: r for r in json.loads(out.read_text())["runs"][0]["rows"]}
    for method in ("eager", "memops", "verl"):
        assert rows[method]["status"] == "ok", rows[method]
        for key in ("err_loss", "err_grad_input", "err_grad_weight"):
            assert rows[method][key] <= 1e-5, (method, key, rows[method][key])
    assert rows["floor"]["status"] == "ok"
    assert "CUDA only" in run.stdout + json.dumps(rows.get("verl_triton", {}))


def test_verl_kernels_load_without_verls_dependencies():
    """Where ``import verl`` fails (a GPU machine given verl's wheel with ``--no-deps``: no tensordict, ray, ...),
    ``memops.bench.methods.verl_module`` loads the two kernel modules from verl's files, with its stand-in for
    ``verl.utils.device``; verl's torch backend then computes what the unfused code does."""
    code = """
import sys
sys.modules["tensordict"] = None  # verl's own import now fails, as it does without its dependencies
try:
    import verl  # noqa: F401
    raise SystemExit("verl imported")
except ImportError:
    pass
import torch
from memops.bench.methods import verl_module
f = verl_module("verl.utils.experimental.torch_functional")
k = verl_module("verl.utils.kernel.linear_cross_entropy")
assert sys.modules["verl.utils.device"].get_torch_device() is torch.cuda
x, w = torch.randn(5, 8, dtype=torch.float64), torch.randn(11, 8, dtype=torch.float64)
ids = torch.randint(0, 11, (5,))
logp, ent = f.FusedLinearForPPOFunction.apply(x, w, ids, 1.0, 2)
want = torch.log_softmax((x @ w.T).float(), -1).gather(-1, ids[:, None]).squeeze(-1)
torch.testing.assert_close(logp, want.double() if logp.dtype == torch.float64 else want)
assert callable(k.linear_cross_entropy)
print("loaded")
"""
    env = {k: v for k, v in os.environ.items() if k != "VERL_USE_EXTERNAL_MODULES"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "loaded" in run.stdout, (run.stdout + run.stderr)[-3000:]
