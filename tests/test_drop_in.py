"""``memops.nn.functional.linear_cross_entropy`` / ``memops.nn.LinearCrossEntropyLoss`` against torch's own
``F.linear_cross_entropy`` / ``nn.LinearCrossEntropyLoss`` on torch's own test generators (the OpInfo sample
and error inputs of the installed torch): the signature, every value case (float64 and float32, loss and
every gradient), every refused input with torch's error type and message, and the module's parameters."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

import memops
from memops.nn import LinearCrossEntropyLoss
from memops.nn import functional as MF

theirs = getattr(F, "linear_cross_entropy", None)
pytestmark = pytest.mark.skipif(theirs is None, reason="torch.nn.functional.linear_cross_entropy needs torch >= 2.13")


def _params(fn):
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def test_signatures_and_defaults_are_torchs():
    assert _params(MF.linear_cross_entropy) == _params(theirs)
    assert _params(LinearCrossEntropyLoss.__init__) == _params(torch.nn.LinearCrossEntropyLoss.__init__)
    assert _params(LinearCrossEntropyLoss.forward) == _params(torch.nn.LinearCrossEntropyLoss.forward)
    assert memops.nn.functional is MF


def _ops():
    from torch.testing._internal.common_methods_invocations import op_db

    return [o for o in op_db if o.name == "nn.functional.linear_cross_entropy"]


def _samples(dtype):
    for op in _ops():
        for s in op.sample_inputs("cpu", dtype, requires_grad=True):
            yield op.variant_test_name, s


def _run(fn, x, w, t, kw):
    """Loss and its gradients (a per-token loss: of ``(loss * g).sum()``, ``g`` fixed uneven weights)."""
    leaves = [v for v in (x, w, kw.get("linear_bias"), t) if v is not None and v.requires_grad]
    loss = fn(x, w, t, **kw)
    g = torch.randn(loss.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(loss.dtype)
    total = (loss * g).sum() if loss.dim() else loss
    return loss, torch.autograd.grad(total, leaves)


def _double(kw):
    return {
        k: (
            v.detach().double().requires_grad_(v.requires_grad)
            if isinstance(v, torch.Tensor) and v.is_floating_point()
            else v
        )
        for k, v in kw.items()
    }


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torchs_sample_inputs(dtype):
    """Every sample torch tests its own function with: memops' drop-in (with the sample's ``options``)
    against torch's reference path (``options=None``).  float64: equal to 1e-10.  float32: both are
    compared with torch's reference in float64 on the same values, and memops' error must be at most
    twice torch's own fp32 error plus 1e-6 of the value's scale (the margin for two rounding errors).
    Gradients: input, linear weight, linear bias and a probability target, where they require grad."""
    count = soft = 0
    for variant, s in _samples(dtype):
        x, (w, t), kw = s.input, s.args, dict(s.kwargs)
        soft += bool(t.is_floating_point() and t.requires_grad)
        ref_kw = {k: v for k, v in kw.items() if k != "options"}
        want, want_g = _run(theirs, x, w, t, ref_kw)
        got, got_g = _run(MF.linear_cross_entropy, x, w, t, kw)
        msg = f"{variant}: input {tuple(x.shape)} weight {tuple(w.shape)} target {tuple(t.shape)} {ref_kw}"
        assert got.dtype == want.dtype and got.shape == want.shape, msg
        if dtype == torch.float64:
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=lambda m, s=msg: f"{s}: loss: {m}")
            for a, b in zip(got_g, want_g):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m, s=msg: f"{s}: grad: {m}")
        else:
            x64, w64 = (v.detach().double().requires_grad_(v.requires_grad) for v in (x, w))
            t64 = t.detach().double().requires_grad_(t.requires_grad) if t.is_floating_point() else t
            exact, exact_g = _run(theirs, x64, w64, t64, _double(ref_kw))
            for what, a, b, e in [("loss", got, want, exact), *(("grad", *g) for g in zip(got_g, want_g, exact_g))]:
                ours, torchs = (a.double() - e).abs().max().item(), (b.double() - e).abs().max().item()
                bound = 2 * torchs + 1e-6 * (1 + e.abs().max().item())
                assert ours <= bound, f"{msg}: {what}: memops error {ours:.3g} > 2 x torch's {torchs:.3g} + margin"
        count += 1
    assert count >= 300 and soft >= 100, (count, soft)


def test_torchs_error_inputs():
    from torch.testing._internal.common_methods_invocations import error_inputs_linear_cross_entropy

    n = 0
    for e in error_inputs_linear_cross_entropy(None, "cpu"):
        s = e.sample_input
        with pytest.raises(e.error_type, match=e.error_regex):
            MF.linear_cross_entropy(s.input, *s.args, **s.kwargs)
        with pytest.raises(ValueError, match=e.error_regex):  # memops' own error type too
            MF.linear_cross_entropy(s.input, *s.args, **s.kwargs)
        n += 1
    assert n >= 6


def test_torchs_module_error_inputs():
    """torch's own error cases of ``nn.LinearCrossEntropyLoss`` (a long target shaped like probabilities, a
    batch-size mismatch, unequal in_features, a class-weight shape), on the construction or the forward as
    torch has them: the same error types and messages from memops' module."""
    from torch.testing._internal.common_modules import (
        ModuleErrorEnum,
        module_error_inputs_torch_nn_LinearCrossEntropyLoss,
    )

    n = 0
    for e in module_error_inputs_torch_nn_LinearCrossEntropyLoss(None, "cpu", torch.float32, False, True):
        mi = e.module_error_input
        ctor = mi.constructor_input
        if e.error_on == ModuleErrorEnum.CONSTRUCTION_ERROR:
            with pytest.raises(e.error_type, match=e.error_regex):
                LinearCrossEntropyLoss(*ctor.args, **ctor.kwargs)
        else:
            module = LinearCrossEntropyLoss(*ctor.args, **ctor.kwargs)
            with pytest.raises(e.error_type, match=e.error_regex):
                module(*mi.forward_input.args, **mi.forward_input.kwargs)
        n += 1
    assert n >= 4


