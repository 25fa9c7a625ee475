"""memops.linear_cross_entropy against the unfused float64 reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from reference import ref_linear_cross_entropy, ref_logits

import memops

IGNORE = -100
PRIMES_AND_SMALL = [1, 2, 3, 5, 7, 13, 31, 61, 97, 127, 211]


def _grads(loss, tensors, grad_out):
    tensors = [t for t in tensors if t is not None and t.requires_grad]
    if not tensors:
        return []
    return list(torch.autograd.grad(loss, tensors, grad_out, allow_unused=False))


def _assert_close(a, b, tol, what):
    assert a.shape == b.shape, f"{what}: shape {a.shape} vs {b.shape}"
    torch.testing.assert_close(a, b, rtol=tol, atol=tol, equal_nan=True, msg=lambda m: f"{what}: {m}")


@st.composite
def ce_case(draw):
    n = draw(st.integers(0, 300))
    d = draw(st.integers(1, 24))
    v = draw(st.sampled_from(PRIMES_AND_SMALL) | st.integers(1, 160))
    three_d = draw(st.booleans()) and n > 0
    lead = (n,)
    if three_d:
        b = draw(st.sampled_from([k for k in range(1, 6) if n % k == 0]))
        lead = (b, n // b)
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    opts = dict(
        reduction=reduction,
        label_smoothing=draw(st.sampled_from([0.0, 0.1]) | st.floats(0.0, 1.0)),
        z_loss=draw(st.sampled_from([0.0, 1e-3]) | st.floats(0.0, 0.1)),
        softcap=draw(st.none() | st.floats(0.5, 30.0)),
        logit_scale=draw(st.sampled_from([1.0]) | st.floats(0.1, 3.0)),
        chunk_size=draw(st.none() | st.integers(1, 350)),
        ignore_index=draw(st.sampled_from([IGNORE, -1, 0])),
    )
    if reduction == "mean" and draw(st.booleans()):
        opts["num_items"] = draw(st.integers(1, 400) | st.integers(1, 400).map(torch.tensor))
    ignore_p = draw(st.sampled_from([0.0, 0.3, 1.0]))
    return dict(
        lead=lead,
        d=d,
        v=v,
        opts=opts,
        ignore_p=ignore_p,
        bias=draw(st.booleans()),
        int32=draw(st.booleans()),
        needs=draw(st.sampled_from([(1, 1, 1), (1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 1, 1)])),
        seed=draw(st.integers(0, 2**16)),
        class_weight=draw(st.sampled_from([None, "rand", "zeros_some"])),
        probs=draw(st.sampled_from([False, False, True])),
    )


def _make(case, dtype=torch.float64):
    g = torch.Generator().manual_seed(case["seed"])
    lead, d, v = case["lead"], case["d"], case["v"]
    x = torch.randn(*lead, d, generator=g, dtype=dtype)
    w = torch.randn(v, d, generator=g, dtype=dtype) / math.sqrt(d)
    b = torch.randn(v, generator=g, dtype=dtype) if case["bias"] else None
    t = torch.randint(0, v, lead, generator=g)
    ign = case["opts"]["ignore_index"]
    if ign < 0 or ign >= v:
        mask = torch.rand(lead, generator=g) < case["ignore_p"]
        t = torch.where(mask, torch.full_like(t, ign), t)
    if case["int32"]:
        t = t.int()
    if case.get("probs"):  # probability targets: some rows one-hot, some with exact zeros
        t = torch.softmax(3 * torch.randn(*lead, v, generator=g, dtype=dtype), -1)
        t = torch.where(torch.rand(*lead, v, generator=g) < 0.2, 0.0, t).to(dtype)
        t.requires_grad_(case["needs"][0] == 1)  # the target's gradient too
    cw = case.get("class_weight")
    if cw is not None:
        cw = torch.rand(v, generator=g, dtype=dtype) * 2
        if case["class_weight"] == "zeros_some":
            cw = torch.where(torch.rand(v, generator=g) < 0.3, 0.0, cw)
        case["opts"]["class_weight"] = cw
    for tensor, need in zip((x, w, b), case["needs"]):
        if tensor is not None:
            tensor.requires_grad_(bool(need))
    return x, w, b, t


@given(ce_case())
def test_matches_reference_float64(case):
    x, w, b, t = _make(case)
    opts = case["opts"]
    ref = ref_linear_cross_entropy(x, w, t, b, **{k: v for k, v in opts.items() if k != "chunk_size"})
    out = memops.linear_cross_entropy(x, w, t, b, **opts)
    _assert_close(out, ref, 1e-9, "loss")
    if not any(tt is not None and tt.requires_grad for tt in (x, w, b, t)):
        return
    go = torch.randn_like(ref)
    for name, a, r in zip("xwbt", _grads(out, (x, w, b, t), go), _grads(ref, (x, w, b, t), go)):
        _assert_close(a, r, 1e-9, f"grad {name}")


@given(ce_case())
def test_matches_reference_float32_inputs(case):
    """fp32 inputs: memops in fp32 vs the reference on the same values in float64."""
    x, w, b, t = _make(case, torch.float32)
    opts = case["opts"]
    x64, w64 = x.detach().double().requires_grad_(x.requires_grad), w.detach().double().requires_grad_(w.requires_grad)
    b64 = None if b is None else b.detach().double().requires_grad_(b.requires_grad)
    t64 = t.detach().double().requires_grad_(t.requires_grad) if t.is_floating_point() else t
    kw = {k: (v.double() if k == "class_weight" and v is not None else v) for k, v in opts.items() if k != "chunk_size"}
    ref = ref_linear_cross_entropy(x64, w64, t64, b64, **kw)
    out = memops.linear_cross_entropy(x, w, t, b, **opts)
    assert out.dtype == torch.float32
    scale = 1.0 + (ref.abs().max().item() if ref.numel() and ref.isfinite().all() else 0.0)
    _assert_close(out.double(), ref, 1e-5 * scale, "loss")
    if not any(tt is not None and tt.requires_grad for tt in (x, w, b, t)):
        return
    go = torch.randn_like(ref)
    for name, a, r in zip("xwbt", _grads(out, (x, w, b, t), go.float()), _grads(ref, (x64, w64, b64, t64), go)):
        assert a.dtype == torch.float32
        finite = r[r.isfinite()]
        _assert_close(
            a.double(), r, 1e-4 * (1.0 + (finite.abs().max().item() if finite.numel() else 0.0)), f"grad {name}"
        )


def test_empty_input_matches_reference():
    for reduction in ["mean", "sum", "none"]:
        x = torch.randn(0, 5, dtype=torch.float64, requires_grad=True)
        w = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
        t = torch.zeros(0, dtype=torch.long)
        ref = ref_linear_cross_entropy(x, w, t, reduction=reduction)
        out = memops.linear_cross_entropy(x, w, t, reduction=reduction)
        _assert_close(out, ref, 0, reduction)
        if reduction != "none":
            gr = torch.autograd.grad(ref, (x, w))
            go = torch.autograd.grad(out, (x, w))
            for a, r in zip(go, gr):
                _assert_close(a, r, 0, "grad")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_all_ignored_matches_reference(reduction, label_smoothing):
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    t = torch.full((4, 3), IGNORE)
    kw = dict(reduction=reduction, label_smoothing=label_smoothing)
    ref = ref_linear_cross_entropy(x, w, t, **kw)
    out = memops.linear_cross_entropy(x, w, t, **kw)
    _assert_close(out, ref, 0, "loss")  # mean: NaN (0/0) like the reference
    go = torch.ones_like(ref)
    for a, r in zip(torch.autograd.grad(out, (x, w), go), torch.autograd.grad(ref, (x, w), go)):
        _assert_close(a, r, 0, "grad")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_non_finite_inputs_propagate_like_reference(bad, reduction):
    x = torch.randn(6, 4, dtype=torch.float64)
    x[2, 1] = bad  # a non-ignored row
    x[4, 0] = bad  # an ignored row
    x.requires_grad_(True)
    w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 1, 2, 3, IGNORE, 4])
    ref = ref_linear_cross_entropy(x, w, t, reduction=reduction)
    out = memops.linear_cross_entropy(x, w, t, reduction=reduction, chunk_size=4)
    _assert_close(out, ref, 1e-12, "loss")
    go = torch.ones_like(ref)
    for a, r in zip(torch.autograd.grad(out, (x, w), go), torch.autograd.grad(ref, (x, w), go)):
        assert torch.equal(a.isnan(), r.isnan())
        _assert_close(a, r, 1e-12, "grad")


def test_return_lse_is_per_token_logsumexp():
    x = torch.randn(2, 9, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 6, dtype=torch.float64)
    t = torch.randint(0, 11, (2, 9))
    loss, lse = memops.linear_cross_entropy(x, w, t, softcap=2.0, return_lse=True, chunk_size=4)
    logits = 2.0 * torch.tanh((x @ w.T) / 2.0)
    _assert_close(lse, torch.logsumexp(logits, -1).detach(), 1e-12, "lse")
    assert not lse.requires_grad and loss.requires_grad


def test_module_matches_function():
    x = torch.randn(3, 4, 8, requires_grad=True)
    w = torch.randn(13, 8, requires_grad=True)
    t = torch.randint(0, 13, (3, 4))
    mod = memops.LinearCrossEntropy(label_smoothing=0.1, z_loss=1e-3, softcap=5.0, chunk_size=5)
    a = mod(x, w, t)
    b = memops.linear_cross_entropy(x, w, t, label_smoothing=0.1, z_loss=1e-3, softcap=5.0)
    torch.testing.assert_close(a, b)
    assert "softcap=5.0" in repr(mod)


def test_non_contiguous_input_and_weight():
    base = torch.randn(8, 20, 3, dtype=torch.float64)
    x = base.transpose(0, 1)[..., :]  # [20, 8, 3], non-contiguous
    wbase = torch.randn(3, 17, dtype=torch.float64, requires_grad=True)
    w = wbase.T  # [17, 3], non-contiguous
    t = torch.randint(0, 17, (20, 8))
    x.requires_grad_(True)
    ref = ref_linear_cross_entropy(x, w, t)
    out = memops.linear_cross_entropy(x, w, t, chunk_size=7)
    _assert_close(out, ref, 1e-12, "loss")
    for a, r in zip(torch.autograd.grad(out, (x, wbase)), torch.autograd.grad(ref, (x, wbase))):
        _assert_close(a, r, 1e-12, "grad")


def test_global_chunk_settings_do_not_change_results():
    x = torch.randn(50, 6, dtype=torch.float64)
    w = torch.randn(9, 6, dtype=torch.float64)
    t = torch.randint(0, 9, (50,))
    ref = ref_linear_cross_entropy(x, w, t, reduction="none")
    with memops.chunking(chunk_size=3):
        a = memops.linear_cross_entropy(x, w, t, reduction="none")
    with memops.chunking(budget_bytes=1):
        b = memops.linear_cross_entropy(x, w, t, reduction="none")
    _assert_close(a, ref, 1e-12, "pinned")
    _assert_close(b, ref, 1e-12, "budget")
    with pytest.raises(ValueError, match="chunk_size"):
        memops.set_chunk_size(0)


def test_chunk_rows_follow_budget():
    from memops import config

    cpu = torch.device("cpu")
    big = config.chunk_rows(100_000, 128_000, 4096, torch.float32, cpu)
    small_v = config.chunk_rows(100_000, 1_000, 4096, torch.float32, cpu)
    assert small_v > big  # a smaller vocab buys more rows under the same budget
    assert config.chunk_rows(5, 128_000, 4096, torch.float32, cpu) == 5  # never more than the rows
    assert config.chunk_rows(1000, 10, 10, torch.float32, cpu, requested=7) == 7
    with memops.chunking(budget_bytes=1 << 30):
        assert config.chunk_rows(100_000, 128_000, 4096, torch.float32, cpu) > big
    # budget-sized chunks are balanced: 4096 rows at V=32000 in 5 equal chunks, not 4 full ones and a stub
    per_row = 32000 * 4 + 2 * 1024 * 4
    with memops.chunking(budget_bytes=862 * per_row):
        assert config.chunk_rows(4096, 32000, 1024, torch.float32, cpu) == 820


def test_chunks_are_sized_by_what_each_path_allocates():
    """A fused (Triton) head holds one bf16 logits row per row; the torch heads an fp32 row and its bf16 cast."""
    from memops import config

    dev = torch.device("meta")  # an explicit budget: no device query, no CPU raise
    n, d, v = 16384, 4096, 128256
    with memops.chunking(budget_bytes=2 << 30):  # the H200's default budget (1/32 of its memory, capped)
        fused = config.chunk_rows(n, v, d, torch.bfloat16, dev, fused=True)
        torch_heads = config.chunk_rows(n, v, d, torch.bfloat16, dev)
        fp32 = config.chunk_rows(n, v, d, torch.float32, dev, fused=True)
        assert fp32 == config.chunk_rows(n, v, d, torch.float32, dev)  # fp32 inputs: one fp32 row either way
    assert (2 << 30) // (v * 2 + 2 * d * 2) == 7869 and fused == 5462  # 3 balanced chunks
    assert (2 << 30) // (v * (4 + 2) + 2 * d * 2) == 2732 and torch_heads == 2731  # 6 balanced chunks
    # the engine sizes its buffer the same way: a fused bf16 run at this budget makes 3 chunks
    from memops.ops import engine

    calls = []
    x = torch.zeros(192, 8, dtype=torch.bfloat16)
    w = torch.zeros(64, 8, dtype=torch.bfloat16)
    per_row = 64 * 2 + 2 * 8 * 2
    with memops.chunking(budget_bytes=64 * per_row):
        engine.run(x, w, None, lambda z, sel: calls.append(z.shape) and None, fused=True)
    assert calls == [torch.Size([64, 64])] * 3
    with memops.chunking(budget_bytes=64 * per_row):  # the torch heads: an fp32 row and a bf16 row each
        assert 64 * per_row // (64 * 6 + 32) == 24
        assert config.chunk_rows(192, 64, 8, torch.bfloat16, torch.device("cpu")) == 24


def test_default_cpu_chunks_amortise_the_weight_pass():
    from memops import config

    cpu = torch.device("cpu")
    # V=128256: the 112 MiB budget alone gives 225 rows; raised towards 512, at most a fifth of the rows
    assert config.chunk_rows(2048, 128256, 1024, torch.float32, cpu) == 410  # 5 chunks
    assert config.chunk_rows(16384, 128256, 1024, torch.float32, cpu) == 512
    assert config.chunk_rows(512, 128256, 1024, torch.float32, cpu) == 171  # 3 chunks: a fifth, balanced
    assert config.chunk_rows(4096, 32000, 1024, torch.float32, cpu) == 820  # the budget gives more already
    # an explicit budget is a memory bound: no raise
    with memops.chunking(budget_bytes=112 << 20):
        assert config.chunk_rows(2048, 128256, 1024, torch.float32, cpu) == 205  # 225 balanced over 10


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_backward_twice_with_retain_graph(reduction):
    x = torch.randn(30, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 9, (30,))
    out = memops.linear_cross_entropy(x, w, t, b, reduction=reduction, chunk_size=7)
    ref = ref_linear_cross_entropy(x, w, t, b, reduction=reduction)
    for scale in (2.0, 1.0, -3.0):  # the first call scales in place; later calls must not reuse that
        go = torch.tensor(scale, dtype=torch.float64)
        got = torch.autograd.grad(out, (x, w, b), go, retain_graph=True)
        want = torch.autograd.grad(ref, (x, w, b), go, retain_graph=True)
        for a, r in zip(got, want):
            _assert_close(a, r, 1e-12, f"grad at scale {scale}")


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_ignored_row_overflowing_to_inf_matches_reference(softcap):
    # finite inputs whose logits overflow: the reference's gradients turn NaN, memops' too
    x = torch.randn(5, 4, dtype=torch.float64)
    w = torch.randn(6, 4, dtype=torch.float64).abs()
    x[3] = torch.tensor([1e308, 1e308, 0.0, 0.0], dtype=torch.float64)
    x.requires_grad_(True)
    w.requires_grad_(True)
    t = torch.tensor([0, 1, 2, IGNORE, 4])
    ref = ref_linear_cross_entropy(x, w, t, softcap=softcap)
    out = memops.linear_cross_entropy(x, w, t, softcap=softcap, chunk_size=2)
    _assert_close(out, ref, 1e-12, "loss")
    for a, r in zip(torch.autograd.grad(out, (x, w)), torch.autograd.grad(ref, (x, w))):
        assert torch.equal(a.isnan(), r.isnan())
        _assert_close(a, r, 1e-12, "grad")


def test_return_lse_of_ignored_tokens_is_their_logsumexp():
    x = torch.randn(7, 5, dtype=torch.float64)
    w = torch.randn(9, 5, dtype=torch.float64)
    t = torch.tensor([1, IGNORE, 2, IGNORE, IGNORE, 0, 8])
    loss, lse = memops.linear_cross_entropy(x, w, t, return_lse=True, chunk_size=3)
    _assert_close(lse, torch.logsumexp(x @ w.T, -1), 1e-12, "lse")
    _assert_close(loss, ref_linear_cross_entropy(x, w, t), 1e-12, "loss")


@pytest.mark.parametrize("opts", [{}, {"softcap": 2.0, "logit_scale": 0.7}, {"return_lse": True}])
def test_return_is_top1_is_the_argmax_accuracy(opts):
    """Per-token argmax-correctness from the same pass (TRL's SFT ``mean_token_accuracy``): False at ignored
    tokens, a tie with an earlier token not top-1 (``argmax``'s first maximum).  Small integer inputs make
    every logit exact, so ties are exact however the matmuls are blocked."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-2, 3, (3, 40, 8), generator=g).double()
    w = torch.randint(-2, 3, (13, 8), generator=g).double()
    w[12] = w[11]  # tokens 11 and 12 tie everywhere: 12 is never top-1
    t = torch.randint(0, 13, (3, 40), generator=g)
    z = ref_logits(x, w, softcap=opts.get("softcap"), logit_scale=opts.get("logit_scale", 1.0))
    t[0, :10] = z[0, :10].argmax(-1)  # some hits
    t[1, :5] = -100
    t[2, :5] = 12
    z = ref_logits(x, w, softcap=opts.get("softcap"), logit_scale=opts.get("logit_scale", 1.0))
    out = memops.linear_cross_entropy(x, w, t, return_is_top1=True, chunk_size=7, **opts)
    loss, top1 = out[0], out[-1]
    want = (z.argmax(-1) == t) & (t != -100)
    assert top1.dtype == torch.bool and torch.equal(top1, want)
    assert not top1[2, :5].any() and top1[0, :10].all() and top1.any() and not top1.all()
    torch.testing.assert_close(
        loss, memops.linear_cross_entropy(x, w, t, **opts) if "return_lse" not in opts else out[0]
    )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("class_weight", [False, True])
@pytest.mark.parametrize("loss_used", [True, False])
def test_differentiable_lse_trains_a_users_own_term(reduction, class_weight, loss_used):
    """``lse_grad=True``: a term of the user's own on the returned lse (here a z-loss-like square) gets its
    gradient (``softmax`` per row) with the loss's, against the reference's ``torch.logsumexp``; ignored
    tokens' lse is theirs too (return_lse), and a call whose loss is unused trains the lse term alone.
    One forward projection plus the three of the backward: four projection-sized matmuls."""
    from helpers import MatmulFlops, projection_flops

    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 6, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 9, (3, 5), generator=g)
    t[0, :2] = IGNORE
    cw = torch.rand(9, generator=g, dtype=torch.float64) + 0.5 if class_weight else None
    opts = dict(reduction=reduction, label_smoothing=0.1, softcap=4.0, class_weight=cw, chunk_size=4)
    with MatmulFlops() as flops:
        loss, lse = memops.linear_cross_entropy(x, w, t, b, return_lse=True, lse_grad=True, **opts)
        obj = 0.3 * (lse.square() * torch.cos(lse.detach())).sum() + (
            (loss * torch.cos(loss.detach())).sum() if loss_used else 0
        )
        got = torch.autograd.grad(obj, (x, w, b))
    assert flops.flops == 4 * projection_flops(15, 9, 6)
    ref = ref_linear_cross_entropy(x, w, t, b, **{k: v for k, v in opts.items() if k != "chunk_size"})
    ref_lse = torch.logsumexp(ref_logits(x, w, b, softcap=4.0), dim=-1)
    _assert_close(loss, ref, 1e-12, "loss")
    _assert_close(lse, ref_lse, 1e-12, "lse")
    obj = 0.3 * (ref_lse.square() * torch.cos(ref_lse.detach())).sum() + (
        (ref * torch.cos(ref.detach())).sum() if loss_used else 0
    )
    for name, a, r in zip("xwb", got, torch.autograd.grad(obj, (x, w, b))):
        _assert_close(a, r, 1e-12, f"grad {name}")


def test_lse_is_detached_unless_asked_and_lse_grad_needs_return_lse():
    x, w = torch.randn(4, 3, requires_grad=True), torch.randn(5, 3)
    t = torch.tensor([0, 1, 2, 3])
    _, lse = memops.linear_cross_entropy(x, w, t, return_lse=True)
    assert not lse.requires_grad
    with pytest.raises(ValueError, match="lse_grad=True needs return_lse=True"):
        memops.linear_cross_entropy(x, w, t, lse_grad=True)


class _Allocations(torch.utils._python_dispatch.TorchDispatchMode):
    """The shapes of every tensor an aten op returns (views included)."""

    observes_only = True

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (list, tuple)) else [out]:
            if isinstance(o, torch.Tensor):
                self.shapes.append((str(func), tuple(o.shape), o.untyped_storage().data_ptr()))
        return out


