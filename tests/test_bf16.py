"""bf16 inputs: memops is at least as close to the float64 reference as the unfused bf16 eager code."""

from __future__ import annotations

import pytest
import torch
from reference import ref_linear_cross_entropy

import memops

OPTIONS = [dict(), dict(softcap=30.0, label_smoothing=0.1), dict(z_loss=1e-4, logit_scale=0.5)]


def _loss_and_grads(fn, x, w, b, t, **kw):
    x, w, b = (p.detach().requires_grad_(True) for p in (x, w, b))
    loss = fn(x, w, t, b, **kw)
    return (loss.detach(), *torch.autograd.grad(loss, (x, w, b)))


def _err(a, ref):
    """Relative error in the Frobenius norm."""
    return ((a.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_bf16_error_not_worse_than_unfused_bf16(opts, reduction):
    g = torch.Generator().manual_seed(0)
    n, d, v = 512, 128, 3001
    x = torch.randn(n, d, generator=g).bfloat16()
    w = (torch.randn(v, d, generator=g) / d**0.5).bfloat16()
    b = torch.randn(v, generator=g).bfloat16()
    t = torch.randint(0, v, (n,), generator=g)
    t[::7] = -100
    kw = dict(reduction=reduction, **opts)
    ref = _loss_and_grads(ref_linear_cross_entropy, x.double(), w.double(), b.double(), t, **kw)
    eager = _loss_and_grads(ref_linear_cross_entropy, x, w, b, t, **kw)
    fused = _loss_and_grads(memops.linear_cross_entropy, x, w, b, t, chunk_size=96, **kw)
    assert fused[0].dtype == torch.float32
    assert [f.dtype for f in fused[1:]] == [torch.bfloat16] * 3
    for name, f, e, r in zip(("loss", "grad_input", "grad_weight", "grad_bias"), fused, eager, ref):
        fe, ee = _err(f, r), _err(e, r)
        assert fe <= ee * 1.0 + 1e-12, f"{name}: memops error {fe:.3e} > unfused bf16 error {ee:.3e}"
