"""Low-precision inputs: memops is as close to a float64 reference as the unfused bf16/fp16 code, within a
stated margin, for chunk counts from 1 to 128.

The margin.  Both the unfused code and memops round every logit once to the input dtype (the output of
the logits matmul) and every gradient element once to the parameter dtype at the end; in between both
work in fp32 (memops' gradient matmuls take the fp32 logit gradient, so they round less than the unfused
code, which rounds it to the input dtype first).  The gradients are tensors of thousands of elements:
their error norms are sums of many independent roundings and the ratio of two such norms is stable; the
pipelines differ in the order of the fp32 sums inside the matmuls (memops' row chunks, its vocabulary
blocks), which puts an element on the other side of a rounding boundary now and then, moving the norm by a
fraction of a percent.  MARGIN allows 5%; a real loss of precision (a second rounding of the weight
gradient per chunk, say) costs tens of percent and fails.

The loss is one number: its error is the signed sum of the per-token errors, a random quantity whose
typical size is their root-sum-square.  Where the two pipelines round different things (with fp16 the
unfused code rounds the scaled logits once more than memops), their loss errors are two independent draws
of that sum and either may be the larger.  So the loss is compared against the larger of the unfused code's
error and the root-sum-square of its per-token errors (scaled like the reduction), times MARGIN.

Largest ratios observed over every case below on an AMD EPYC with AVX512-BF16, under ATEN_CPU_CAPABILITY
=default, avx2 and the native avx512, with 1 and 2 threads: 1.031 for the loss (fp16, z-loss and logit
scale), 0.963 for the gradients (memops' gradient matmuls round less); over seeds 1 to 5 (avx512): 1.011.
memops sums the per-row losses in float64 (``engine.reduce_rows``): with an fp32 sum the fp16 loss error
reached 1.12x.

Native low-precision GEMMs (``memops.config.set_cpu_gemm``; the default on CPUs with fast bf16 GEMMs, and
always off the CPU): the gradient GEMMs take ``d logits`` rounded to the input dtype, as the unfused code
does, and without an fp32-output low-precision GEMM on CPU each chunk's weight-gradient partial is rounded
to the input dtype before its fp32 sum, unless the chunk has fewer than ``engine.EXACT_PARTIAL_ROWS`` rows:
then its partial is computed in fp32 (rounding one bf16 partial per small chunk reached 2.5x the unfused
code's error on 8-row samples in 2-3-row chunks).  The stated bound for the weight gradient is then
WEIGHT_BOUND (1.5x the unfused code's error, 1 to 128 chunks, and many tiny chunks); loss, input and bias
gradient keep MARGIN.  Largest ratios observed on an Intel Xeon with AMX (native kernels): weight gradient
1.311 (bf16) and 1.304 (fp16), input gradient 1.000; tiny chunks on an AMD EPYC (AVX512-BF16): 1.23.
"""

from __future__ import annotations

import pytest
import torch
from reference import ref_linear_cross_entropy

import memops

