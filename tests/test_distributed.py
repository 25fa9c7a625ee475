"""Multi-process tests (gloo, CPU, float64): vocab-parallel CE, DTensor, compile, DDP, FSDP2, failures."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import torch.distributed as dist

WORKER = os.path.join(os.path.dirname(__file__), "dist_worker.py")
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(case: str, world: int, timeout: float = 240, dist_timeout: float = 60):
    env = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_port()),
        WORLD_SIZE=str(world),
        DIST_TIMEOUT=str(dist_timeout),
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]),
    )
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, case],
            env=dict(env, RANK=str(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    deadline = time.monotonic() + timeout
    results = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((p.returncode, out))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return results


CASES = ["vocab", "dtensor", "compile", "ddp", "fsdp"]


@pytest.mark.parametrize("world", [2, 3])
def test_matches_single_process(world):
    """Vocab-parallel CE (even and uneven shards, every option), DTensor weights, torch.compile,
    DDP and FSDP2: loss and gradients equal the single-process run; one process group per world size."""
    for rc, out in _launch(",".join(CASES), world):
        assert rc == 0, out[-3000:]
        for case in CASES:
            assert f": {case} ok" in out


def test_patched_transformers_model_with_fully_sharded_lm_head():
    pytest.importorskip("transformers")
    for rc, out in _launch("hf_fsdp", 2):
        assert rc == 0, out[-3000:]
        assert ": hf_fsdp ok" in out


def test_statistics_reduced_once_per_chunk_and_layout_checked_once():
    for rc, out in _launch("collectives", 2):
        assert rc == 0, out[-3000:]
        assert ": collectives ok" in out


def test_mismatched_shards_raise_on_every_rank():
    for rc, out in _launch("mismatch", 2):
        assert rc == 0, out[-3000:]


def test_rank_failure_is_an_error_not_a_hang():
    start = time.monotonic()
    (rc0, out0), (rc1, _) = _launch("rank_failure", 2, timeout=120, dist_timeout=10)
    assert rc1 == 3
    assert rc0 != 0 and time.monotonic() - start < 120
    assert "Error" in out0, out0[-2000:]
