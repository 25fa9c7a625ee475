"""memops in verl's patched model forwards, loaded through verl's own external-module mechanism
(``VERL_USE_EXTERNAL_MODULES=memops.integrations.verl``) in a fresh process per model and backend."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("verl")

WORKER = os.path.join(os.path.dirname(__file__), "model_worker.py")


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
@pytest.mark.parametrize("backend", ["torch", "triton", "liger"])
def test_patched_forward_equals_unpatched_model(kind, backend):
    """Log-probs and entropy of verl's fused forward (every ``impl_backend``) equal the unpatched model's
    logits' to 5e-6 (fp32 against float64), every parameter gradient the unpatched model's to 1e-5."""
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
