"""Multi-process tests (gloo, CPU, float64): vocab-parallel CE, DTensor, compile, DDP, FSDP2, failures."""

from __future__ import annotations

import os
import sys
import time

import pytest
import torch.distributed as dist
from helpers import launch

WORKER = os.path.join(os.path.dirname(__file__), "dist_worker.py")
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")


def _launch(case: str, world: int, timeout: float = 240, dist_timeout: float = 60):
    return launch([sys.executable, WORKER, case], world, timeout=timeout, env={"DIST_TIMEOUT": str(dist_timeout)})


CASES = ["vocab", "dtensor", "compile", "ddp", "fsdp"]


@pytest.mark.parametrize("world", [2, 3])
def test_matches_single_process(world):
    """Vocab-parallel CE (even and uneven shards, every option), DTensor weights, torch.compile,
    DDP and FSDP2: loss and gradients equal the single-process run; one process group per world size."""
    for rc, out in _launch(",".join(CASES), world):
        assert rc == 0, out[-3000:]
        for case in CASES:
            assert f": {case} ok" in out


@pytest.mark.parametrize("world", [2, 3, 4])
def test_every_family_vocab_and_sequence_parallel(world):
    """Log-probs (every extra), GRPO (every loss type, metrics), distillation (sharded / whole / offline
    teachers) and CE, vocab-parallel with replicated and with sequence-parallel tokens (uneven vocabulary and
    token shards, a rank without tokens), and their DTensor front ends (1-D mesh; with 4 ranks also the TP
    dimension of a 2-D mesh, and FSDP2 x TP training 3 steps), against the single-process float64 op."""
    cases = ["families", "dtensor_families"] + (["fsdp_tp"] if world == 4 else [])
    for rc, out in _launch(",".join(cases), world):
        assert rc == 0, out[-3000:]
        for case in cases:
            assert f": {case} ok" in out


def test_megatron_core_tensor_parallel_group():
    """memops' vocab-parallel CE on megatron-core 0.16.1's tensor-parallel group against Megatron's own
    ``vocab_parallel_cross_entropy`` on the vocab-parallel logits, with and without sequence parallelism; and
    hidden states gathered by Megatron's ``gather_from_sequence_parallel_region`` (verl's Megatron engine):
    ``input_grad="partial"`` exact for CE and for log-probs with entropy, ``"reduced"`` world-times too large."""
    for rc, out in _launch("megatron", 2):
        assert rc == 0, out[-3000:]
        assert ": megatron ok" in out


def test_patched_transformers_model_with_fully_sharded_lm_head():
    pytest.importorskip("transformers")
    for rc, out in _launch("hf_fsdp", 2):
        assert rc == 0, out[-3000:]
        assert ": hf_fsdp ok" in out


def test_statistics_reduced_once_per_chunk_and_layout_checked_once():
    for rc, out in _launch("collectives,collectives_families", 2):
        assert rc == 0, out[-3000:]
        assert ": collectives ok" in out and ": collectives_families ok" in out


def test_mismatched_shards_raise_on_every_rank():
    for rc, out in _launch("mismatch", 2):
        assert rc == 0, out[-3000:]


def test_rank_failure_is_an_error_not_a_hang():
    start = time.monotonic()
    (rc0, out0), (rc1, _) = _launch("rank_failure", 2, timeout=120, dist_timeout=10)
    assert rc1 == 3
    assert rc0 != 0 and time.monotonic() - start < 120
    assert "Error" in out0, out0[-2000:]


@pytest.mark.parametrize("world", [2, 3])
def test_batch_invariant_vocab_parallel(world):
    """Batch-invariant mode on the vocabulary-parallel front ends (CE, log-probs with a sampling mask and
    per-token temperatures, distillation, GRPO), replicated and sequence-parallel tokens, fp32 and bf16: a
    row alone equals the row inside a batch bitwise (tests/dist_worker.py::case_invariant)."""
    for rc, out in _launch("invariant", world):
        assert rc == 0, out[-3000:]
        assert ": invariant ok" in out


@pytest.mark.parametrize("world", [2, 3])
def test_mtp_vocab_parallel(world):
    """vocab_parallel_mtp_cross_entropy (even and uneven shards, every option, packed sequences) against the
    single-process op in float64 (tests/dist_worker.py::case_mtp)."""
    for rc, out in _launch("mtp", world):
        assert rc == 0, out[-3000:]
        assert ": mtp ok" in out


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(input_grad="summed"), r"input_grad must be one of \('reduced', 'partial'\), got 'summed'"),
        (dict(input_grad="partial", sequence_parallel=True), r"input_grad='partial' is for replicated hidden"),
    ],
)
def test_input_grad_option_errors_name_it(one_process_group, kwargs, message):
    """``input_grad``: an unknown value, and ``"partial"`` with sequence-parallel tokens, refused by name (the
    two-rank behaviour of both values: ``test_megatron_core_tensor_parallel_group``)."""
    import torch

    from memops.distributed import vocab_parallel_cross_entropy, vocab_parallel_logprobs

    x, w, t = torch.randn(4, 3, requires_grad=True), torch.randn(6, 3), torch.randint(0, 6, (4,))
    for front in (vocab_parallel_cross_entropy, vocab_parallel_logprobs):
        with pytest.raises(ValueError, match=message):
            front(x, w, t, **kwargs)


def test_input_grad_partial_refused_for_dtensor_inputs(one_process_group):
    """A DTensor input's gradient is placed like the input: ``input_grad="partial"`` is refused by name there."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from memops.distributed import vocab_parallel_logprobs

    mesh = init_device_mesh("cpu", (1,))
    x = distribute_tensor(torch.randn(4, 3), mesh, [Replicate()])
    w = distribute_tensor(torch.randn(6, 3), mesh, [Shard(0)])
    with pytest.raises(ValueError, match="input_grad='partial' is for local hidden states"):
        vocab_parallel_logprobs(x, w, torch.randint(0, 6, (4,)), input_grad="partial")
