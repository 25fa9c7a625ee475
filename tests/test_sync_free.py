"""The sync-free path (``memops.set_sync_free`` / ``memops.sync_free()``, and every call on a capturing CUDA
stream): each front end, forward and backward, makes no device-to-host sync, and gives the default path's
results (float64: equal to rounding, NaN and inf where the default path has them) for every family and option
set, non-finite inputs included.  Rows are planned at every size here, so the default path really skips."""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch
from helpers import Syncs
from hypothesis import given
from hypothesis import strategies as st

import memops
from memops.distributed import vocab_parallel_cross_entropy
from memops.ops import plan

N, D, V = 24, 6, 11
DT = torch.float64


@contextlib.contextmanager
def planned_at_every_size():
    old, plan.PLAN_MIN_MACS = plan.PLAN_MIN_MACS, 0
    try:
        yield
    finally:
        plan.PLAN_MIN_MACS = old


def _data(seed: int, poison: str | None = None, bias: bool = True):
    """Hidden states ``[2, N/2, D]``, weight, bias, targets with a third ignored; ``poison`` puts a NaN or an
    inf where only the ignored / masked rows or one vocabulary row reach it."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, N // 2, D, generator=g, dtype=DT)
    w = torch.randn(V, D, generator=g, dtype=DT)
    b = torch.randn(V, generator=g, dtype=DT) if bias else None
    t = torch.randint(0, V, (2, N // 2), generator=g)
    t[:, ::3] = -100
    if poison == "nan_ignored_row":
        x[0, 0, 1] = float("nan")
    elif poison == "inf_ignored_row":
        x[1, 3, 0] = float("inf")
    elif poison == "inf_weight":
        w[4, 2] = float("inf")
    elif poison == "huge_logits":
        x[0, 3] *= 1e300
    return x, w, b, t


POISONS = (None, "nan_ignored_row", "inf_ignored_row", "inf_weight", "huge_logits")


def _leaves(*ts):
    return [t.detach().clone().requires_grad_(True) if t is not None else None for t in ts]


def _both(fn):
    """``fn()`` (the tensors to compare) in the default path and sync-free; the sync-free run under the
    counter.  Returns both results."""
    with planned_at_every_size():
        default = fn()
        with memops.sync_free(), Syncs() as s:
            free = fn()
    assert s.seen == [], f"the sync-free path synced: {s.seen}"
    return default, free


def _same(default, free):
    assert len(default) == len(free)
    for k, (a, b) in enumerate(zip(default, free)):
        if a is None or b is None:
            assert a is None and b is None, k
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, k
        if a.dtype == torch.bool:
            assert torch.equal(a, b), k
            continue
        assert torch.equal(a.isnan(), b.isnan()), f"output {k}: NaN at different places"
        assert torch.equal(a.isinf(), b.isinf()) and torch.equal(a[a.isinf()], b[b.isinf()]), f"output {k}: inf"
        # float64: the two paths differ only in which rows share a chunk (rounding of the sums)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, equal_nan=True, msg=f"output {k}")


def _grads(loss, leaves):
    loss.backward()
    return [None if t is None else t.grad for t in leaves]


@given(
    reduction=st.sampled_from(["mean", "sum", "none"]),
    label_smoothing=st.sampled_from([0.0, 0.1]),
    z_loss=st.sampled_from([0.0, 1e-3]),
    softcap=st.sampled_from([None, 3.0]),
    logit_scale=st.sampled_from([1.0, 0.7]),
    num_items=st.sampled_from([None, 7, "tensor"]),
    return_lse=st.booleans(),
    return_is_top1=st.booleans(),
    bias=st.booleans(),
    poison=st.sampled_from(POISONS),
    seed=st.integers(0, 2**16),
)
def test_cross_entropy(
    reduction, label_smoothing, z_loss, softcap, logit_scale, num_items, return_lse, return_is_top1, bias, poison, seed
):
    if reduction != "mean":
        num_items = None
    x, w, b, t = _data(seed, poison, bias)

    def fn():
        xl, wl, bl = _leaves(x, w, b)
        n = torch.tensor(7.0, dtype=DT) if num_items == "tensor" else num_items
        out = memops.linear_cross_entropy(
            xl, wl, t, bl, reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
            logit_scale=logit_scale, num_items=n, return_lse=return_lse, return_is_top1=return_is_top1,
        )  # fmt: skip
        out = out if isinstance(out, tuple) else (out,)
        loss = out[0]
        scalar = loss if loss.dim() == 0 else (loss * torch.linspace(0.5, 1.5, loss.numel(), dtype=DT).view_as(loss))
        return [*out, *_grads(scalar.sum(), [xl, wl, bl])]

    _same(*_both(fn))


@memops.transform("_sync_free_weighted")
def _weighted(logits, target, weight, gamma=1.0):
    logp = torch.log_softmax(logits, -1).gather(1, target[:, None]).squeeze(1)
    return -weight * logp * (1 + gamma * logits.mean(-1).tanh())


@pytest.mark.parametrize("poison", [*POISONS, "nan_extra_ignored_row"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_transform(poison, reduction):
    x, w, b, t = _data(1, None if poison == "nan_extra_ignored_row" else poison)
    e = torch.rand(t.shape, dtype=DT, generator=torch.Generator().manual_seed(2))
    if poison == "nan_extra_ignored_row":
        e[0, 0] = float("nan")

    def fn():
        xl, wl, bl, el = _leaves(x, w, b, e)
        loss = memops.linear_loss(xl, wl, t, "_sync_free_weighted", bl, extras=[el], reduction=reduction, gamma=0.5)
        return [loss, *_grads((loss * loss.detach().cos()).sum(), [xl, wl, bl, el])]

    _same(*_both(fn))


@pytest.mark.parametrize("poison", POISONS)
@pytest.mark.parametrize("entropy,extras", [(False, ()), (True, ("log_sum_sq_probs", "mean_logits", "is_top1"))])
@pytest.mark.parametrize("kept", [None, "full", "kept"])
def test_logprobs(poison, entropy, extras, kept):
    """``kept``: with a sampling mask, the entropy over the vocabulary or the kept set."""
    x, w, b, t = _data(3, poison)
    t = t.clamp(min=0)
    g = torch.Generator().manual_seed(4)
    masked = {}
    if kept:
        ids = torch.randint(-1, V, (*t.shape, 4), generator=g)
        ids[..., 3] = ids[..., 0]
        masked = dict(sampling_mask=ids, entropy_over=kept)
    # with the kept entropy, a temperature per token too (its positivity check a device-side assert)
    temperature = torch.rand(t.shape, generator=g, dtype=DT) + 0.5 if kept == "kept" else 0.8
    g1 = torch.randn(t.shape, generator=g, dtype=DT) * (torch.rand(t.shape, generator=g) < 0.5)  # zeros: skipped
    g2 = torch.randn(t.shape, generator=g, dtype=DT) * (torch.rand(t.shape, generator=g) < 0.5)

    def fn():
        xl, wl, bl = _leaves(x, w, b)
        out = memops.linear_logprobs(
            xl, wl, t, bl, temperature=temperature, return_entropy=entropy, softcap=4.0, extras=extras, **masked
        )
        outs = list(out.values()) if isinstance(out, dict) else list(out) if isinstance(out, tuple) else [out]
        total = (outs[0] * g1).sum() + ((outs[1] * g2).sum() if entropy else 0)
        return [*outs, *_grads(total, [xl, wl, bl])]

    _same(*_both(fn))


GRPO_CASES = [
    dict(loss_type=lt, beta=beta, old=old, entropy_coef=ec)
    for lt, beta, old, ec in itertools.product(
        ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo"), (0.0, 0.04), (False, True), (0.0, 0.01)
    )
] + [
    dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.04, old=True),
    dict(loss_type="dapo", num_items=9, old=True),
    dict(loss_type="dapo", num_items="tensor", old=True),
    dict(loss_type="grpo", delta=2.0, old=True, use_bias_correction_kl=True, beta=0.04),
    dict(loss_type="dapo", old=True, kept=3),
    dict(loss_type="grpo", beta=0.04, old=False, entropy_coef=0.01, kept=5, entropy_over="kept"),
]


@pytest.mark.parametrize("poison", [None, "nan_masked_old", "inf_weight", "nan_ignored_row"])
@pytest.mark.parametrize("case", GRPO_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_grpo(case, poison):
    case = dict(case)
    x, w, b, t = _data(5, poison if poison in POISONS else None)
    mask = (t != -100).to(torch.int64)
    ids = t.clamp(min=0)
    g = torch.Generator().manual_seed(6)
    adv = torch.randn(2, generator=g, dtype=DT)
    old = torch.randn(ids.shape, generator=g, dtype=DT) * 0.1 - 2.0 if case.pop("old") else None
    if poison == "nan_masked_old":
        old = torch.full(ids.shape, -2.0, dtype=DT) if old is None else old
        old[0, 0] = float("nan")
    ref = torch.randn(ids.shape, generator=g, dtype=DT) * 0.1 - 2.0 if case.get("beta") else None
    if case.get("num_items") == "tensor":
        case["num_items"] = torch.tensor(9.0, dtype=DT)
    if "kept" in case:  # a sampling mask of K ids per token, -1 padding
        case["sampling_mask"] = torch.randint(-1, V, (*ids.shape, case.pop("kept")), generator=g)

    def fn():
        xl, wl, bl = _leaves(x, w, b)
        loss, metrics = memops.linear_grpo_loss(
            xl, wl, ids, mask, adv, bias=bl, old_logprobs=old, ref_logprobs=ref, temperature=0.9, **case
        )
        return [loss, *metrics.values(), *_grads(loss, [xl, wl, bl])]

    _same(*_both(fn))


@pytest.mark.parametrize("poison", POISONS)
@pytest.mark.parametrize(
    "case",
    [
        dict(beta=0.0),
        dict(beta=0.5, hard_label_weight=0.3),
        dict(beta=1.0, reduction="sum", softcap=3.0, teacher_softcap=2.0),
        dict(beta=0.5, reduction="none", return_entropy=True),
        dict(beta=0.0, num_items=5),
        dict(offline=True, beta=0.0),
        dict(offline=True, beta=0.0, hard_label_weight=0.5, reduction="none"),
    ],
    ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()),
)
def test_distillation(case, poison):
    case = dict(case)
    x, w, b, t = _data(7, poison)
    g = torch.Generator().manual_seed(8)
    teacher = {}
    if case.pop("offline", False):
        k = 4
        teacher["teacher_topk_ids"] = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(N)]).view(2, -1, k)
        teacher["teacher_topk_logprobs"] = torch.log_softmax(torch.randn(2, N // 2, k, generator=g, dtype=DT), -1)
    else:
        teacher["teacher_input"] = torch.randn(2, N // 2, D + 1, generator=g, dtype=DT)
        teacher["teacher_weight"] = torch.randn(V, D + 1, generator=g, dtype=DT)

    def fn():
        xl, wl, bl = _leaves(x, w, b)
        out = memops.linear_distillation_loss(xl, wl, t, student_bias=bl, temperature=1.3, **teacher, **case)
        out = out if isinstance(out, tuple) else (out,)
        loss = out[0]
        return [*out, *_grads((loss * loss.detach().cos()).sum(), [xl, wl, bl])]

    _same(*_both(fn))


@pytest.mark.parametrize("poison", POISONS)
@pytest.mark.parametrize(
    "case",
    [
        dict(),
        dict(reduction="sum", label_smoothing=0.1, depth_weights=[1.0, 0.4]),
        dict(reduction="none", z_loss=1e-3, softcap=3.0, packed=True),
        dict(num_items=7, packed=True, shifts=(0, 3)),
    ],
    ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "defaults",
)
def test_multi_token_prediction(case, poison):
    case = dict(case)
    x, w, b, t = _data(9, poison)
    hs = torch.stack([x, x.flip(1) * 0.5])  # two depths; the poison reaches both
    if case.pop("packed", False):
        pos = torch.arange(N // 2).repeat(2, 1)
        pos[1, 5:] -= 5
        case["position_ids"] = pos

    def fn():
        hl, wl, bl = _leaves(hs, w, b)
        loss, per_depth = memops.linear_mtp_cross_entropy(hl, wl, t, bl, **case)
        return [loss, per_depth, *_grads((loss * loss.detach().cos()).sum(), [hl, wl, bl])]

    _same(*_both(fn))


@pytest.mark.parametrize("poison", POISONS)
def test_vocab_parallel_cross_entropy(one_process_group, poison):
    x, w, b, t = _data(9, poison)

    def fn():
        xl, wl, bl = _leaves(x, w, b)
        loss, lse = vocab_parallel_cross_entropy(
            xl, wl, t, bl, vocab_start=0, vocab_size=V, label_smoothing=0.1, return_lse=True
        )
        return [loss, lse, *_grads(loss, [xl, wl, bl])]

    _same(*_both(fn))
    with memops.sync_free(), pytest.raises(ValueError, match="pass vocab_start and vocab_size"):
        vocab_parallel_cross_entropy(x, w, t, b)


def test_out_of_range_targets_raise_on_the_device():
    """Sync-free, an out-of-range target trips a device-side assert (on CPU: at once) naming the argument, not
    a silent loss; ignore_index still passes."""
    x, w, b, t = _data(10)
    for bad in (V, -1):
        t2 = t.clone()
        t2[1, 1] = bad
        with memops.sync_free(), pytest.raises(RuntimeError, match=r"a target value is out of range \[0, 11\)"):
            memops.linear_cross_entropy(x, w, t2, b)
    ids = t.clamp(min=0)
    ids[0, 2] = V
    with memops.sync_free(), pytest.raises(RuntimeError, match="completion_ids value is out of range"):
        memops.linear_grpo_loss(x, w, ids, torch.ones_like(ids), torch.zeros(2, dtype=DT))
    with memops.sync_free():
        memops.linear_cross_entropy(x, w, t, b)  # -100 is ignore_index


def test_settings():
    assert not memops.config.is_sync_free(torch.zeros(1))
    with memops.sync_free():
        assert memops.config.is_sync_free(torch.zeros(1))
        with memops.sync_free(False):
            assert not memops.config.is_sync_free(torch.zeros(1))
    memops.set_sync_free(True)
    try:
        assert memops.config.is_sync_free(torch.zeros(1))
    finally:
        memops.set_sync_free(False)
    with pytest.raises(TypeError, match="set_sync_free takes a bool"):
        memops.set_sync_free(1)


def _step(x, w, t, ids, mask, adv):
    ce = memops.linear_cross_entropy(x, w, t, label_smoothing=0.1, num_items=torch.tensor(5.0))
    grpo, metrics = memops.linear_grpo_loss(x, w, ids, mask, adv, loss_type="dapo")
    return ce + grpo + 0 * metrics["clip_ratio/region_mean"]


def _step_inputs(n: int):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(2, n, D, generator=g, requires_grad=True)
    w = torch.randn(V, D, generator=g, requires_grad=True)
    t = torch.randint(0, V, (2, n), generator=g)
    t[:, ::3] = -100
    return x, w, t, t.clamp(min=0), (t != -100).long(), torch.randn(2, generator=g)


def test_compile_fullgraph_dynamic_sync_free_compiles_once():
    """Sync-free, a step with cross-entropy and GRPO compiles with fullgraph=True, dynamic=True once for three
    token counts (the setting is read inside the ops' kernels and by the front ends; a fixed value traces
    one graph), gradients as eager's."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(_step, backend=counter, fullgraph=True, dynamic=True)
    first = None
    with memops.sync_free():
        for n in (5, 8, 13):
            args = _step_inputs(n)
            with torch._dynamo.config.patch(error_on_recompile=first is not None):
                got = torch.autograd.grad(compiled(*args), args[:2])
            first = counter.frame_count if first is None else first
            want = torch.autograd.grad(_step(*args), args[:2])
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert first >= 1 and counter.frame_count == first, "a new token count recompiled"
    torch._dynamo.reset()


