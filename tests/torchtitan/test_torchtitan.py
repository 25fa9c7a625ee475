"""memops' torchtitan loss in torchtitan's own trainer (torchtitan 0.3.0, 2 ranks over gloo on the CPU).

torchtitan needs ``datasets<4.8`` (TRL 1.16 in the main test venv takes 5.x), so these tests run in a venv of
their own (``.ci/run``'s third step; the main suite does not collect this folder).  Each run is torchtitan's
config manager and trainer on its llama3 debug model, launched by ``torchrun`` (``harness.py``: the CPU
workarounds, named there), with a word-level tokenizer and a local text file built here; the memops runs add
``--override.imports memops.integrations.torchtitan.memops_cross_entropy`` and nothing else.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))  # tests/reference.py (the one reference implementation), tests/helpers.py

from helpers import free_port  # noqa: E402
from reference import ref_linear_cross_entropy, ref_mtp_cross_entropy  # noqa: E402

STEPS = 3
OVERRIDE = "memops.integrations.torchtitan.memops_cross_entropy"
PARALLEL = {
    "fsdp2": ["--parallelism.data_parallel_shard_degree", "2"],
    "tp2": ["--parallelism.tensor_parallel_degree", "2"],
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Where the runs start: torchtitan's debug config reads ``./tests/assets`` (made by the harness)."""
    from harness import make_assets

    root = tmp_path_factory.mktemp("torchtitan")
    make_assets(root)
    return root