@pytest.mark.parametrize("k", [1, 2, 7])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_shift_pairs_each_position_with_a_later_target_without_copying_the_hidden_states(k, reduction):
    """``shift=k``: position ``i`` with ``target[..., i + k]`` (CCE's ``shift``), equal to slicing
    ``input[..., :-k, :]`` and ``target[..., k:]`` (float64), the last ``k`` positions' input gradient 0,
    per-token outputs ``T - k`` long; no op makes a tensor of the sliced hidden states' shape, a copy
    slicing makes (``[B, T - k, D]`` is not contiguous in ``[B, T, D]``)."""
    g = torch.Generator().manual_seed(k)
    B, T, D, V = 3, 7, 5, 11
    x = torch.randn(B, T, D, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, D, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, V, (B, T), generator=g)
    t[1, 3] = IGNORE
    with _Allocations() as seen:
        out = memops.linear_cross_entropy(
            x, w, t, shift=k, reduction=reduction, return_lse=True, return_is_top1=True, z_loss=1e-2
        )
    loss, lse, top1 = out
    sliced = [s for s in seen.shapes if s[1] in ((B, T - k, D), (B * (T - k), D))]
    assert sliced == [], sliced
    ref = ref_linear_cross_entropy(x[:, : T - k], w, t[:, k:], reduction=reduction, z_loss=1e-2)
    _assert_close(loss, ref, 1e-12, "loss")
    assert lse.shape == top1.shape == (B, max(T - k, 0))
    ref_lse = torch.logsumexp(ref_logits(x[:, : T - k], w), dim=-1)
    _assert_close(lse, ref_lse, 1e-12, "lse")
    go = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    gx, gw = torch.autograd.grad(loss, (x, w), go)
    rx, rw = torch.autograd.grad(ref, (x, w), go)
    _assert_close(gx, rx, 1e-12, "grad input")  # the reference's slice backward puts zeros at the end
    _assert_close(gw, rw, 1e-12, "grad weight")
    assert torch.equal(memops.linear_cross_entropy(x, w, t, shift=True), memops.linear_cross_entropy(x, w, t, shift=1))
    with pytest.raises(ValueError, match="shift must be a bool or an int >= 0"):
        memops.linear_cross_entropy(x, w, t, shift=-1)


