"""Row planning (``memops/ops/plan.py``): which rows a call computes, and how many device-to-host syncs a
call makes (validation 1, planning at most 1, GRPO 1 more after probing masked tokens)."""

from __future__ import annotations

import pytest
import torch
from helpers import Syncs

import memops
from memops.contract import SPECS
from memops.ops import family, plan

# the targets' range check: their minimum and maximum, read in one copy to the host
CHECK = "Tensor.tolist"

pytestmark = pytest.mark.usefixtures("plan_small_calls")  # these shapes are small: plan them anyway


def _run(name, args, need=None, backward_grads=None):
    """A family's kernel code run directly (the dispatcher hides an op's insides from a dispatch mode)."""
    spec = SPECS[name]
    forward, gradients = family.KERNELS[name]
    a = spec.bind(args)
    with Syncs() as s:
        if backward_grads is None:
            forward(a, spec.forward_mask(a) if spec.forward_grads else [])
        else:
            gradients(a, backward_grads, need)
    return s.seen


def _ce_args(ignore: bool, all_lse: bool, reduction="mean"):
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(40, 8, generator=g), torch.randn(13, 8, generator=g), torch.randn(13, generator=g)
    t = torch.randint(0, 13, (40,), generator=g)
    if ignore:
        t[::3] = -100
    return (
        x,
        w,
        t,
        b,
        None,
        None,
        -100,
        reduction,
        0.1,
        0.0,
        None,
        1.0,
        7,
        all_lse,
        True,
        False,
        "reference",
        [True, True, False, True],
    )


@pytest.mark.parametrize("ignore", [False, True])
def test_cross_entropy_syncs(ignore):
    assert _run("linear_ce", _ce_args(ignore, all_lse=True)) == [CHECK]  # validation
    assert _run("linear_ce", _ce_args(ignore, all_lse=False)) == [CHECK, "aten::_local_scalar_dense"]  # + plan
    args = _ce_args(ignore, all_lse=False, reduction="none")
    assert _run("linear_ce", args, [True, True, False, True], [torch.randn(40)]) == [
        "aten::_local_scalar_dense"
    ]  # plan


def test_small_calls_compute_every_row_without_a_plan(monkeypatch):
    """Under ``PLAN_MIN_MACS`` a call computes every row (no bound, no sync, no sort) with the same results:
    a row the reference also computes is exact."""
    args = _ce_args(True, all_lse=False)
    x, w = args[0], args[1]
    monkeypatch.setattr(plan, "PLAN_MIN_MACS", x.shape[0] * w.shape[0] * x.shape[1] + 1)
    assert plan.plan(x, w, None, 1.0, needed=args[2] != -100) is plan.EVERY_ROW
    assert _run("linear_ce", args) == [CHECK]  # validation only
    forward, _ = family.KERNELS["linear_ce"]
    small = forward(SPECS["linear_ce"].bind(args), [True, True, False, True])
    monkeypatch.setattr(plan, "PLAN_MIN_MACS", 0)
    assert _run("linear_ce", args) == [CHECK, "aten::_local_scalar_dense"]  # validation + plan
    planned = forward(SPECS["linear_ce"].bind(args), [True, True, False, True])
    # loss, top-1 and gradients (an ignored row's lse is an output only with all_lse)
    pick = lambda out: [out[0][0], out[0][2], *out[1]]  # noqa: E731
    for a, b in zip(pick(small), pick(planned)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)  # different row sets per chunk: rounding apart
    assert plan.PLAN_MIN_MACS == 0 and 40 * 13 * 8 < (1 << 18)


