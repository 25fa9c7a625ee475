"""torch.library.opcheck on every op and torch.autograd.gradcheck in float64."""

from __future__ import annotations

import pytest
import torch
from helpers import backward_op_args, op_args

import memops  # noqa: F401

IGNORE = -100


def _sample(n_lead=(5, 3), d=6, v=11, dtype=torch.float32, bias=True, noncontig=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if noncontig:
        x = torch.randn(*reversed(n_lead), d, generator=g, dtype=dtype).transpose(0, 1)
    else:
        x = torch.randn(*n_lead, d, generator=g, dtype=dtype)
    w = torch.randn(v, d, generator=g, dtype=dtype)
    b = torch.randn(v, generator=g, dtype=dtype) if bias else None
    t = torch.randint(0, v, tuple(x.shape[:-1]), generator=g)
    if t.numel():
        t.view(-1)[::4] = IGNORE
    return x, w, b, t


SAMPLES = {
    "fp32-bias": dict(),
    "fp64-nobias": dict(dtype=torch.float64, bias=False),
    "bf16": dict(dtype=torch.bfloat16),
    "empty": dict(n_lead=(0,)),
    "noncontig": dict(noncontig=True),
}
OPTIONS = {
    "mean": ("mean", 0.0, 0.0, None, 1.0, 0),
    "sum-ragged": ("sum", 0.1, 1e-3, 5.0, 0.7, 4),  # 15 rows in chunks of 4
    "none-ragged": ("none", 0.0, 1e-2, 2.0, 1.0, 7),
}


def _ce_op_args(x, w, t, b, num_items, opts, all_lse, top1, lse_grad, precision):
    """``memops::linear_ce``'s positional arguments for one OPTIONS entry."""
    reduction, ls, zl, cap, scale, chunk = OPTIONS[opts]
    return op_args(
        "linear_ce",
        input=x,
        weight=w,
        target=t,
        bias=b,
        num_items=num_items,
        ignore_index=IGNORE,
        reduction=reduction,
        label_smoothing=ls,
        z_loss=zl,
        softcap=cap,
        logit_scale=scale,
        chunk_size=chunk,
        all_lse=all_lse,
        return_is_top1=top1,
        lse_grad=lse_grad,
        precision=precision,
        grad_mask=[True, True, False, b is not None],
    )


@pytest.mark.parametrize("all_lse", [False, True], ids=["skip-ignored", "all-lse"])
@pytest.mark.parametrize("sample", list(SAMPLES))
@pytest.mark.parametrize("opts", list(OPTIONS))
def test_opcheck_linear_ce(sample, opts, all_lse):
    x, w, b, t = _sample(**SAMPLES[sample])
    x.requires_grad_(True)
    w.requires_grad_(True)
    if b is not None:
        b.requires_grad_(True)
    reduction, ls, zl, cap, scale, chunk = OPTIONS[opts]
    # opcheck compares without equal_nan: the mean over zero tokens (NaN) gets an explicit divisor
    num_items = torch.tensor(3.0) if (reduction == "mean" and t.numel() == 0) else None
    # lse_grad with all_lse: the lse differentiable, the gradients computed in backward
    args = _ce_op_args(x, w, t, b, num_items, opts, all_lse, not all_lse, all_lse, "reference")
    torch.library.opcheck(torch.ops.memops.linear_ce.default, args)


@pytest.mark.parametrize("sample", ["fp32-bias", "fp64-nobias", "empty"])
def test_opcheck_linear_ce_num_items_and_no_grad_mask(sample):
    x, w, b, t = _sample(**SAMPLES[sample])
    args = op_args(
        "linear_ce", input=x, weight=w, target=t, bias=b, num_items=torch.tensor(7.0), ignore_index=IGNORE,
        return_is_top1=True,
    )  # fmt: skip
    torch.library.opcheck(torch.ops.memops.linear_ce.default, args)


@pytest.mark.parametrize("sample", list(SAMPLES))
@pytest.mark.parametrize("opts", list(OPTIONS))
def test_opcheck_linear_ce_backward(sample, opts):
    x, w, b, t = _sample(**SAMPLES[sample])
    reduction, ls, zl, cap, scale, chunk = OPTIONS[opts]
    grad_loss = torch.randn(t.shape if reduction == "none" else ())
    num_items = torch.tensor(3.0) if (reduction == "mean" and t.numel() == 0) else None
    # the lse detached, then differentiable (lse_grad, with all_lse): its incoming gradient joins the loss's
    for lse_grad, grad_lse in ((False, None), (True, torch.randn(t.shape))):
        forward = _ce_op_args(x, w, t, b, num_items, opts, lse_grad, True, lse_grad, "accurate")
        args = backward_op_args("linear_ce", forward, [grad_loss, grad_lse])
        torch.library.opcheck(torch.ops.memops.linear_ce_backward.default, args)


GRAD_OPTIONS = [
    dict(),
    dict(label_smoothing=0.3),
    dict(z_loss=0.05),
    dict(softcap=1.5),
    dict(logit_scale=0.5),
    dict(num_items=6),
    dict(ignore_index=2),
    dict(label_smoothing=0.1, z_loss=0.01, softcap=3.0, logit_scale=2.0),
]


GRAD_CASES = [(r, o) for r in ("mean", "sum", "none") for o in GRAD_OPTIONS if r == "mean" or "num_items" not in o]


@pytest.mark.parametrize(
    "reduction,opts", GRAD_CASES, ids=lambda o: (",".join(o) or "plain") if isinstance(o, dict) else o
)
def test_gradcheck_float64(reduction, opts):
    x, w, b, t = _sample(n_lead=(3, 3), d=4, v=7, dtype=torch.float64, seed=1)
    t = torch.where(t == IGNORE, opts.get("ignore_index", IGNORE), t)
    for tensor in (x, w, b):
        tensor.requires_grad_(True)

    def f(x, w, b):
        return memops.linear_cross_entropy(x, w, t, b, reduction=reduction, chunk_size=4, **opts)

    assert torch.autograd.gradcheck(f, (x, w, b))


def test_a_direct_op_call_keeps_its_outputs_and_the_front_end_donates(monkeypatch):
    """Only the Python front ends hand the forward's gradient tensors to autograd (scaled in place, no
    copy); after a direct ``torch.ops.memops`` call every output stays as it was returned."""
    from memops.ops import family

    x, w, b, t = _sample()
    x, w, b = (p.requires_grad_(True) for p in (x, w, b))
    loss, lse, top1, grads = torch.ops.memops.linear_ce(
        x,
        w,
        t,
        b,
        None,
        None,
        IGNORE,
        "mean",
        0.1,
        1e-3,
        None,
        1.0,
        4,
        False,
        True,
        False,
        "reference",
        [True, True, False, True],
    )
    out = [loss, lse, top1, *grads]
    kept = [o.detach().clone() for o in out]
    (-2.5 * loss).backward()
    for o, k in zip(out, kept):
        assert torch.equal(o, k)
    handed = []
    take = family.take_precomputed
    monkeypatch.setattr(family, "take_precomputed", lambda *a: handed.append(take(*a)) or handed[-1])
    x.grad = w.grad = b.grad = None
    (-2.5 * memops.linear_cross_entropy(x, w, t, b, label_smoothing=0.1, z_loss=1e-3, chunk_size=4)).backward()
    assert len(handed) == 1 and handed[0] is not None  # donated: autograd got the forward's tensors
    torch.testing.assert_close(w.grad, -2.5 * kept[4])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("all_ignored_lse", [False, True])
def test_gradcheck_float64_differentiable_lse(reduction, all_ignored_lse):
    """``lse_grad=True``: loss and lse both differentiable (gradcheck of both outputs at once)."""
    x, w, b, t = _sample(n_lead=(3, 3), d=4, v=7, dtype=torch.float64, seed=2)
    for tensor in (x, w, b):
        tensor.requires_grad_(True)

    def f(x, w, b):
        return memops.linear_cross_entropy(
            x, w, t, b, reduction=reduction, chunk_size=4, z_loss=0.01, softcap=2.5, return_lse=True, lse_grad=True
        )

    assert torch.autograd.gradcheck(f, (x, w, b))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_and_opcheck_probability_targets(reduction):
    """Probability targets with class weights and label smoothing: gradcheck of input, weight, bias and the
    target in float64, and opcheck of the op and its backward op."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    p = torch.softmax(torch.randn(3, 2, 7, generator=g, dtype=torch.float64), -1).requires_grad_(True)
    cw = torch.rand(7, generator=g, dtype=torch.float64) + 0.5

    def f(x, w, b, p):
        return memops.linear_cross_entropy(
            x, w, p, b, reduction=reduction, label_smoothing=0.2, z_loss=0.01, class_weight=cw, chunk_size=4
        )

    assert torch.autograd.gradcheck(f, (x, w, b, p))
    args = (
        x,
        w,
        p,
        b,
        None,
        cw,
        IGNORE,
        reduction,
        0.2,
        0.01,
        None,
        1.0,
        4,
        False,
        False,
        False,
        "accurate",
        [True] * 4,
    )
    torch.library.opcheck(torch.ops.memops.linear_ce.default, args)
    grad_loss = torch.randn(p.shape[:-1] if reduction == "none" else (), generator=g, dtype=torch.float64)
    torch.library.opcheck(
        torch.ops.memops.linear_ce_backward.default, backward_op_args("linear_ce", args, [grad_loss, None])
    )
