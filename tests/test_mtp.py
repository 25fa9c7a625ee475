"""Multi-token prediction (``memops.linear_mtp_cross_entropy``, ``memops/ops/mtp.py``) against ``D`` separate
float64 cross-entropies (``tests/reference.py::ref_mtp_cross_entropy``): loss, per-depth losses and every
gradient, over depths, shifts, weights, ignored targets, packed-sequence boundaries and every cross-entropy
option; the projection matmuls it runs; the errors it raises."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import ref_mtp_cross_entropy

import memops

V, H = 13, 6
TOL = dict(rtol=1e-10, atol=1e-11)


def _positions(g, rows: int, length: int, docs: bool):
    """Position ids of packed documents (restarts at random places) or None."""
    if not docs:
        return None
    pos = torch.empty(rows, length, dtype=torch.long)
    for r in range(rows):
        p = 0
        for t in range(length):
            if t and torch.rand((), generator=g) < 0.25:
                p = 0
            pos[r, t] = p
            p += 1
    return pos


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    depths=st.integers(1, 4),
    rows=st.integers(1, 3),
    length=st.integers(1, 9),
    seed=st.integers(0, 2**16),
    shifts=st.none() | st.lists(st.integers(0, 5), min_size=4, max_size=4),
    weights=st.none() | st.lists(st.floats(0.0, 2.0), min_size=4, max_size=4),
    docs=st.booleans(),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    options=st.fixed_dictionaries(
        {},
        optional={
            "label_smoothing": st.sampled_from([0.1, 0.3]),
            "z_loss": st.just(1e-2),
            "softcap": st.just(3.0),
            "logit_scale": st.just(0.7),
            "chunk_size": st.sampled_from([1, 3, 8]),
            "class_weight": st.just(True),
            "bias": st.just(True),
            "num_items": st.just(7.0),
        },
    ),
)
def test_equals_one_cross_entropy_per_depth(depths, rows, length, seed, shifts, weights, docs, reduction, options):
    g = torch.Generator().manual_seed(seed)
    opts = dict(options)
    hs = torch.randn(depths, rows, length, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64)
    b = torch.randn(V, generator=g, dtype=torch.float64) if opts.pop("bias", False) else None
    if opts.pop("class_weight", False):
        opts["class_weight"] = torch.rand(V, generator=g, dtype=torch.float64) + 0.5
    if reduction != "mean":
        opts.pop("num_items", None)
    chunk = opts.pop("chunk_size", None)
    t = torch.randint(0, V, (rows, length), generator=g)
    t[torch.rand(rows, length, generator=g) < 0.2] = -100
    pos = _positions(g, rows, length, docs)
    kw = dict(
        shifts=None if shifts is None else shifts[:depths],
        depth_weights=None if weights is None else weights[:depths],
        position_ids=pos,
        reduction=reduction,
        **opts,
    )
    leaves = [p for p in (hs, w, b) if p is not None]
    mine = [p.clone().requires_grad_() for p in leaves]
    ref = [p.clone().requires_grad_() for p in leaves]
    bias = mine[2] if b is not None else None
    loss, per_depth = memops.linear_mtp_cross_entropy(*mine[:2], t, bias, chunk_size=chunk, **kw)
    want, want_depth = ref_mtp_cross_entropy(*ref[:2], t, ref[2] if b is not None else None, **kw)
    torch.testing.assert_close(loss, want, equal_nan=True, **TOL)
    torch.testing.assert_close(per_depth, want_depth.detach(), equal_nan=True, **TOL)
    assert not per_depth.requires_grad
    grad = torch.randn(loss.shape, generator=g, dtype=torch.float64)
    if not torch.isfinite(want).all():
        return  # a depth with no counted target: NaN loss, as F.cross_entropy's mean over nothing
    got = torch.autograd.grad(loss, mine, grad)
    expected = torch.autograd.grad(want, ref, grad, allow_unused=True)
    for name, a, e in zip(("hiddens", "weight", "bias"), got, expected, strict=False):
        torch.testing.assert_close(a, torch.zeros_like(a) if e is None else e, msg=name, **TOL)


def test_a_list_of_depths_equals_the_stacked_tensor_and_defaults():
    g = torch.Generator().manual_seed(0)
    hs = [torch.randn(2, 5, H, generator=g) for _ in range(3)]
    w = torch.randn(V, H, generator=g)
    t = torch.randint(0, V, (2, 5), generator=g)
    a, pa = memops.linear_mtp_cross_entropy(hs, w, t)
    b, pb = memops.linear_mtp_cross_entropy(torch.stack(hs), w, t, shifts=(1, 2, 3), depth_weights=[1.0, 1.0, 1.0])
    assert torch.equal(a, b) and torch.equal(pa, pb)
    # the main depth (shift 1) is memops.linear_cross_entropy with shift=True
    main = memops.linear_cross_entropy(hs[0], w, t, shift=True)
    torch.testing.assert_close(pa[0], main, rtol=1e-6, atol=1e-6)


def test_depth_weights_as_a_tensor_change_without_a_recompile():
    from torch._dynamo.testing import CompileCounter

    g = torch.Generator().manual_seed(1)
    hs, w = torch.randn(2, 3, 6, H, generator=g), torch.randn(V, H, generator=g)
    t = torch.randint(0, V, (3, 6), generator=g)
    counter = CompileCounter()

    @torch.compile(backend=counter, fullgraph=True)
    def step(hs, w, t, dw):
        return memops.linear_mtp_cross_entropy(hs, w, t, depth_weights=dw)[0]

    for lam in (0.3, 0.1):
        dw = torch.tensor([1.0, lam])
        got = step(hs, w, t, dw)
        want = memops.linear_mtp_cross_entropy(hs, w, t, depth_weights=dw)[0]
        torch.testing.assert_close(got, want)
    assert counter.frame_count == 1


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_projection_matmuls(reduction):
    """A trained scalar loss: one pass with its gradients, three projection matmuls over every depth's rows (the
    unfused code's three per depth); ``reduction="none"``: the forward's logits, then the backward's three."""
    from helpers import MatmulFlops, projection_flops

    g = torch.Generator().manual_seed(3)
    hs = torch.randn(3, 2, 5, H, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, V, (2, 5), generator=g)
    with MatmulFlops() as flops:
        loss, _ = memops.linear_mtp_cross_entropy(hs, w, t, shifts=(0, 1, 2), reduction=reduction, chunk_size=4)
        torch.autograd.grad(loss.sum(), (hs, w))
    # every row of every depth (a call this small plans no skipping: memops/ops/plan.py), as the unfused code's
    rows = 3 * 10
    assert flops.flops == (3 if reduction == "mean" else 4) * projection_flops(rows, V, H)