def test_logprobs_and_transform_syncs():
    x, w, t, b = _ce_args(False, True)[:4]
    assert _run(
        "linear_logprobs", (x, w, t, b, None, None, 0.7, 1.0, None, True, False, False, False, 5, "reference", "full")
    ) == [CHECK]
    g1 = torch.randn(40) * (torch.arange(40) % 2)
    assert _run(
        "linear_logprobs",
        (x, w, t, b, None, None, 0.7, 1.0, None, True, False, False, False, 5, "reference", "full"),
        [True] * 3,
        [g1, None],
    ) == ["aten::_local_scalar_dense"]
    args = (x, w, t, b, [], None, "cross_entropy", "[]", -100, "mean", None, 1.0, 5, "reference", [True] * 3)
    assert len(_run("linear_transform", args)) == 2


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("all_logprobs", [False, True])
def test_grpo_syncs(masked, all_logprobs):
    x, w, t, b = _ce_args(False, True)[:4]
    tw = torch.full((40,), 1 / 40)
    if masked:
        tw[::4] = 0
    adv = torch.randn(40)
    opts = ("grpo", "token", 0.0, 0.2, 0.2, None, False, 1.0, 1.05, 1.0, 1.0, None, False, 6)
    args = (x, w, t, b, tw, adv, None, None, None, None, None, *opts, all_logprobs, "reference", "full", [True] * 3)
    seen = _run("linear_grpo", args)
    # validation, planning, and the probe's result when masked tokens' log-probs are wanted (with
    # all_logprobs=False and beta=0 they are skipped: unreachable)
    probed = masked and all_logprobs
    assert seen == [CHECK, "aten::_local_scalar_dense"] + (["aten::nonzero"] if probed else [])


def test_the_counter_sees_syncs():
    with Syncs() as s:
        t = torch.arange(5)
        bool(t.sum() > 0)
        t[t > 2]
        t.nonzero()
        torch.equal(t, t)
        t.tolist()
        t.to("cpu")
    assert s.seen == [
        "aten::_local_scalar_dense", "aten::index", "aten::nonzero", "aten::equal", "Tensor.tolist", "Tensor.to"
    ]  # fmt: skip


def _rows(p):
    return (None if p.full is None else p.full.tolist()), (None if p.probe is None else p.probe.tolist())


def test_plan_rules():
    x, w = torch.randn(6, 3), torch.randn(5, 3)
    needed = torch.tensor([1, 0, 1, 0, 1, 1], dtype=torch.bool)
    probe = torch.tensor([0, 0, 1, 1, 0, 0], dtype=torch.bool)
    assert _rows(plan.plan(x, w, None, 1.0)) == (None, None)
    assert _rows(plan.plan(x, w, None, 1.0, needed=torch.ones(6, dtype=torch.bool))) == (None, None)
    assert _rows(plan.plan(x, w, None, 1.0, needed=needed)) == ([0, 2, 4, 5], None)
    assert _rows(plan.plan(x, w, None, 1.0, needed=needed, probe=probe)) == ([0, 4, 5], [2])
    assert _rows(plan.plan(x, w, None, 1.0, probe=probe)) == ([0, 1, 4, 5], [2, 3])
    # a logit that may be NaN / inf: unneeded rows are computed in full, and no row is probed (a zero
    # gradient row times an infinite weight is NaN in the reference's input gradient)
    for bad in (float("nan"), float("inf"), 1e38):
        xb = x.clone()
        xb[1, 0] = bad
        assert _rows(plan.plan(xb, w, None, 1.0, needed=needed, probe=probe)) == (None, None)
        assert _rows(plan.plan(xb, w, None, 1.0, probe=probe)) == (None, None)
    # a non-finite extra tensor too
    extra = torch.ones(6)
    extra[3] = float("nan")
    assert _rows(plan.plan(x, w, None, 1.0, needed=needed, finite=(extra,))) == (None, None)
    # nothing needed: no rows
    assert _rows(plan.plan(x, w, None, 1.0, needed=torch.zeros(6, dtype=torch.bool))) == ([], None)


def test_skipped_rows_keep_nan_parity_end_to_end():
    """An ignored token with a NaN hidden state makes the reference's weight gradient NaN; memops too."""
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 9, (6,))
    t[2] = -100
    with torch.no_grad():
        x[2, 1] = float("nan")
    memops.linear_cross_entropy(x, w, t).backward()
    ref_w = w.detach().clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(x.detach() @ ref_w.T, t).backward()
    assert torch.isnan(ref_w.grad).any() and torch.equal(torch.isnan(w.grad), torch.isnan(ref_w.grad))


