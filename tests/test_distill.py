"""``memops.linear_distillation_loss`` against the unfused float64 reference (TRL's generalized JSD)."""

from __future__ import annotations

import pytest
import torch
from helpers import MatmulFlops, backward_op_args, projection_flops
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import generalized_jsd, ref_distillation

import memops

IGNORE = -100


def _case(seed, lead, v, ds, dt, *, bias=False, teacher_bias=False, ignore=0.0, k=None, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, ds, generator=g, dtype=dtype)
    w = torch.randn(v, ds, generator=g, dtype=dtype) / ds**0.5 * 2
    b = torch.randn(v, generator=g, dtype=dtype) if bias else None
    t = torch.randint(0, v, lead, generator=g)
    t[torch.rand(lead, generator=g) < ignore] = IGNORE
    teacher = {}
    if k is None:
        teacher["xt"] = torch.randn(*lead, dt, generator=g, dtype=dtype)
        teacher["wt"] = torch.randn(v, dt, generator=g, dtype=dtype) / dt**0.5 * 2
        teacher["bt"] = torch.randn(v, generator=g, dtype=dtype) if teacher_bias else None
    else:
        scores = torch.rand(*lead, v, generator=g)
        teacher["ids"] = scores.topk(k, dim=-1).indices
        teacher["lps"] = torch.log_softmax(torch.randn(*lead, k, generator=g, dtype=dtype) * 2, -1) - 0.3
    return x, w, b, t, teacher


def _memops(x, w, b, t, teacher, **opts):
    return memops.linear_distillation_loss(
        x,
        w,
        t,
        teacher.get("xt"),
        teacher.get("wt"),
        student_bias=b,
        teacher_bias=teacher.get("bt"),
        teacher_topk_ids=teacher.get("ids"),
        teacher_topk_logprobs=teacher.get("lps"),
        **opts,
    )


def _reference(x, w, b, t, teacher, **opts):
    opts.pop("chunk_size", None)
    return ref_distillation(
        x,
        w,
        t,
        teacher.get("xt"),
        teacher.get("wt"),
        b=b,
        bt=teacher.get("bt"),
        ids=teacher.get("ids"),
        lps=teacher.get("lps"),
        **opts,
    )


def _grads(fn, x, w, b, out_grad=None):
    params = [p for p in (x, w, b) if p is not None]
    for p in params:
        p.grad = None
        p.requires_grad_(True)
    loss = fn()
    loss.backward(out_grad if out_grad is not None else None)
    return loss.detach(), [p.grad.clone() for p in params]


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    lead=st.sampled_from([(7,), (2, 5), (3, 1, 4), (0,)]),
    v=st.integers(1, 23),
    ds=st.integers(1, 9),
    dt=st.integers(1, 9),
    beta=st.sampled_from([0.0, 1.0, 0.5, 0.1, 0.93]),
    temperature=st.sampled_from([1.0, 0.7, 2.5]),
    hard=st.sampled_from([0.0, 0.3, 1.0]),
    ignore=st.sampled_from([0.0, 0.3, 1.0]),
    bias=st.booleans(),
    teacher_bias=st.booleans(),
    reduction=st.sampled_from(["batchmean", "sum", "none"]),
    offline=st.booleans(),
    k=st.integers(1, 5),
    chunk=st.sampled_from([None, 1, 3]),
    num_items=st.sampled_from([None, 5.0]),
    heads=st.sampled_from(
        [{}, {"logit_scale": 0.6, "teacher_softcap": 2.0}, {"softcap": 1.5, "teacher_logit_scale": 1.7}]
    ),
)
def test_matches_the_float64_reference(
    seed,
    lead,
    v,
    ds,
    dt,
    beta,
    temperature,
    hard,
    ignore,
    bias,
    teacher_bias,
    reduction,
    offline,
    k,
    chunk,
    num_items,
    heads,
):
    if offline:
        beta, k = 0.0, min(k, v)
    if reduction != "batchmean":
        num_items = None
    x, w, b, t, teacher = _case(
        seed, lead, v, ds, dt, bias=bias, teacher_bias=teacher_bias, ignore=ignore, k=k if offline else None
    )
    opts = dict(beta=beta, temperature=temperature, hard_label_weight=hard, reduction=reduction, num_items=num_items)
    opts.update({k: v for k, v in heads.items() if not (offline and k.startswith("teacher"))})
    g = torch.randn(lead, dtype=torch.float64) if reduction == "none" else None
    got, got_g = _grads(lambda: _memops(x, w, b, t, teacher, chunk_size=chunk, **opts), x, w, b, g)
    want, want_g = _grads(lambda: _reference(x, w, b, t, teacher, **opts), x, w, b, g)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, equal_nan=True)
    for a, c in zip(got_g, want_g):
        torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-11, equal_nan=True)
    _, ent = _memops(
        x.detach(),
        w.detach(),
        None if b is None else b.detach(),
        t,
        teacher,
        return_entropy=True,
        chunk_size=chunk,
        **opts,
    )
    _, want_ent = _reference(
        x.detach(), w.detach(), None if b is None else b.detach(), t, teacher, return_entropy=True, **opts
    )
    torch.testing.assert_close(ent, want_ent, rtol=1e-10, atol=1e-12)


