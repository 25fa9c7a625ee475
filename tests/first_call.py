"""Every public front end compiled with ``torch.compile(fullgraph=True)`` as the first memops call of a fresh
process, then after eager calls: run by ``tests/test_first_call.py`` in a subprocess, so no earlier test can
warm a cache that hides a failure (a lazily built attribute once broke every front end's first compiled call).

``python tests/first_call.py static|dynamic [BACKEND]``: phase 1 compiles each front end (``dynamic=False`` or
``True``) before any eager memops call in the process, phase 2 runs each eagerly and compares outputs and
gradients, phase 3 resets dynamo and compiles each in the other mode at a new token count, compared with
eager.  Prints one JSON line: ``{case: "ok" | error text}``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback

import torch
import torch.distributed as dist

import memops
from memops import distributed
from memops.nn import LinearCrossEntropyLoss
from memops.nn import functional as nnf

D, V = 16, 37


@memops.transform("_first_call_focal")
def _focal(logits, target, weight, gamma: float = 2.0):
    logp = torch.log_softmax(logits, -1).gather(-1, target[:, None]).squeeze(-1)
    return -weight * (1 - logp.exp()) ** gamma * logp


def _tensors(n: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    b = 2
    t = n // b
    x = torch.randn(b, t, D, generator=g)
    ids = torch.randint(0, V, (b, t), generator=g)
    labels = ids.clone()
    labels[0, :2] = -100
    mask = (torch.rand(b, t, generator=g) < 0.8).float()
    mask[:, 0] = 1
    return {
        "x": x,
        "w": torch.randn(V, D, generator=g) * 0.3,
        "b": torch.randn(V, generator=g) * 0.1,
        "ids": ids,
        "labels": labels,
        "mask": mask,
        "adv": torch.randn(b, generator=g),
        "old": torch.randn(b, t, generator=g) * 0.1 - 3.5,
        "ref": torch.randn(b, t, generator=g) * 0.1 - 3.5,
        "tok_w": torch.rand(b, t, generator=g),
        "xt": torch.randn(b, t, D + 4, generator=g),
        "wt": torch.randn(V, D + 4, generator=g) * 0.3,
        "kept": torch.randint(-1, V, (b, t, 4), generator=g),  # a sampler's kept ids per token
        "temps": torch.rand(b, 1, generator=g) + 0.5,  # one temperature per sequence
        "depth_w": torch.tensor([1.0, 0.3]),  # multi-token prediction's per-depth weights
    }


def _sum(out):
    """A scalar of every differentiable output (uneven weights on per-token ones)."""
    if isinstance(out, dict):
        out = [v for v in out.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    if isinstance(out, (tuple, list)):
        total = 0
        for o in out:
            if isinstance(o, torch.Tensor) and o.requires_grad:
                total = total + _sum(o)
        return total
    return out if out.dim() == 0 else (out * torch.cos(out.detach())).sum()


_module = LinearCrossEntropyLoss(D, V, reduction="mean", label_smoothing=0.05)  # its own head
_memops_module = memops.LinearCrossEntropy(z_loss=1e-3, chunk_size=5)

# name -> (function of (x, w, b, t) returning the outputs, with b and t the bias and the rest of the tensors)
CASES = {
    "linear_cross_entropy": lambda x, w, b, t: memops.linear_cross_entropy(
        x, w, t["labels"], b, label_smoothing=0.1, z_loss=1e-3, softcap=4.0, chunk_size=5
    ),
    "linear_cross_entropy_none": lambda x, w, b, t: memops.linear_cross_entropy(
        x, w, t["labels"], b, reduction="none", shift=True, return_lse=True, chunk_size=5
    ),
    "LinearCrossEntropy_module": lambda x, w, b, t: _memops_module(x, w, t["labels"]),
    "linear_loss_focal": lambda x, w, b, t: memops.linear_loss(x, w, t["labels"], "focal", b, gamma=1.5),
    "linear_loss_user_transform": lambda x, w, b, t: memops.linear_loss(
        x, w, t["labels"], "_first_call_focal", extras=(t["tok_w"],), gamma=1.5, chunk_size=5
    ),
    "linear_logprobs": lambda x, w, b, t: memops.linear_logprobs(
        x, w, t["ids"], b, temperature=0.9, return_entropy=True, chunk_size=5
    ),
    "linear_logprobs_sampler": lambda x, w, b, t: memops.linear_logprobs(
        x, w, t["ids"], b, temperature=t["temps"], sampling_mask=t["kept"], return_entropy=True, entropy_over="kept"
    ),
    "linear_grpo_loss_sampler": lambda x, w, b, t: memops.linear_grpo_loss(
        x, w, t["ids"], t["mask"], t["adv"], old_logprobs=t["old"], temperature=t["temps"], sampling_mask=t["kept"]
    )[0],
    "linear_grpo_loss_beta0": lambda x, w, b, t: memops.linear_grpo_loss(x, w, t["ids"], t["mask"], t["adv"])[0],
    "linear_grpo_loss_kl": lambda x, w, b, t: memops.linear_grpo_loss(
        x, w, t["ids"], t["mask"], t["adv"], old_logprobs=t["old"], ref_logprobs=t["ref"], beta=0.04, bias=b
    )[0],
    "linear_grpo_loss_gspo": lambda x, w, b, t: memops.linear_grpo_loss(
        x, w, t["ids"], t["mask"], t["adv"], old_logprobs=t["old"], importance_sampling_level="sequence"
    )[0],
    "linear_distillation_loss": lambda x, w, b, t: memops.linear_distillation_loss(
        x, w, t["labels"], t["xt"], t["wt"], beta=0.3, temperature=1.5, hard_label_weight=0.2
    ),
    "linear_mtp_cross_entropy": lambda x, w, b, t: memops.linear_mtp_cross_entropy(
        torch.stack([x, x * 0.5]), w, t["labels"], b, depth_weights=t["depth_w"], label_smoothing=0.1, chunk_size=5
    ),
    "nn_functional_linear_cross_entropy": lambda x, w, b, t: nnf.linear_cross_entropy(
        x.flatten(0, 1), w, t["ids"].flatten(), linear_bias=b, label_smoothing=0.1
    ),
    "nn_LinearCrossEntropyLoss": lambda x, w, b, t: _module(x.flatten(0, 1), t["ids"].flatten()),
    "vocab_parallel_cross_entropy": lambda x, w, b, t: distributed.vocab_parallel_cross_entropy(
        x, w, t["labels"], b, z_loss=1e-3, vocab_start=0, vocab_size=V
    ),
    "vocab_parallel_logprobs": lambda x, w, b, t: distributed.vocab_parallel_logprobs(
        x, w, t["ids"], b, return_entropy=True, vocab_start=0, vocab_size=V
    ),
    "vocab_parallel_grpo_loss": lambda x, w, b, t: distributed.vocab_parallel_grpo_loss(
        x, w, t["ids"], t["mask"], t["adv"], vocab_start=0, vocab_size=V
    )[0],
    "vocab_parallel_distillation_loss": lambda x, w, b, t: distributed.vocab_parallel_distillation_loss(
        x, w, t["labels"], t["xt"], t["wt"], vocab_start=0, vocab_size=V
    ),
    "vocab_parallel_mtp_cross_entropy": lambda x, w, b, t: distributed.vocab_parallel_mtp_cross_entropy(
        torch.stack([x, x * 0.5]), w, t["labels"], b, shifts=(1, 3), vocab_start=0, vocab_size=V
    ),
}


def _step(name: str, fn, n: int, seed: int):
    """Outputs and the gradients of x, w, b of one call of ``fn`` (eager or compiled) on fresh leaves."""
    t = _tensors(n, seed)
    x, w, b = (t[k].clone().requires_grad_(True) for k in ("x", "w", "b"))
    out = fn(x, w, b, t)
    loss = _sum(out)
    grads = torch.autograd.grad(loss, [x, w, b], allow_unused=True)
    flat = out if isinstance(out, (tuple, list)) else [out]
    return [o.detach() for o in flat if isinstance(o, torch.Tensor)], grads


def _compare(name, got, want):
    (go, gg), (wo, wg) = got, want
    assert len(go) == len(wo), f"{name}: {len(go)} outputs compiled, {len(wo)} eager"
    for a, e in zip([*go, *gg], [*wo, *wg]):
        if a is None or e is None:
            assert a is None and e is None, f"{name}: a gradient is None on one side only"
            continue
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def main(mode: str, backend: str) -> dict:
    first, other = (False, True) if mode == "static" else (True, False)
    results, compiled = {}, {}
    # phase 1: the first memops call of this process, for every front end, is a compiled one
    for name, fn in CASES.items():
        try:
            compiled[name] = _step(name, torch.compile(fn, fullgraph=True, dynamic=first, backend=backend), 12, 1)
            results[name] = "ok"
        except Exception:
            results[name] = "first compiled call: " + traceback.format_exc(limit=-3)
    # phase 2: eager, compared with the compiled first call
    for name, fn in CASES.items():
        try:
            eager = _step(name, fn, 12, 1)
            if name in compiled and results[name] == "ok":
                _compare(name, compiled[name], eager)
        except Exception:
            results[name] = "eager / first compiled call: " + traceback.format_exc(limit=-3)
    # phase 3: after eager calls, the other shape mode at other token counts
    torch._dynamo.reset()
    for name, fn in CASES.items():
        if results[name] != "ok":
            continue
        try:
            cf = torch.compile(fn, fullgraph=True, dynamic=other, backend=backend)
            for n in (10, 14):
                _compare(name, _step(name, cf, n, n), _step(name, fn, n, n))
        except Exception:
            results[name] = f"compiled after eager (dynamic={other}): " + traceback.format_exc(limit=-3)
    return results


if __name__ == "__main__":
    mode = sys.argv[1]
    backend = sys.argv[2] if len(sys.argv) > 2 else "aot_eager"
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        store = dist.FileStore(os.path.join(tmp, "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        try:
            out = main(mode, backend)
        finally:
            dist.destroy_process_group()
    print(json.dumps(out))