def test_reduce_overhead_training_step_runs_on_cpu():
    """``torch.compile(mode="reduce-overhead")`` of a model whose forward returns memops' loss trains as eager
    (on CPU inductor has no CUDA graphs to capture: this is the compile path, the capture is the GPU check's,
    ``scripts/gpu_bench.sh``)."""

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(D, D)
            self.head = torch.nn.Linear(D, V, bias=False)

        def forward(self, x, t):
            return memops.linear_cross_entropy(torch.tanh(self.body(x)), self.head.weight, t)

    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = Model()
    compiled_model = Model()
    compiled_model.load_state_dict(eager.state_dict())
    step = torch.compile(compiled_model, mode="reduce-overhead")
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (eager, compiled_model)]
    for i in range(3):
        x, _, t, *_ = _step_inputs(7 + i)
        for fn, opt in zip((eager, step), opts):
            opt.zero_grad()
            fn(x.detach(), t).backward()
            opt.step()
    for a, b in zip(eager.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_the_backward_of_a_sync_free_forward_is_sync_free(plan_small_calls):
    """The mode of a forward holds for its backward, wherever autograd runs it (on CUDA a device thread of its
    own): here the backward runs after the block, with the counter on."""
    x, w, b, t = _data(11)
    xl, wl, bl = _leaves(x, w, b)
    with memops.sync_free():
        per_token = memops.linear_cross_entropy(xl, wl, t, bl, reduction="none")  # backward recomputes
        mean = memops.linear_cross_entropy(xl, wl, t, bl)  # donated gradients, scaled by the incoming one
        lp = memops.linear_logprobs(xl, wl, t.clamp(min=0), bl)
    with Syncs() as s:
        ((per_token * per_token.detach()).sum() + 3 * mean + lp.sum()).backward()
    assert s.seen == []
    assert not memops.config.is_sync_free(x)
    with Syncs() as s:  # the default path's backward, for contrast
        memops.linear_cross_entropy(xl, wl, t, bl, reduction="none").sum().backward()
    assert s.seen