def test_reference_matches_trls_formula_shape_for_shape():
    """The per-token reference is TRL's formula: beta 0 and 1 are the two KLs, between them the skewed JSD."""
    g = torch.Generator().manual_seed(3)
    s, u = torch.randn(4, 9, generator=g, dtype=torch.float64), torch.randn(4, 9, generator=g, dtype=torch.float64)
    ps, pt = torch.softmax(s, -1), torch.softmax(u, -1)
    torch.testing.assert_close(generalized_jsd(s, u, 0.0), (pt * (pt.log() - ps.log())).sum(-1))
    torch.testing.assert_close(generalized_jsd(s, u, 1.0), (ps * (ps.log() - pt.log())).sum(-1))
    m = 0.3 * pt + 0.7 * ps
    want = 0.3 * (pt * (pt.log() - m.log())).sum(-1) + 0.7 * (ps * (ps.log() - m.log())).sum(-1)
    torch.testing.assert_close(generalized_jsd(s, u, 0.3), want)


@pytest.mark.parametrize("offline", [False, True])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_gradcheck_float64(offline, reduction):
    x, w, b, t, teacher = _case(1, (2, 3), 7, 4, 5, bias=True, teacher_bias=True, ignore=0.2, k=3 if offline else None)
    beta = 0.0 if offline else 0.4

    def f(x, w, b):
        return _memops(
            x, w, b, t, teacher, beta=beta, temperature=1.3, hard_label_weight=0.25, reduction=reduction, chunk_size=2
        )

    assert torch.autograd.gradcheck(f, tuple(p.requires_grad_(True) for p in (x, w, b)))


def test_four_projection_matmuls_when_a_scalar_loss_is_trained():
    n, v, ds, dt = 96, 50, 16, 24
    x, w, b, t, teacher = _case(0, (n,), v, ds, dt, dtype=torch.float32)
    x.requires_grad_(True)
    w.requires_grad_(True)
    with MatmulFlops() as m:
        _memops(x, w, None, t, teacher, beta=0.5, hard_label_weight=0.1).backward()
    # student logits, teacher logits, input gradient, weight gradient
    assert m.flops == 3 * projection_flops(n, v, ds) + projection_flops(n, v, dt)
    with MatmulFlops() as m:
        loss = _memops(x, w, None, t, teacher, beta=0.5, reduction="none")
        loss.backward(torch.ones_like(loss))
    # per-token losses: both logits in forward; recomputed in backward, with the two gradient matmuls
    assert m.flops == 4 * projection_flops(n, v, ds) + 2 * projection_flops(n, v, dt)