def test_masked_grpo_tokens_keep_nan_parity_with_an_infinite_weight():
    """A masked token's zero logit gradient times an infinite weight entry is NaN in the reference's input
    gradient: probing it forward only (a zero gradient) would hide that."""
    from reference import ref_grpo_loss

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 4, dtype=torch.float64, generator=g)
    w = torch.randn(7, 4, dtype=torch.float64, generator=g)
    w[3, 1] = float("-inf")
    ids = torch.randint(0, 7, (2, 5), generator=g)
    mask = torch.ones(2, 5, dtype=torch.int64)
    mask[:, 3:] = 0
    adv = torch.randn(2, dtype=torch.float64, generator=g)
    ref = torch.full((2, 5), -2.0, dtype=torch.float64)
    got, want = (x.clone().requires_grad_(True) for _ in range(2))
    memops.linear_grpo_loss(got, w, ids, mask, adv, ref_logprobs=ref, beta=0.04)[0].backward()
    ref_grpo_loss(want, w, ids, mask, adv, ref_logprobs=ref, beta=0.04)[0].backward()
    assert want.grad[:, 3:].isnan().any()
    assert torch.equal(got.grad.isnan(), want.grad.isnan())


def test_a_small_call_runs_few_tensor_ops(monkeypatch):
    """At small shapes a call's fixed cost is mostly its tensor ops, 1-3 µs each on a CPU (``python -m memops
    bench --preset overhead``; BENCHMARKS.md): the op kernel of a one-chunk fp32 ``linear_cross_entropy``
    that also computes its gradients runs 41 of them (the range check 4, the mean's divisor 2, the logits GEMM
    and the head 21, the two gradient GEMMs, the loss's reduction, the lse output's mask, placeholders)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    monkeypatch.setattr(plan, "PLAN_MIN_MACS", 1 << 18)  # the default: a call this small is not planned
    g = torch.Generator().manual_seed(0)
    x, w, t = torch.randn(8, 16, generator=g), torch.randn(128, 16, generator=g), torch.randint(0, 128, (8,))
    spec = SPECS["linear_ce"]
    opts = [0 if o.name == "chunk_size" else o.default for o in spec.options]
    a = spec.bind([x, w, t, None, None, None, *opts, [True, True, False, False]])
    seen = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    forward, _ = family.KERNELS["linear_ce"]
    with Count():
        (loss, lse, _), grads = forward(a, spec.forward_mask(a))
    assert len(seen) <= 41, seen
    ref = torch.nn.functional.cross_entropy(x @ w.t(), t)
    torch.testing.assert_close(loss, ref)
    assert grads[0].shape == x.shape and grads[1].shape == w.shape


def test_the_front_ends_eager_call_is_the_ops_call():
    """In plain eager code a front end runs the op's autograd kernel itself (the dispatcher's round trip is a
    per-call cost); wherever something would see the op (the profiler, a dispatch mode, a kernel running below
    autograd) the op is called: the same results, bit for bit, and each sees ``memops::linear_ce``."""
    from torch.utils._python_dispatch import TorchDispatchMode

    g = torch.Generator().manual_seed(0)
    x, w, t = torch.randn(8, 16, generator=g), torch.randn(32, 16, generator=g), torch.randint(0, 32, (8,), generator=g)

    def run():
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = memops.linear_cross_entropy(xi, wi, t)
        loss.backward()
        return loss, xi.grad, wi.grad

    plain = run()
    with torch.profiler.profile() as prof:
        profiled = run()
    assert "memops::linear_ce" in {e.name for e in prof.events()}
    seen = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Watch():
        watched = run()
    assert "memops.linear_ce.default" in seen
    for other in (profiled, watched):
        for a, b in zip(plain, other):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    with torch._C._AutoDispatchBelowAutograd():  # as inside a custom op's kernel: no autograd graph
        inner = memops.linear_cross_entropy(x.clone().requires_grad_(), w, t)
    assert inner.grad_fn is None
    torch.testing.assert_close(inner, plain[0].detach(), rtol=0, atol=0)