@pytest.mark.parametrize("out_features", [(), (3,), (2, 2)])
@pytest.mark.parametrize("probs", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_module_is_torchs_module(out_features, probs, reduction):
    """Same parameters (a state dict moves between the two), same loss and gradients, class weights,
    label smoothing and a bias included; ``options.batch_chunk_size`` becomes the chunk size."""
    torch.manual_seed(0)
    cw = torch.rand(7, dtype=torch.float64) + 0.5
    kw = dict(out_features=out_features, bias=True, dtype=torch.float64, reduction=reduction, weight=cw)
    kw["label_smoothing"] = 0.15
    ref = torch.nn.LinearCrossEntropyLoss(5, 7, **kw)
    ours = LinearCrossEntropyLoss(5, 7, **kw, options=torch.nn.LinearCrossEntropyOptions(batch_chunk_size=3))
    ours.load_state_dict(ref.state_dict())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    x = torch.randn(9, 5, dtype=torch.float64)
    if probs:
        t = torch.softmax(torch.randn(9, 7, *out_features, dtype=torch.float64), 1)
    else:
        t = torch.randint(0, 7, (9, *out_features))
        t[::4] = -100
    want = ref(x, t)
    got = ours(x, t)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    go = torch.randn(want.shape, dtype=torch.float64)
    for a, b in zip(
        torch.autograd.grad(got, list(ours.parameters()), go), torch.autograd.grad(want, list(ref.parameters()), go)
    ):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_class_weights_that_require_grad_are_refused():
    """memops computes no gradient for class weights: one that requires grad is an error, not a silent zero."""
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 3, dtype=torch.float64)
    cw = torch.rand(5, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="class_weight requires grad"):
        MF.linear_cross_entropy(x, w, torch.tensor([0, 1, 2, 3]), weight=cw)
    with torch.no_grad():  # nothing to differentiate: fine
        MF.linear_cross_entropy(x, w, torch.tensor([0, 1, 2, 3]), weight=cw)


def test_the_comparison_table_is_true():
    """docs/api.md's comparison table: every argument named in the memops column is a parameter of
    memops.linear_cross_entropy (and every parameter appears), every one in the torch column a parameter
    of the installed torch's F.linear_cross_entropy."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    section = text.split("### Compared with torch's, CCE's and Liger's fused cross-entropy", 1)[1]
    rows = [r for r in section.splitlines() if r.startswith("|")][2:]
    ours = set(inspect.signature(memops.linear_cross_entropy).parameters)
    torchs = set(inspect.signature(theirs).parameters)
    named_ours, named_torch = set(), set()
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 5, row
        named_ours |= set(re.findall(r"`(\w+)`", cells[1]))
        named_torch |= set(re.findall(r"`(\w+)`", cells[2]))
    assert named_ours <= ours, named_ours - ours
    assert named_torch <= torchs, named_torch - torchs
    assert ours - named_ours == set(), f"parameters missing from the table: {ours - named_ours}"
    assert torchs - named_torch == set(), f"torch parameters missing from the table: {torchs - named_torch}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("positions", [(3,), (24,), (2, 5)])
def test_k_dimensional_low_precision_input_gradient_within_the_unfused_error(dtype, positions):
    """A K-dimensional ``linear_weight`` makes one memops call per position; their input gradients are summed in
    fp32 and rounded once, so the input gradient's error against float64 stays within 1.5x the unfused
    low-precision code's (a stated margin: two rounding errors compared; autograd's low-precision sum of the
    positions' gradients reached 4.9x at 24 positions)."""

    def rel(a, ref):
        return ((a.double() - ref).norm() / ref.norm()).item()

    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        n, d, c = 64, 32, 16
        x = torch.randn(n, d, generator=g)
        w = torch.randn(c, *positions, d, generator=g) / d**0.5
        t = torch.randint(0, c, (n, *positions), generator=g)
        x64 = x.double().requires_grad_()
        (exact,) = torch.autograd.grad(F.linear_cross_entropy(x64, w.double(), t), x64)
        xl, wl = x.to(dtype).requires_grad_(), w.to(dtype)
        (unfused,) = torch.autograd.grad(F.linear_cross_entropy(xl, wl, t), xl)
        (ours,) = torch.autograd.grad(MF.linear_cross_entropy(xl, wl, t), xl)
        assert ours.dtype == dtype
        assert rel(ours, exact) <= 1.5 * rel(unfused, exact), (seed, rel(ours, exact), rel(unfused, exact))