def _train(
    workdir: Path, name: str, parallel: str, memops: bool, model: tuple[str, str] = ("llama3", "llama3_debugmodel")
) -> list[dict]:
    """torchtitan's trainer on 2 ranks, 3 steps; each rank's record (see harness.py)."""
    out = workdir / f"{name}-{parallel}"
    args = [
        "--module", model[0], "--config", model[1],
        *PARALLEL[parallel],
        "--parallelism.spmd_backend", "partial_dtensor",  # CPU workaround 5 (harness.py)
        "--training.steps", str(STEPS), "--training.seq_len", "64", "--training.local_batch_size", "2",
        "--training.mixed_precision_param", "float32",
        "--checkpoint.no-enable", "--validator.no-enable", "--debug.seed", "0",
    ]  # fmt: skip
    if memops:
        args += ["--override.imports", OVERRIDE]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        str(HERE / "harness.py"), str(out), *args,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536", HF_HUB_OFFLINE="1")
    run = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    return [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("parallel", ["fsdp2", "tp2"])
def test_torchtitan_trainer_with_memops_matches_its_own_loss(workdir, parallel):
    """FSDP2 (the head's weight gathered by FSDP2's hooks around memops' loss) and TP=2 (the head a Shard(0)
    DTensor, memops' vocabulary-parallel loss): every rank's step losses and gradient norms equal to those of
    torchtitan's own chunked cross-entropy to fp32 rounding, memops' loss ran once a step on every rank."""
    plain = _train(workdir, "torchtitan", parallel, memops=False)
    fused = _train(workdir, "memops", parallel, memops=True)
    for rank, (p, m) in enumerate(zip(plain, fused)):
        assert p["loss_class"] == "ChunkedLossWrapper" and m["loss_class"] == "MemopsCrossEntropy"
        assert len(p["losses"]) == len(m["losses"]) == len(m["grad_norms"]) == STEPS
        # fp32 both ways: the same sums in another order (measured: step 1 bit-equal, then <= 2e-7 relative)
        torch.testing.assert_close(torch.tensor(m["losses"]), torch.tensor(p["losses"]), rtol=1e-5, atol=0)
        torch.testing.assert_close(torch.tensor(m["grad_norms"]), torch.tensor(p["grad_norms"]), rtol=1e-5, atol=0)
        assert p["memops_calls"] == 0 and m["memops_calls"] == STEPS
        print(
            f"{parallel} rank {rank}: peak RSS torchtitan {p['peak_rss_mib']:.0f} MiB, "
            f"memops {m['peak_rss_mib']:.0f} MiB"
        )
    if parallel == "tp2":  # both TP ranks see the same tokens: the same loss
        assert fused[0]["losses"] == fused[1]["losses"]


def test_deepseek_v3_multi_token_prediction_with_memops_matches_its_own_loss(workdir):
    """torchtitan's DeepSeek-V3 debug model with its MTP layer (``deepseek_v3_debugmodel_mtp``: ``MTPLoss``, the
    main and the MTP depth's cross-entropies on the logits), FSDP2 on 2 ranks, against the same run with the
    override (``MemopsMTPLoss``: both depths in one ``memops.linear_mtp_cross_entropy`` call from the hidden
    states): every rank's step losses and gradient norms equal to fp32 rounding."""
    model = ("deepseek_v3", "deepseek_v3_debugmodel_mtp")
    plain = _train(workdir, "torchtitan-mtp", "fsdp2", memops=False, model=model)
    fused = _train(workdir, "memops-mtp", "fsdp2", memops=True, model=model)
    for p, m in zip(plain, fused):
        assert p["loss_class"] == "MTPLoss" and m["loss_class"] == "MemopsMTPLoss"
        assert len(p["losses"]) == len(m["losses"]) == len(m["grad_norms"]) == STEPS
        torch.testing.assert_close(torch.tensor(m["losses"]), torch.tensor(p["losses"]), rtol=1e-5, atol=0)
        torch.testing.assert_close(torch.tensor(m["grad_norms"]), torch.tensor(p["grad_norms"]), rtol=1e-5, atol=0)
        assert p["memops_calls"] == 0 and m["memops_calls"] == STEPS


def _head(vocab: int, dim: int, bias: bool) -> torch.nn.Linear:
    torch.manual_seed(0)
    head = torch.nn.Linear(dim, vocab, bias=bias, dtype=torch.float64)
    with torch.no_grad():
        head.weight.mul_(4.0)
    return head


@pytest.mark.parametrize(
    "options", [{}, {"z_loss": 1e-3}, {"softcap": 2.0}, {"label_smoothing": 0.1, "z_loss": 1e-4, "softcap": 3.0}]
)
@pytest.mark.parametrize("bias", [False, True])
def test_the_loss_class_equals_the_float64_reference(options, bias):
    """One process, a plain head: the loss and the hidden-state and head gradients of the class equal the
    unfused reference's summed loss / global_valid_tokens in float64, ignored labels included."""
    from memops.integrations.torchtitan import MemopsCrossEntropy

    vocab, dim = 37, 8
    head = _head(vocab, dim, bias)
    hidden = torch.randn(2, 11, dim, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, vocab, (2, 11))
    labels[0, :3] = -100
    gvt = (labels != -100).sum() * 3  # as if two more ranks held tokens
    loss_fn = MemopsCrossEntropy.Config(global_vocab_size=vocab, chunk_size=5, **options).build()
    loss_fn.set_lm_head(head)
    loss, metrics = loss_fn(hidden, labels, gvt)
    assert metrics == {}
    loss.backward()
    got = [hidden.grad] + [p.grad for p in head.parameters()]
    hidden.grad = None
    head.zero_grad()
    ref = ref_linear_cross_entropy(hidden, head.weight, labels, head.bias, reduction="sum", **options) / gvt
    ref.backward()
    want = [hidden.grad] + [p.grad for p in head.parameters()]
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-15)


def test_validation_without_gradients_and_the_refusals(monkeypatch):
    """A forward without gradients (torchtitan's validator) gives the same loss; a missing head, a head whose
    rows are not the vocabulary and the spmd_types backend under tensor parallelism are refused by name."""
    from memops.integrations.torchtitan import MemopsCrossEntropy

    head = _head(13, 4, False)
    hidden, labels = torch.randn(1, 6, 4, dtype=torch.float64), torch.randint(0, 13, (1, 6))
    loss_fn = MemopsCrossEntropy.Config(global_vocab_size=13).build()
    with pytest.raises(RuntimeError, match="set_lm_head"):
        loss_fn(hidden, labels)
    loss_fn.set_lm_head(head)
    with torch.no_grad():
        loss, _ = loss_fn(hidden, labels)
    ref = F.cross_entropy(F.linear(hidden, head.weight).flatten(0, 1), labels.flatten(), reduction="sum")
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    wrong = MemopsCrossEntropy.Config(global_vocab_size=26).build()
    wrong.set_lm_head(head)
    with pytest.raises(ValueError, match="13 rows but global_vocab_size is 26"):
        wrong(hidden, labels)
    # spmd_types hands the head a plain local shard under TP (that backend does not run here: see harness.py)
    import torchtitan.distributed.spmd_types as spmd_types
    import torchtitan.distributed.utils as dist_utils

    monkeypatch.setattr(dist_utils, "get_spmd_backend", lambda: "spmd_types")
    monkeypatch.setattr(spmd_types, "spmd_mesh_size", lambda axis: 2 if axis == "tp" else 1)
    with pytest.raises(ValueError, match="spmd_backend='spmd_types' with tensor parallelism is not supported"):
        loss_fn(hidden, labels)


