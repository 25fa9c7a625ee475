"""Every front end compiled as the first memops call of a fresh process (``tests/first_call.py``), on both
registration paths (``memops/ops/torch_private.py``): a warm cache in this test process can hide nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("first_call.py")
RUNS = {  # id -> (shape mode of the first compile, MEMOPS_TORCH_PRIVATE)
    "static": ("static", "1"),
    "dynamic": ("dynamic", "1"),
    "public-path-static": ("static", "0"),
}


def _run(mode: str, private: str) -> dict:
    env = {**os.environ, "MEMOPS_TORCH_PRIVATE": private, "PYTHONPATH": str(SCRIPT.parents[1])}
    done = subprocess.run([sys.executable, str(SCRIPT), mode], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def results():
    with ThreadPoolExecutor(2) as pool:  # two processes at a time: CI has two cores
        futures = {k: pool.submit(_run, *v) for k, v in RUNS.items()}
        return {k: f.result() for k, f in futures.items()}


@pytest.mark.parametrize("run", list(RUNS))
def test_every_front_end_compiles_fullgraph_as_the_first_call_and_after_eager(results, run):
    got = results[run]
    assert len(got) >= 16, "every front end has a case in tests/first_call.py"
    failed = {k: v for k, v in got.items() if v != "ok"}
    assert not failed, "\n\n".join(f"{k}: {v}" for k, v in failed.items())


def test_the_script_covers_every_public_front_end():
    """A front end added to memops' public API gets a case in tests/first_call.py."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import first_call
    finally:
        sys.path.pop(0)
    cases = " ".join(first_call.CASES)
    front_ends = [
        "linear_cross_entropy",
        "LinearCrossEntropy_module",
        "linear_loss",
        "linear_logprobs",
        "linear_logprobs_sampler",  # a sampling mask and a temperature per sequence
        "linear_grpo_loss_sampler",
        "linear_grpo_loss_beta0",  # TRL's default beta
        "linear_grpo_loss_kl",
        "linear_distillation_loss",
        "linear_mtp_cross_entropy",
        "nn_functional_linear_cross_entropy",
        "nn_LinearCrossEntropyLoss",
        "vocab_parallel_cross_entropy",
        "vocab_parallel_logprobs",
        "vocab_parallel_grpo_loss",
        "vocab_parallel_distillation_loss",
        "vocab_parallel_mtp_cross_entropy",
    ]
    assert [f for f in front_ends if f not in cases] == []


def test_the_public_path_names_the_op_when_torch_func_is_refused():
    """On the public path (``MEMOPS_TORCH_PRIVATE=0``), ``torch.func.grad`` / ``jvp`` of a front end raise
    memops' refusal naming the op, and plain autograd is exact."""
    code = textwrap.dedent(
        """
        import torch, memops
        from memops.ops import torch_private
        assert torch_private.PATH == "public", torch_private.PATH
        x, w = torch.randn(6, 4, dtype=torch.float64), torch.randn(9, 4, dtype=torch.float64)
        y = torch.randint(0, 9, (6,))
        f = lambda x: memops.linear_cross_entropy(x, w, y)
        for what, call in (("grad", lambda: torch.func.grad(f)(x)),
                           ("jvp", lambda: torch.func.jvp(f, (x,), (torch.ones_like(x),)))):
            try:
                call()
            except torch_private.FunctorchUnavailable as e:
                assert "memops::linear_ce" in str(e), e
                print(what, "refused")
        xr = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(f(xr), xr)
        xd = x.clone().requires_grad_(True)
        (want,) = torch.autograd.grad(torch.nn.functional.cross_entropy(xd @ w.T, y), xd)
        torch.testing.assert_close(g, want, rtol=1e-12, atol=1e-12)
        print("autograd exact")
        """
    )
    env = {**os.environ, "MEMOPS_TORCH_PRIVATE": "0", "PYTHONPATH": str(SCRIPT.parents[1])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["grad", "refused", "jvp", "refused", "autograd", "exact"]


def test_the_probe_takes_the_private_path_on_this_torch():
    """Every release tested (2.9.1, 2.11.0, 2.13.0, 2.14.1, 2.15.0) passes the probe; a failure would move
    every op to the public path silently, so it is asserted where the suite runs."""
    from memops.ops import torch_private

    if os.environ.get("MEMOPS_TORCH_PRIVATE") == "0":
        assert torch_private.PATH == "public"
        return
    assert torch_private.PATH == "private", torch_private.PROBE_ERROR
    assert torch_private.functorch_probe_error() is None  # its torch.func half, run once on first use


def test_import_memops_loads_neither_torch_func_nor_triton():
    """The probe at import checks eagerly only: ``torch.func`` imports dynamo and triton (seconds, and triton
    must see ``TRITON_INTERPRET`` before its import: ``python -m memops traffic``)."""
    code = "import sys, torch, memops; print(sorted(m for m in ('triton', 'torch._dynamo') if m in sys.modules))"
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1])}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