@pytest.mark.usefixtures("plan_small_calls")
def test_ignored_tokens_cost_no_matmul_work():
    n, v, d = 64, 40, 8
    x, w, b, t, teacher = _case(0, (n,), v, d, d, dtype=torch.float32)
    t[n // 2 :] = IGNORE
    x.requires_grad_(True)
    with MatmulFlops() as m:
        _memops(x, w, None, t, teacher).backward()
    assert m.flops == 3 * projection_flops(n // 2, v, d)  # teacher logits, student logits, input gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_close_to_the_reference(dtype):
    x, w, b, t, teacher = _case(5, (64,), 300, 32, 48, bias=True, teacher_bias=True, ignore=0.1, dtype=dtype)
    opts = dict(beta=0.5, temperature=2.0, hard_label_weight=0.2)
    got, got_g = _grads(lambda: _memops(x, w, b, t, teacher, chunk_size=16, **opts), x, w, b)
    x64, w64, b64 = (p.detach().double() for p in (x, w, b))
    t64 = {k: (None if val is None else val.double()) for k, val in teacher.items()}
    want, want_g = _grads(lambda: _reference(x64, w64, b64, t, t64, **opts), x64, w64, b64)
    # the unfused low-precision code's own error, with a stated margin of 2x (different rounding order)
    ref_lp, ref_lp_g = _grads(lambda: _reference(x, w, b, t, teacher, **opts), x, w, b)
    assert (got.double() - want).abs() <= 2 * (ref_lp.double() - want).abs() + 1e-6
    for a, c, r in zip(got_g, want_g, ref_lp_g):
        assert (a.double() - c).norm() <= 2 * (r.double() - c).norm() + 1e-6


def test_opcheck_offline_and_online():
    for offline in (False, True):
        x, w, b, t, teacher = _case(
            2, (3, 4), 9, 5, 6, bias=True, teacher_bias=True, ignore=0.2, k=2 if offline else None, dtype=torch.float32
        )
        args = (
            x.requires_grad_(),
            w.requires_grad_(),
            t,
            b.requires_grad_(),
            teacher.get("xt"),
            teacher.get("wt"),
            teacher.get("bt"),
            teacher.get("ids"),
            teacher.get("lps"),
            None,
            0.0 if offline else 0.3,
            1.5,
            0.2,
            IGNORE,
            "batchmean",
            1.2,
            3.0,
            0.8,
            None if offline else 2.5,
            True,
            2,
            "accurate",
            [True, True, True],
        )
        torch.library.opcheck(torch.ops.memops.linear_distill.default, args)
        bargs = backward_op_args("linear_distill", args, [torch.tensor(0.7)])
        torch.library.opcheck(torch.ops.memops.linear_distill_backward.default, bargs)


def _errors_case():
    return _case(0, (2, 3), 9, 4, 5)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda kw: kw.update(teacher_weight=torch.randn(8, 5, dtype=torch.float64)), "share the vocabulary"),
        (lambda kw: kw.update(beta=1.5), "beta must be in [0, 1]"),
        (lambda kw: kw.update(beta=-0.1), "beta must be in [0, 1]"),
        (lambda kw: kw.update(temperature=0.0), "temperature must be > 0"),
        (lambda kw: kw.update(hard_label_weight=2.0), "hard_label_weight must be in [0, 1]"),
        (lambda kw: kw.update(teacher_input=None, teacher_weight=None), "give a teacher"),
        (
            lambda kw: kw.update(
                teacher_topk_ids=torch.zeros(2, 3, 2, dtype=torch.long), teacher_topk_logprobs=torch.zeros(2, 3, 2)
            ),
            "give one teacher",
        ),
        (lambda kw: kw.update(teacher_weight=None), "needs both teacher_input and teacher_weight"),
        (lambda kw: kw.update(teacher_input=torch.randn(2, 4, 5, dtype=torch.float64)), "teacher_input's leading"),
        (lambda kw: kw.update(reduction="mean"), "reduction must be one of ('batchmean', 'sum', 'none')"),
        (
            lambda kw: kw.update(teacher_weight=torch.randn(9, 5, dtype=torch.float64, requires_grad=True)),
            "teacher_weight requires grad",
        ),
        (lambda kw: kw.update(student_weight=torch.randn(9, 3, dtype=torch.float64)), "student_input's last dim"),
    ],
)
def test_errors_name_the_argument(change, message):
    x, w, b, t, teacher = _errors_case()
    kw = dict(student_input=x, student_weight=w, target=t, teacher_input=teacher["xt"], teacher_weight=teacher["wt"])
    change(kw)
    with pytest.raises(ValueError) as info:
        memops.linear_distillation_loss(**kw)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "ids_shape,lp_shape,message,kwargs",
    [
        ((2, 3), (2, 3), "teacher_topk_ids must have shape [..., k]", {}),
        ((2, 3, 2), (2, 3, 3), "teacher_topk_logprobs shape", {}),
        ((2, 3, 10), (2, 3, 10), "more than the vocabulary", {}),
        ((2, 3, 2), (2, 3, 2), "supports the forward KL only", {"beta": 0.5}),
        ((2, 3, 2), (2, 3, 2), "teacher_topk_ids value 9 is out of range", {"bad_id": True}),
    ],
)
def test_offline_teacher_errors(ids_shape, lp_shape, message, kwargs):
    x, w, b, t, _ = _errors_case()
    ids = torch.zeros(ids_shape, dtype=torch.long)
    if kwargs.pop("bad_id", False):
        ids[0, 0, 0] = 9
    lps = torch.zeros(lp_shape, dtype=torch.float64)
    with pytest.raises(ValueError) as info:
        memops.linear_distillation_loss(
            x, w, t, teacher_topk_ids=ids, teacher_topk_logprobs=lps, **{"beta": 0.0, **kwargs}
        )
    assert message in str(info.value)


def test_compile_fullgraph_dynamic_without_recompiles():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    f = torch.compile(_memops, backend=counter, fullgraph=True, dynamic=True)
    first = None
    for n in (6, 9, 14):
        x, w, b, t, teacher = _case(n, (n,), 13, 5, 7, bias=True, ignore=0.2, dtype=torch.float32)
        args = (x, w, b, t, teacher)
        with torch._dynamo.config.patch(error_on_recompile=first is not None):
            got, got_g = _grads(lambda a=args: f(*a, beta=0.5, hard_label_weight=0.1), x, w, b)
        first = counter.frame_count if first is None else first
        want, want_g = _grads(lambda a=args: _memops(*a, beta=0.5, hard_label_weight=0.1), x, w, b)
        torch.testing.assert_close(got, want)
        for a, c in zip(got_g, want_g):
            torch.testing.assert_close(a, c)