def test_errors_name_the_argument():
    g = torch.Generator().manual_seed(2)
    hs, w = torch.randn(2, 3, 6, H, generator=g), torch.randn(V, H, generator=g)
    t = torch.randint(0, V, (3, 6), generator=g)
    with pytest.raises(ValueError, match="shifts has 1 entries but input holds 2 depths"):
        memops.linear_mtp_cross_entropy(hs, w, t, shifts=(1,))
    with pytest.raises(ValueError, match="shifts must hold one int >= 0 per depth"):
        memops.linear_mtp_cross_entropy(hs, w, t, shifts=(1, -1))
    with pytest.raises(TypeError, match="shifts must be an int"):
        memops.linear_mtp_cross_entropy(hs, w, t, shifts=(1, 2.0))
    with pytest.raises(ValueError, match=r"target shape \(3, 5\) must equal input's token shape \(3, 6\)"):
        memops.linear_mtp_cross_entropy(hs, w, t[:, :5])
    with pytest.raises(ValueError, match=r"depth_weight must be a float tensor of shape \[D\]=\[2\]"):
        memops.linear_mtp_cross_entropy(hs, w, t, depth_weights=[1.0])
    with pytest.raises(ValueError, match="input must have shape \\[D, \\*tokens, H\\]"):
        memops.linear_mtp_cross_entropy(hs[:, 0, 0], w, t[0, 0])
    with pytest.raises(ValueError, match="position_ids"):
        memops.linear_mtp_cross_entropy(hs, w, t, position_ids=torch.zeros(3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="target value 13 is out of range"):
        memops.linear_mtp_cross_entropy(hs, w, torch.full_like(t, V))
    with pytest.raises(ValueError, match="hiddens must hold at least one depth"):
        memops.linear_mtp_cross_entropy([], w, t)
    dw = torch.tensor([1.0, 0.5], requires_grad=True)
    with pytest.raises(ValueError, match="depth_weight"):
        memops.linear_mtp_cross_entropy(hs, w, t, depth_weights=dw)