def test_the_override_replaces_only_torchtitans_cross_entropy():
    from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss, MSELoss

    from memops.integrations.torchtitan import MemopsCrossEntropy, memops_cross_entropy

    for cfg in (CrossEntropyLoss.Config(global_vocab_size=2048), ChunkedLossWrapper.Config(
        loss_fn=CrossEntropyLoss.Config(global_vocab_size=2048), num_chunks=4)):  # fmt: skip
        new = memops_cross_entropy(cfg, z_loss=1e-4)
        assert type(new) is MemopsCrossEntropy.Config and new.global_vocab_size == 2048 and new.z_loss == 1e-4
        assert memops_cross_entropy(new) is new
    for cfg in (MSELoss.Config(), ChunkedLossWrapper.Config(loss_fn=MSELoss.Config())):
        with pytest.raises(ValueError, match="not MSELoss.Config"):
            memops_cross_entropy(cfg)
    from torchtitan.models.deepseek_v3.mtp import MTPLoss

    from memops.integrations.torchtitan import MemopsMTPLoss

    new = memops_cross_entropy(MTPLoss.Config(global_vocab_size=2048, mtp_scale=0.1), chunk_size=64)
    assert type(new) is MemopsMTPLoss.Config
    assert (new.global_vocab_size, new.mtp_scale, new.chunk_size) == (2048, 0.1, 64)
    assert memops_cross_entropy(new) is new


@pytest.mark.parametrize("packed", [False, True])
def test_the_mtp_loss_class_equals_torchtitans_on_the_logits(packed):
    """``MemopsMTPLoss`` on the depths' hidden states against torchtitan's ``MTPLoss`` on their logits (float64,
    two MTP depths, ignored labels, packed documents in ``positions``)."""
    from torchtitan.models.deepseek_v3.mtp import MTPLoss

    from memops.integrations.torchtitan import MemopsMTPLoss

    g = torch.Generator().manual_seed(5)
    head = _head(37, 8, bias=False)
    depths = [torch.randn(2, 12, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    labels = torch.randint(0, 37, (2, 12), generator=g)
    labels[0, :3] = -100
    positions = torch.arange(12).repeat(2, 1)
    if packed:
        positions[1, 5:] -= 5
    valid = torch.tensor(100.0, dtype=torch.float64)
    ours = MemopsMTPLoss(MemopsMTPLoss.Config(mtp_scale=0.2))
    ours.set_lm_head(head)
    theirs = MTPLoss(MTPLoss.Config(mtp_scale=0.2))
    got, _ = ours(depths, labels, valid, positions=positions)
    # torchtitan's cross-entropy upcasts the logits to fp32 (float64 inputs too): equal to fp32 rounding
    want, _ = theirs([head(h) for h in depths], labels, valid, positions=positions)
    torch.testing.assert_close(got, want.to(got.dtype), rtol=2e-6, atol=0)
    # and to the float64 reference (tests/reference.py), labels shifted by one already: shifts 0, 1, 2
    ref, _ = ref_mtp_cross_entropy(
        torch.stack(depths), head.weight, labels, shifts=(0, 1, 2), depth_weights=[1.0, 0.1, 0.1],
        position_ids=positions, reduction="sum",
    )  # fmt: skip
    torch.testing.assert_close(got, ref / valid, rtol=1e-12, atol=1e-12)
    params = [*depths, head.weight]
    for a, b in zip(torch.autograd.grad(got, params), torch.autograd.grad(ref / valid, params)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
