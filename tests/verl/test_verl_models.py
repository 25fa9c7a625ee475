"""memops in verl's patched model forwards, loaded through verl's own external-module mechanism
(``VERL_USE_EXTERNAL_MODULES=memops.integrations.verl``) in a fresh process per model and backend."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("verl")

WORKER = os.path.join(os.path.dirname(__file__), "model_worker.py")


@pytest.mark.parametrize("kind", ["llama", "qwen3", "qwen2_vl", "qwen3_5"])
@pytest.mark.parametrize("backend", ["torch", "triton", "liger"])
def test_patched_forward_equals_unpatched_model(kind, backend):
    """Log-probs and entropy of verl's fused forward (every ``impl_backend``) on a tiny float64 model (dense_common
    for Llama and Qwen3, verl's own forwards for Qwen2-VL with an image and Qwen3.5) equal the unpatched model's
    logits' to 1e-10, every parameter gradient the unpatched model's to 1e-9 relative."""
    env = dict(os.environ, VERL_USE_EXTERNAL_MODULES="memops.integrations.verl", VERL_USE_EXTERNAL_PLUGINS="none")
    run = subprocess.run([sys.executable, WORKER, kind, backend], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert f"{kind} {backend}: " in run.stdout and "gradients ok" in run.stdout


def test_plain_import_changes_nothing():
    """Without the environment variable verl keeps its own head: importing memops does not touch it."""
    code = (
        "import memops, verl\n"
        "from verl.utils.experimental import torch_functional as tf\n"
        "assert tf.FusedLinearForPPO.__module__ == 'verl.utils.experimental.torch_functional', tf.FusedLinearForPPO\n"
        "print('untouched')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "VERL_USE_EXTERNAL_MODULES"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "untouched" in run.stdout, (run.stdout + run.stderr)[-3000:]


def _fsdp2(head: str, tmp_path) -> list[dict]:
    out = tmp_path / f"{head}.json"
    env = dict(os.environ, VERL_USE_EXTERNAL_PLUGINS="none", OMP_NUM_THREADS="1")
    env.pop("VERL_USE_EXTERNAL_MODULES", None)
    if head == "memops":
        env["VERL_USE_EXTERNAL_MODULES"] = "memops.integrations.verl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run = subprocess.run(
        [*cmd, os.path.join(os.path.dirname(__file__), "fsdp2_worker.py"), head, str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    import json

    return json.loads(out.read_text())


def test_fsdp2_training_equals_verls_torch_backend(tmp_path):
    """FSDP2 on 2 gloo ranks, a tiny fp32 Llama patched by verl (torch backend), verl's own
    ``compute_policy_loss`` with an entropy bonus, 4 AdamW steps: memops' head (loaded through the environment
    variable) gives verl's own head's losses and gradient norms to 1e-6 at every step (fp32: verl's head computes
    in fp32 whatever its input dtype, so a float64 model would compare fp64 with fp32 math)."""
    theirs, ours = _fsdp2("verl", tmp_path), _fsdp2("memops", tmp_path)
    diffs = [(a["loss"] - b["loss"], a["grad_norm"] - b["grad_norm"]) for a, b in zip(ours, theirs)]
    print("fsdp2 loss / grad-norm differences:", diffs)
    assert len(ours) == len(theirs) == 4
    for step, (a, b) in enumerate(zip(ours, theirs)):
        for key in ("loss", "grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-6 * max(1.0, abs(b[key])), (step, key, a, b)
    assert len({round(r["loss"], 6) for r in theirs}) > 1  # the steps trained: losses moved


@pytest.mark.parametrize("backend", ["torch", "triton", "liger"])
def test_fsdp_engine_per_sample_temperature_and_sum_pi_squared(backend):
    """verl's FSDP engine's own ``prepare_model_inputs`` / ``prepare_model_outputs`` (wrapped by memops) on a
    packed micro-batch with a temperature per sample and ``calculate_sum_pi_squared``, fused kernels on: log-probs,
    entropy, Σπ² and every parameter gradient equal verl's own unfused path (full logits) on the same float64
    model to 1e-10; verl's engine without memops refuses the per-sample temperature (the stand-ins are named in
    ``engine_worker.py``)."""
    env = dict(os.environ, VERL_USE_EXTERNAL_MODULES="memops.integrations.verl", VERL_USE_EXTERNAL_PLUGINS="none")
    worker = os.path.join(os.path.dirname(__file__), "engine_worker.py")
    run = subprocess.run([sys.executable, worker, backend], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert f"engine {backend}: ok" in run.stdout


def test_megatron_fused_output_processor_tp2():
    """verl's Megatron engine head (``fused_output_processor`` itself) on megatron-core 0.16.1's tensor-parallel
    group, 2 gloo ranks: sequence parallelism on and off, tied and untied output weights, V / TP = 37 rows a
    rank: log-probs, entropy, weight-shard and hidden-state gradients equal float64's (1e-10; the stand-ins are
    named in ``megatron_worker.py``)."""
    pytest.importorskip("megatron.core")
    env = dict(
        os.environ,
        VERL_USE_EXTERNAL_MODULES="memops.integrations.verl",
        VERL_USE_EXTERNAL_PLUGINS="none",
        OMP_NUM_THREADS="1",
    )
    worker = os.path.join(os.path.dirname(__file__), "megatron_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", worker]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert "megatron: ok" in run.stdout