MARGIN = 1.05
WEIGHT_BOUND = 1.5
OPTIONS = [dict(), dict(softcap=30.0, label_smoothing=0.1), dict(z_loss=1e-4, logit_scale=0.5)]
N = 512
CHUNKS = (N, 96, 16, N // 128)  # 1, 6, 32 and 128 chunks: the weight gradient accumulates over all of them


def _loss_and_grads(fn, x, w, b, t, **kw):
    x, w, b = (p.detach().requires_grad_(True) for p in (x, w, b))
    loss = fn(x, w, t, b, **kw)
    return (loss.detach(), *torch.autograd.grad(loss, (x, w, b)))


def _err(a, ref):
    """Relative error in the Frobenius norm."""
    return ((a.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    d, v = 128, 3001
    x = torch.randn(N, d, generator=g).to(dtype)
    w = (torch.randn(v, d, generator=g) / d**0.5).to(dtype)
    b = torch.randn(v, generator=g).to(dtype)
    t = torch.randint(0, v, (N,), generator=g)
    t[::7] = -100
    return x, w, b, t


def error_ratios(dtype, opts, reduction, seed=0, chunks=CHUNKS):
    """``{(quantity, chunks): memops error / its allowed scale}``: the unfused code's error for the
    gradients, the larger of that and the per-token error scale for the loss (see the module docstring)."""
    x, w, b, t = _inputs(dtype, seed)
    kw = dict(reduction=reduction, **opts)
    ref = _loss_and_grads(ref_linear_cross_entropy, x.double(), w.double(), b.double(), t, **kw)
    eager = _loss_and_grads(ref_linear_cross_entropy, x, w, b, t, **kw)
    per_token = dict(kw, reduction="none")
    tok_err = ref_linear_cross_entropy(x, w, t, b, **per_token).double() - ref_linear_cross_entropy(
        x.double(), w.double(), t, b.double(), **per_token
    )
    noise = tok_err.norm().item() / (int((t != -100).sum()) if reduction == "mean" else 1)
    out = {}
    for chunk in chunks:
        fused = _loss_and_grads(memops.linear_cross_entropy, x, w, b, t, chunk_size=chunk, **kw)
        assert fused[0].dtype == torch.float32
        assert [f.dtype for f in fused[1:]] == [dtype] * 3
        out["loss", N // chunk] = abs(fused[0].item() - ref[0].item()) / max(
            abs(eager[0].item() - ref[0].item()), noise
        )
        for name, f, e, r in zip(("grad_input", "grad_weight", "grad_bias"), fused[1:], eager[1:], ref[1:]):
            out[name, N // chunk] = _err(f, r) / _err(e, r)
    return out


@pytest.fixture(params=["fp32", "native"])
def cpu_gemm(request):
    """Both CPU gradient-GEMM paths, on any CPU (``native`` runs where the CPU has no fast ones, slowly)."""
    memops.config.set_cpu_gemm(request.param)
    yield request.param
    memops.config.set_cpu_gemm("auto")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_low_precision_error_within_margin_of_unfused(dtype, opts, reduction, cpu_gemm):
    for (name, chunks), ratio in error_ratios(dtype, opts, reduction).items():
        bound = WEIGHT_BOUND if (name == "grad_weight" and cpu_gemm == "native") else MARGIN
        assert ratio <= bound, f"{name}, {chunks} chunks, {cpu_gemm} GEMMs: memops error is {ratio:.4f}x its scale"


def test_native_cpu_gemm_is_decided_from_the_cpu_once():
    """``auto`` follows what torch reports of the CPU (bf16: AVX512-BF16 or AMX; fp16: AMX-FP16); fp32 and
    fp64 inputs never take the low-precision path; off the CPU it is always native."""
    from memops import config

    fast_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert config.fast_cpu_gemm(torch.bfloat16) == fast_bf16
    cpu = torch.device("cpu")
    assert config.native_gemm(torch.bfloat16, cpu) == fast_bf16
    assert not config.native_gemm(torch.float32, cpu) and not config.native_gemm(torch.float64, cpu)
    assert config.native_gemm(torch.bfloat16, torch.device("cuda"))
    config.set_cpu_gemm("fp32")
    try:
        assert not config.native_gemm(torch.bfloat16, cpu)
    finally:
        config.set_cpu_gemm("auto")
    with pytest.raises(ValueError, match="cpu gemm mode"):
        config.set_cpu_gemm("fast")


def test_many_tiny_chunks_keep_the_weight_gradient_within_the_bound():
    """8-row samples in chunks of 2 and 3 rows (torch's ``batch_chunk_size`` sample inputs), native
    low-precision GEMMs: each tiny chunk's weight-gradient partial is computed in fp32, so the weight
    gradient stays within WEIGHT_BOUND of the unfused bf16 code's error on every one of 300 random samples."""
    import torch.nn.functional as F

    def rel(a, ref):
        return ((a.double() - ref).norm() / ref.norm()).item()

    worst = 0.0
    memops.config.set_cpu_gemm("native")
    try:
        for seed in range(300):
            g = torch.Generator().manual_seed(seed)
            x, w = torch.randn(8, 8, generator=g), torch.randn(8, 8, generator=g) / 8**0.5
            t = torch.randint(0, 8, (8,), generator=g)
            w64 = w.double().requires_grad_()
            (exact,) = torch.autograd.grad(F.cross_entropy(x.double() @ w64.t(), t), w64)
            wl, xl = w.bfloat16().requires_grad_(), x.bfloat16()
            (unfused,) = torch.autograd.grad(F.cross_entropy((xl @ wl.t()).float(), t), wl)
            (ours,) = torch.autograd.grad(memops.linear_cross_entropy(xl, wl, t, chunk_size=2 + seed % 2), wl)
            worst = max(worst, rel(ours, exact) / max(rel(unfused, exact), 1e-12))
    finally:
        memops.config.set_cpu_gemm("auto")
    assert worst <= WEIGHT_BOUND, worst
