"""What README's comparison with PyTorch's ``F.linear_cross_entropy`` says about it, checked on the installed
torch (the bench runs it as ``torch_lce``): it computes ignored tokens, falls back to the unfused reference
for label smoothing, breaks ``torch.compile(fullgraph=True)``, and exports."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import MatmulFlops

import memops

lce = getattr(F, "linear_cross_entropy", None)
pytestmark = pytest.mark.skipif(lce is None, reason="F.linear_cross_entropy needs torch >= 2.13")


def _inputs(n=64, d=16, v=50):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g, requires_grad=True)
    w = torch.randn(v, d, generator=g, requires_grad=True)
    t = torch.randint(0, v, (n,), generator=g)
    t[::2] = -100
    return x, w, t


def _chunked(x, w, t, **kw):
    if t.is_floating_point():  # probabilities: no ignore_index
        return lce(x, w, t, options=torch.nn.LinearCrossEntropyOptions(), **kw)
    return lce(x, w, t, ignore_index=-100, options=torch.nn.LinearCrossEntropyOptions(), **kw)


@pytest.mark.usefixtures("plan_small_calls")
def test_ignored_tokens_are_computed_by_torch_lce_and_skipped_by_memops():
    x, w, t = _inputs()
    n, d, v = x.shape[0], x.shape[1], w.shape[0]
    with MatmulFlops() as theirs:
        _chunked(x, w, t).backward()
    with MatmulFlops() as ours:
        memops.linear_cross_entropy(x, w, t).backward()
    assert theirs.flops == 3 * 2 * n * v * d
    assert ours.flops == 3 * 2 * (n // 2) * v * d


def test_torch_lce_label_smoothing_and_soft_targets_run_the_unfused_reference():
    x, w, t = _inputs()
    soft = torch.softmax(torch.randn(x.shape[0], w.shape[0]), -1)
    for target, kw in ((t, dict(label_smoothing=0.1)), (soft, {})):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _chunked(x, w, target, **kw)
        assert any("options`` ignored" in str(c.message) for c in caught), kw


def test_torch_lce_breaks_fullgraph_compile_and_memops_does_not():
    x, w, t = _inputs()
    torch._dynamo.reset()
    with pytest.raises(Exception, match="skipped"):
        torch.compile(_chunked, fullgraph=True, backend="aot_eager")(x, w, t)
    torch._dynamo.reset()
    loss = torch.compile(memops.linear_cross_entropy, fullgraph=True, backend="aot_eager")(x, w, t)
    torch.testing.assert_close(loss, _chunked(x, w, t))
    torch._dynamo.reset()


def test_torch_lce_exports():
    class Head(torch.nn.Module):
        def forward(self, x, w, t):
            return _chunked(x, w, t)

    x, w, t = _inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(Head(), (x.detach(), w.detach(), t))
    torch.testing.assert_close(ep.module()(x.detach(), w.detach(), t), _chunked(x, w, t).detach())