def test_weighted_mean_over_zero_target_weight_is_nan_like_torch():
    """Class weights, label smoothing, every non-ignored target of weight 0: torch divides the nll part by a
    zero weight sum (0 / 0), so the loss and every non-ignored row's gradient are NaN, not the smoothing
    term's +-inf (hypothesis found it)."""
    x = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    w = torch.randn(2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 1, 1, 0, 1, 0])
    cw = torch.tensor([1.5, 0.0], dtype=torch.float64)
    opts = dict(ignore_index=0, label_smoothing=0.1)
    ref = torch.nn.functional.cross_entropy(x @ w.t(), t, weight=cw, **opts)
    out = memops.linear_cross_entropy(x, w, t, class_weight=cw, **opts)
    assert ref.isnan() and out.isnan()
    (g_ref,) = torch.autograd.grad(ref, x)
    (g,) = torch.autograd.grad(out, x)
    torch.testing.assert_close(g, g_ref, equal_nan=True)


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_autocast_does_not_change_the_ops_dtypes(chunk_size):
    """memops computes in its inputs' dtype: under CPU autocast (bf16) an fp32 call gives the same loss and
    gradients as outside it (one chunk, where the GEMMs allocate their results, and several)."""
    g = torch.Generator().manual_seed(0)
    x, w, t = torch.randn(8, 16, generator=g), torch.randn(32, 16, generator=g), torch.randint(0, 32, (8,), generator=g)
    runs = []
    for autocast in (False, True):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = memops.linear_cross_entropy(xi, wi, t, chunk_size=chunk_size)
        loss.backward()
        runs.append((loss, xi.grad, wi.grad))
    for a, b in zip(*runs):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0)
