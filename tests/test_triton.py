"""The Triton chunk heads (``memops/ops/triton_heads.py``) on CPU tensors under the Triton interpreter
(``conftest.py`` sets ``TRITON_INTERPRET=1``): equal to the torch heads and to the float64 reference for
cross-entropy, log-probs and GRPO, and proven to have run (``LAUNCHES``).

Tolerances.  fp64 and fp32 runs compare with the float64 reference at the precision the torch-head tests
use, and with the torch heads.  bf16 runs compare with the torch heads: both read the same bf16 logits (the
projection GEMM's output) and do fp32 math on them, so forward values agree to fp32 rounding; the Triton
head rounds ``d logits`` to bf16 for native gradient GEMMs (as the unfused code does) where the torch heads
on CPU keep it fp32, so gradients agree to the bound of that one rounding (``_BF16``).  bf16 accuracy
against float64 is the norm-wise margin of ``tests/test_bf16.py`` (memops' error at most 1.05x the unfused
bf16 code's), checked for the Triton heads in the ``*_error_within_margin_of_unfused`` tests below.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import subprocess
import sys
import textwrap
from unittest import mock

import pytest
import test_bf16
import test_grpo
import test_linear_ce
import test_logprobs
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import ref_grpo_loss, ref_linear_cross_entropy, ref_linear_logprobs, ref_logits, ref_logprob_extras
from torch.utils._python_dispatch import TorchDispatchMode

import memops
from memops.ops import triton_heads


def _interpreter_numpy_bug() -> str | None:
    """Why the interpreter cannot run these kernels here, or None.  triton 3.6's interpreter passes a runtime
    scalar argument to ``range()`` as a 1-element numpy array, and numpy 2.4 stopped converting those to a Python
    int ("only 0-dimensional arrays can be converted to Python scalars"): every kernel's ``for start in range(0,
    V, BLOCK)`` fails.  triton 3.7+ passes a scalar; compiled kernels (a GPU) never use numpy."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    import numpy
    import triton

    old_triton = tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 7)
    new_numpy = tuple(int(p) for p in numpy.__version__.split(".")[:2]) >= (2, 4)
    if old_triton and new_numpy:
        return (
            f"triton {triton.__version__}'s interpreter with numpy {numpy.__version__}: range() over a runtime "
            "scalar gets a 1-element array, which numpy >= 2.4 refuses to convert (install numpy<2.4 to run these "
            "tests with this triton, or triton>=3.7)"
        )
    return None


# the non-finite cases make numpy, which runs the interpreted kernels, warn about NaN arithmetic: expected
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning"),
    pytest.mark.skipif(_interpreter_numpy_bug() is not None, reason=str(_interpreter_numpy_bug())),
]

IGNORE = -100
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# the interpreter runs each kernel as Python: fewer examples than elsewhere (MEMOPS_TRITON_EXAMPLES to raise)
SMALL = settings(max_examples=int(os.environ.get("MEMOPS_TRITON_EXAMPLES", min(settings.default.max_examples, 25))))


@contextlib.contextmanager
def triton_path(block: int = 32, expect: bool | None = True):
    """Run the Triton heads with vocabulary tiles of ``block`` (so rows span several tiles) and check they
    launched (``expect``) or did not (``None``: either)."""
    before = sum(triton_heads.LAUNCHES.values())
    old = triton_heads.BLOCK_MAX
    triton_heads.BLOCK_MAX = block
    try:
        with memops.kernels("triton"):
            yield
    finally:
        triton_heads.BLOCK_MAX = old
    launched = sum(triton_heads.LAUNCHES.values()) - before
    assert expect is None or (launched > 0) == expect, f"{launched} Triton launches"


def _close(a, b, tol, what):
    assert a.shape == b.shape, f"{what}: shape {a.shape} vs {b.shape}"
    torch.testing.assert_close(a, b, rtol=tol, atol=tol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def _grads(out, tensors, grad_out=None):
    tensors = [t for t in tensors if t is not None and t.requires_grad]
    return list(torch.autograd.grad(out, tensors, grad_out)) if tensors else []


def _tol(dtype, ref, pair: bool = False, grad: bool = False) -> float:
    """Against the float64 reference, or (``pair``) Triton heads against torch heads; ``grad``: a gradient."""
    scale = 1.0 + (ref.abs().max().item() if ref.numel() and ref.isfinite().all() else 0.0)
    if dtype in (torch.bfloat16, torch.float16):
        assert pair, "bf16 / fp16 are compared with the torch heads here, with float64 in the margin tests"
        return (_BF16 if grad else 4e-6) * scale
    if pair:
        return {torch.float64: 1e-12, torch.float32: 4e-6}[dtype] * scale
    return {torch.float64: 1e-9, torch.float32: 2e-5}[dtype] * scale


# bf16: one rounding of d logits (relative 2^-9) moves a gradient element by at most 2^-9 of the sum of
# |terms| it is made of; with O(1) inputs that sum is within a few times the largest gradient element.
# Another 2^-8 for the output's own rounding; 2^-6 in all leaves a margin of 2 over both.
_BF16 = 2.0**-6


# ---- cross-entropy -------------------------------------------------------------------------------------


@st.composite
def ce_case(draw):
    n = draw(st.integers(0, 6))
    return dict(
        lead=draw(st.sampled_from([(n,), (1, n), (n, 1)])),
        d=draw(st.integers(1, 6)),
        v=draw(st.sampled_from([1, 2, 31, 32, 33, 64, 100]) | st.integers(1, 130)),
        block=draw(st.sampled_from([32, 128])),
        dtype=draw(st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16])),
        opts=dict(
            reduction=draw(st.sampled_from(["mean", "sum", "none"])),
            label_smoothing=draw(st.sampled_from([0.0, 0.1]) | st.floats(0.0, 1.0)),
            z_loss=draw(st.sampled_from([0.0, 1e-3]) | st.floats(0.0, 0.1)),
            softcap=draw(st.none() | st.floats(0.5, 30.0)),
            logit_scale=draw(st.sampled_from([1.0]) | st.floats(0.1, 3.0)),
            chunk_size=draw(st.none() | st.integers(1, 8)),
            ignore_index=draw(st.sampled_from([IGNORE, 0])),
        ),
        ignore_p=draw(st.sampled_from([0.0, 0.3, 1.0])),
        bias=draw(st.booleans()),
        needs=draw(st.sampled_from([(1, 1, 1), (1, 0, 0), (0, 1, 1), (0, 0, 0)])),
        seed=draw(st.integers(0, 2**16)),
    )


def _ce_inputs(case):
    g = torch.Generator().manual_seed(case["seed"])
    lead, d, v, dtype = case["lead"], case["d"], case["v"], case["dtype"]
    x = torch.randn(*lead, d, generator=g, dtype=torch.float64)
    w = torch.randn(v, d, generator=g, dtype=torch.float64) * (2 / math.sqrt(d))
    b = torch.randn(v, generator=g, dtype=torch.float64) if case["bias"] else None
    t = torch.randint(0, v, lead, generator=g)
    ign = case["opts"]["ignore_index"]
    if ign < 0:
        t = torch.where(torch.rand(lead, generator=g) < case["ignore_p"], torch.full_like(t, ign), t)
    x, w = x.to(dtype), w.to(dtype)
    b = None if b is None else b.to(dtype)
    return x, w, b, t


def _ce_run(case, x, w, b, t):
    """(loss, lse, top1, grads) of memops with the current heads."""
    x, w = x.detach().to(DEVICE), w.detach().to(DEVICE)
    b = None if b is None else b.detach().to(DEVICE)
    for p, need in zip((x, w, b), case["needs"]):
        if p is not None:
            p.requires_grad_(bool(need))
    loss, lse, top1 = memops.linear_cross_entropy(
        x, w, t.to(DEVICE), b, return_lse=True, return_is_top1=True, **case["opts"]
    )
    go = (
        torch.ones_like(loss)
        if loss.dim() == 0
        else torch.linspace(-1, 2, loss.numel(), dtype=torch.float64).view(loss.shape)
    )
    return loss, lse, top1, _grads(loss, (x, w, b), go.to(loss)) if loss.requires_grad else []


@SMALL
@given(ce_case())
def test_ce_triton_heads_match_torch_heads_and_reference(case):
    x, w, b, t = _ce_inputs(case)
    dtype = case["dtype"]
    with triton_path(case["block"], expect=t.numel() > 0):  # every row computed: its lse is asked for
        ours = _ce_run(case, x, w, b, t)
    with memops.kernels("torch"):
        theirs = _ce_run(case, x, w, b, t)
    x64, w64, b64 = (None if p is None else p.double() for p in (x, w, b))
    for p, need in zip((x64, w64, b64), case["needs"]):
        if p is not None:
            p.requires_grad_(bool(need))
    opts = {k: v for k, v in case["opts"].items() if k != "chunk_size"}
    ref = ref_linear_cross_entropy(x64, w64, t, b64, **opts)
    ref_lse = torch.logsumexp(ref_logits(x64, w64, b64, softcap=opts["softcap"], logit_scale=opts["logit_scale"]), -1)
    low = dtype in (torch.bfloat16, torch.float16)
    if not low:
        _close(ours[0].cpu().double(), ref.detach(), _tol(dtype, ref), "loss")
        _close(ours[1].cpu().double(), ref_lse.detach(), _tol(dtype, ref_lse), "lse")
    _close(ours[0], theirs[0], _tol(dtype, ref, pair=True), "loss vs torch heads")
    _close(ours[1], theirs[1], _tol(dtype, ref_lse, pair=True), "lse vs torch heads")
    valid = t != case["opts"]["ignore_index"]
    assert torch.equal(ours[2].cpu()[valid], theirs[2].cpu()[valid])
    assert not ours[2].cpu()[~valid].any()
    if not ours[3]:
        return
    go = torch.ones_like(ref) if ref.dim() == 0 else torch.linspace(-1, 2, ref.numel(), dtype=ref.dtype).view(ref.shape)
    names = [n for n, p, need in zip("xwb", (x, w, b), case["needs"]) if p is not None and need]
    for name, a, th, r in zip(names, ours[3], theirs[3], _grads(ref, (x64, w64, b64), go)):
        assert a.dtype == dtype
        if not low:
            _close(a.cpu().double(), r, _tol(dtype, r, grad=True), f"grad {name}")
        _close(a.cpu().double(), th.cpu().double(), _tol(dtype, r, pair=True, grad=True), f"grad {name} vs torch")


@pytest.mark.parametrize("opts", test_bf16.OPTIONS[:2], ids=lambda o: ",".join(o) or "plain")
def test_bf16_error_within_margin_of_unfused(opts):
    """The norm-wise bound of tests/test_bf16.py (memops' error at most 1.05x the unfused bf16 code's, both
    against float64) holds for the Triton head, with one chunk and with 32."""
    with triton_path(block=4096):
        ratios = test_bf16.error_ratios(torch.bfloat16, opts, "mean", chunks=(test_bf16.N, 16))
    for (name, chunks), ratio in ratios.items():
        assert ratio <= test_bf16.MARGIN, f"{name}, {chunks} chunks: error {ratio:.4f}x its allowed scale"


# the torch-head tests of non-finite and edge inputs, rerun on the Triton heads: NaN patterns included
REUSED = {
    "ce_non_finite": (test_linear_ce.test_non_finite_inputs_propagate_like_reference, None),
    "ce_ignored_row_overflowing": (test_linear_ce.test_ignored_row_overflowing_to_inf_matches_reference, None),
    "ce_is_top1": (test_linear_ce.test_return_is_top1_is_the_argmax_accuracy, None),
    "ce_lse_of_ignored": (test_linear_ce.test_return_lse_of_ignored_tokens_is_their_logsumexp, {}),
    "ce_all_ignored": (test_linear_ce.test_all_ignored_matches_reference, None),
    "grpo_masked_non_finite": (test_grpo.test_masked_token_with_non_finite_terms_matches_reference, None),
    "grpo_random_extremes": (test_grpo.test_masked_tokens_with_random_extreme_terms_match_reference, {}),
    "logprobs_zero_gradient_non_finite": (
        test_logprobs.test_zero_gradient_token_with_non_finite_logits_matches_reference,
        None,
    ),
}


def _param_sets(fn, grid):
    if grid is None:  # the test's own pytest parametrization
        marks = [m for m in getattr(fn, "pytestmark", []) if m.name == "parametrize"]
        grid = {m.args[0]: list(m.args[1]) for m in marks}
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


@pytest.mark.parametrize("name", sorted(REUSED))
def test_edge_cases_of_the_torch_heads_hold_on_the_triton_heads(name, monkeypatch):
    from memops.ops import plan

    fn, grid = REUSED[name]
    for kw in _param_sets(fn, grid):
        with triton_path(block=8):  # small calls: every row computed
            fn(**kw)
        if name == "ce_all_ignored":  # planned, no row is computed: nothing may launch
            with monkeypatch.context() as m:
                m.setattr(plan, "PLAN_MIN_MACS", 0)
                with triton_path(block=8, expect=False):
                    fn(**kw)


@pytest.mark.parametrize(
    "row",
    [
        [0.5, float("inf"), -1.0, float("inf"), 2.0],  # +inf max, no NaN: lse +inf
        [0.5, float("inf"), float("nan"), 1.0, 2.0],  # +inf and NaN: NaN
        [float("-inf")] * 5,  # every logit -inf: lse -inf
        [float("nan"), 0.5, -1.0, 3.0, 2.0],  # NaN first
        [0.5, -1.0, 3.0, 2.0, float("nan")],  # NaN in the last tile
        [0.5, float("-inf"), 3.0, 2.0, -4.0],  # finite max with a -inf
    ],
)
def test_non_finite_rows_across_tiles(row):
    """A row's NaN / inf pattern spread over several tiles (tile 2): the Triton heads' lse is
    ``torch.logsumexp``'s, their loss, log-prob, entropy and top-1 are the reference's (the row's NaN is read
    from the sum of exponentials, not counted per tile)."""
    logits = torch.tensor(row, dtype=torch.float64)
    x = torch.zeros(2, 3, dtype=torch.float64)
    w = torch.zeros(5, 3, dtype=torch.float64)  # logits = bias exactly, in every row
    t = torch.tensor([1, 3])
    want_lse = torch.logsumexp(logits, 0)
    ref_loss = F.cross_entropy(logits.expand(2, 5), t, reduction="none")
    ref_lp, ref_ent = ref_linear_logprobs(x, w, t, logits)
    with triton_path(block=2):
        loss, lse, top1 = memops.linear_cross_entropy(
            x, w, t, logits, reduction="none", return_lse=True, return_is_top1=True
        )
        lp, ent = memops.linear_logprobs(x, w, t, logits, return_entropy=True)
    torch.testing.assert_close(lse, want_lse.expand(2), equal_nan=True, rtol=0, atol=1e-12)
    torch.testing.assert_close(loss, ref_loss, equal_nan=True, rtol=0, atol=1e-12)
    torch.testing.assert_close(lp, ref_lp, equal_nan=True, rtol=0, atol=1e-12)
    torch.testing.assert_close(ent, ref_ent, equal_nan=True, rtol=0, atol=1e-12)
    assert torch.equal(top1, logits.expand(2, 5).argmax(1) == t)


# ---- log-probs and GRPO -------------------------------------------------------------------------------


def _batch(draw, vocab, blocks, dtypes) -> dict:
    """The draws log-probs and GRPO share: ``[B, T]`` tokens, hidden size, vocabulary, tile, dtype, bias."""
    return dict(
        lead=(draw(st.integers(1, 3)), draw(st.integers(1, 5))),
        d=draw(st.integers(1, 6)),
        v=draw(st.sampled_from(vocab) | st.integers(1, 130)),
        block=draw(st.sampled_from(blocks)),
        dtype=draw(st.sampled_from(dtypes)),
        bias=draw(st.booleans()),
    )


@st.composite
def logprob_case(draw):
    return dict(
        **_batch(
            draw, [1, 2, 31, 33, 100], [16, 32, 128], [torch.float64, torch.float32, torch.bfloat16, torch.float16]
        ),
        temperature=draw(st.sampled_from([1.0, 0.7]) | st.floats(0.05, 4.0)),
        logit_scale=draw(st.sampled_from([1.0, 0.5, 1.7])),
        softcap=draw(st.sampled_from([None, 2.0, 30.0])),
        chunk_size=draw(st.none() | st.integers(1, 8)),
        entropy=draw(st.booleans()),
        extras=draw(st.sampled_from([(), ("mean_logits", "is_top1", "log_sum_sq_probs")])),
        zero_grads=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def _lp_inputs(case, g):
    (b, t), d, v = case["lead"], case["d"], case["v"]
    x = torch.randn(b, t, d, generator=g, dtype=torch.float64)
    w = torch.randn(v, d, generator=g, dtype=torch.float64) * (2 / math.sqrt(d))
    bias = torch.randn(v, generator=g, dtype=torch.float64) if case["bias"] else None
    ids = torch.randint(0, v, (b, t), generator=g)
    return x, w, bias, ids


@SMALL
@given(logprob_case())
def test_logprobs_triton_heads_match_torch_heads_and_reference(case):
    g = torch.Generator().manual_seed(case["seed"])
    x, w, bias, ids = _lp_inputs(case, g)
    dtype = case["dtype"]
    kw = dict(temperature=case["temperature"], logit_scale=case["logit_scale"], softcap=case["softcap"])
    go1 = torch.randn(ids.shape, generator=g, dtype=torch.float64)
    go2 = torch.randn(ids.shape, generator=g, dtype=torch.float64)
    if case["zero_grads"]:
        go1[0] = 0.0
        go2[:, -1] = 0.0

    def run(xx, ww, bb, ref=False):
        xx, ww = xx.detach().requires_grad_(True), ww.detach().requires_grad_(True)
        bb = None if bb is None else bb.detach().requires_grad_(True)
        if ref:
            logp, ent = ref_linear_logprobs(xx, ww, ids, bb, **kw)
            out = {"log_probs": logp, "entropy": ent, **ref_logprob_extras(xx, ww, ids, bb, **kw)}
        else:
            out = memops.linear_logprobs(
                xx, ww, ids, bb, return_entropy=True, extras=case["extras"], chunk_size=case["chunk_size"], **kw
            )
            if not isinstance(out, dict):
                out = {"log_probs": out[0], "entropy": out[1]}
        total = (out["log_probs"] * go1.to(out["log_probs"])).sum()
        if case["entropy"]:
            total = total + (out["entropy"] * go2.to(out["entropy"])).sum()
        return out, _grads(total, (xx, ww, bb))

    cast = [None if p is None else p.to(dtype) for p in (x, w, bias)]
    with triton_path(case["block"]):
        ours = run(*cast)
    with memops.kernels("torch"):
        theirs = run(*cast)
    ref = run(*[None if p is None else p.double() for p in cast], ref=True)
    low = dtype in (torch.bfloat16, torch.float16)
    for key, value in ours[0].items():
        if key == "is_top1":
            assert torch.equal(value, theirs[0][key])
            continue
        r = ref[0][key].detach()
        if not low:
            _close(value.double(), r, _tol(dtype, r), key)
        _close(value.double(), theirs[0][key].double(), _tol(dtype, r, pair=True), f"{key} vs torch heads")
    for name, a, th, r in zip("xwb", ours[1], theirs[1], ref[1]):
        if not low:
            _close(a.double(), r, _tol(dtype, r, grad=True), f"grad {name}")
        _close(a.double(), th.double(), _tol(dtype, r, pair=True, grad=True), f"grad {name} vs torch heads")


def test_bf16_logprobs_error_within_margin_of_unfused():
    """bf16 log-probs and entropy with a temperature: the error norms of the outputs and of every gradient
    against float64 are at most test_bf16.MARGIN times the unfused bf16 code's (same roundings: the logits
    once, ``d logits`` once, the gradients once; fp32 between)."""
    g = torch.Generator().manual_seed(3)
    n, d, v = 256, 128, 3001
    x = torch.randn(2, n // 2, d, generator=g).bfloat16()
    w = (torch.randn(v, d, generator=g) / d**0.5).bfloat16()
    ids = torch.randint(0, v, (2, n // 2), generator=g)
    go1, go2 = torch.randn(2, 2, n // 2, generator=g, dtype=torch.float64)

    def run(fn, xx, ww):
        xx, ww = xx.detach().requires_grad_(True), ww.detach().requires_grad_(True)
        logp, ent = fn(xx, ww)
        grads = torch.autograd.grad((logp * go1.to(logp)).sum() + (ent * go2.to(ent)).sum(), (xx, ww))
        return logp.detach(), ent.detach(), *grads

    def memops_fn(xx, ww):
        return memops.linear_logprobs(xx, ww, ids, return_entropy=True, temperature=0.7)

    def unfused(xx, ww):
        return ref_linear_logprobs(xx, ww, ids, temperature=0.7)

    ref = run(unfused, x.double(), w.double())
    eager = run(unfused, x, w)
    with triton_path(block=4096):
        ours = run(memops_fn, x, w)
    for name, o, e, r in zip(("log-probs", "entropy", "grad_input", "grad_weight"), ours, eager, ref):
        ratio = test_bf16._err(o, r) / test_bf16._err(e, r)
        assert ratio <= test_bf16.MARGIN, f"{name}: error {ratio:.4f}x the unfused bf16 code's"


@st.composite
def grpo_case(draw):
    return dict(
        **_batch(draw, [2, 33, 100], [16, 64], [torch.float64, torch.float32]),
        loss_type=draw(st.sampled_from(["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo"])),
        level=draw(st.sampled_from(["token", "token", "sequence"])),
        beta=draw(st.sampled_from([0.0, 0.04])),
        old=draw(st.booleans()),
        delta=draw(st.sampled_from([None, 1.5])),
        entropy_coef=draw(st.sampled_from([0.0, 0.01])),
        temperature=draw(st.sampled_from([1.0, 0.7])),
        softcap=draw(st.sampled_from([None, 5.0])),
        chunk_size=draw(st.none() | st.integers(1, 6)),
        seed=draw(st.integers(0, 2**16)),
    )


@SMALL
@given(grpo_case())
def test_grpo_triton_heads_match_torch_heads_and_reference(case):
    g = torch.Generator().manual_seed(case["seed"])
    x, w, bias, ids = _lp_inputs(case, g)
    b, t = case["lead"]
    mask = (torch.rand(b, t, generator=g) < 0.7).long()
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    old = torch.randn(b, t, generator=g, dtype=torch.float64) * 0.1 - 3 if case["old"] else None
    ref_lp = torch.randn(b, t, generator=g, dtype=torch.float64) * 0.1 - 3 if case["beta"] else None
    dtype = case["dtype"]
    kw = dict(
        old_logprobs=old,
        ref_logprobs=ref_lp,
        beta=case["beta"],
        loss_type=case["loss_type"],
        importance_sampling_level=case["level"],
        delta=case["delta"],
        entropy_coef=case["entropy_coef"],
        temperature=case["temperature"],
        softcap=case["softcap"],
        chunk_size=case["chunk_size"],
    )

    def run(xx, ww, bb):
        xx, ww = xx.detach().to(dtype).requires_grad_(True), ww.detach().to(dtype).requires_grad_(True)
        bb = None if bb is None else bb.detach().to(dtype).requires_grad_(True)
        loss, metrics = memops.linear_grpo_loss(xx, ww, ids, mask, adv.to(dtype), bias=bb, **kw)
        return loss, metrics, _grads(loss, (xx, ww, bb))

    # with no active token, whether a row runs depends on the loss type (masked rows may be skipped)
    with triton_path(case["block"], expect=True if mask.any() else None):
        ours = run(x, w, bias)
    with memops.kernels("torch"):
        theirs = run(x, w, bias)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    _close(ours[0], theirs[0], tol * (1 + theirs[0].abs().item()), "loss")
    assert ours[1].keys() == theirs[1].keys()
    for key in ours[1]:
        _close(ours[1][key], theirs[1][key], tol, key)
    for name, a, th in zip("xwb", ours[2], theirs[2]):
        _close(a, th, tol * (1 + th.abs().max().item()), f"grad {name}")
    if (
        dtype == torch.float64
        and case["loss_type"] in ("grpo", "bnpo", "dr_grpo", "dapo")
        and case["level"] == "token"
        and case["delta"] is None
        and not case["entropy_coef"]
        and case["softcap"] is None
    ):  # the float64 reference on full logits
        rkw = dict(old_logprobs=old, ref_logprobs=ref_lp, beta=case["beta"], loss_type=case["loss_type"])
        xx, ww = x.detach().requires_grad_(True), w.detach().requires_grad_(True)
        bb = None if bias is None else bias.detach().requires_grad_(True)
        ref, _ = ref_grpo_loss(xx, ww, ids, mask, adv, bias=bb, temperature=case["temperature"], **rkw)
        _close(ours[0], ref, 1e-9 * (1 + ref.abs().item()), "loss vs reference")
        for name, a, r in zip("xwb", ours[2], _grads(ref, (xx, ww, bb))):
            _close(a, r, 1e-9 * (1 + r.abs().max().item()), f"grad {name} vs reference")


@st.composite
def accurate_case(draw):
    return dict(
        family=draw(st.sampled_from(["ce", "logprobs", "grpo"])),
        dtype=draw(st.sampled_from([torch.bfloat16, torch.float16])),
        n=draw(st.integers(1, 7)),
        d=draw(st.integers(1, 6)),
        v=draw(st.sampled_from([1, 33, 100]) | st.integers(1, 130)),
        block=draw(st.sampled_from([16, 64])),
        softcap=draw(st.sampled_from([None, 5.0])),
        scale=draw(st.sampled_from([1.0, 0.7])),
        smoothing=draw(st.sampled_from([0.0, 0.1])),
        bias=draw(st.booleans()),
        chunk_size=draw(st.none() | st.integers(1, 4)),
        seed=draw(st.integers(0, 2**16)),
    )


def _accurate_run(case, x, w, b, ids):
    """One family's outputs and gradients in accurate mode with the current heads."""
    x, w = x.detach().requires_grad_(True), w.detach().requires_grad_(True)
    b = None if b is None else b.detach().requires_grad_(True)
    common = dict(softcap=case["softcap"], chunk_size=case["chunk_size"], precision="accurate")
    if case["family"] == "ce":
        loss, lse = memops.linear_cross_entropy(
            x, w, ids, b, logit_scale=case["scale"], label_smoothing=case["smoothing"], return_lse=True, **common
        )
        outs = [loss, lse]
    elif case["family"] == "logprobs":
        lp, ent = memops.linear_logprobs(x, w, ids, b, return_entropy=True, temperature=case["scale"], **common)
        outs, loss = [lp, ent], (lp * torch.linspace(-1, 2, lp.numel()).view(lp.shape).to(lp)).sum() + ent.sum()
    else:
        g = torch.Generator().manual_seed(case["seed"] + 1)
        mask = (torch.rand(ids.shape, generator=g) < 0.8).long()
        adv = torch.randn(ids.shape[0], generator=g).to(x.dtype)
        loss, _ = memops.linear_grpo_loss(x, w, ids, mask, adv, bias=b, temperature=case["scale"], **common)
        outs = [loss]
    return outs, _grads(loss, (x, w, b))


@SMALL
@given(accurate_case())
def test_accurate_mode_runs_the_triton_heads_on_fp32_blocks(case):
    """``precision="accurate"``: the Triton heads read the fp32 logits the GEMM wrote (each launch's block is
    fp32; the default precision's blocks are the input dtype) and equal the torch heads in accurate mode: both
    do fp32 math on the same fp32 logits, so forward values agree to fp32 rounding and gradients to one
    rounding of the low-precision output."""
    g = torch.Generator().manual_seed(case["seed"])
    dtype, n, d, v = case["dtype"], case["n"], case["d"], case["v"]
    x = torch.randn(2, n, d, generator=g).to(dtype)
    w = (torch.randn(v, d, generator=g) * (2 / math.sqrt(d))).to(dtype)
    b = torch.randn(v, generator=g).to(dtype) if case["bias"] else None
    ids = torch.randint(0, v, (2, n), generator=g)
    blocks = []
    real = triton_heads._launch

    def recorded(kernel, rows, z, *args, **kwargs):
        blocks.append(z.dtype)
        return real(kernel, rows, z, *args, **kwargs)

    with triton_path(case["block"]), mock.patch.object(triton_heads, "_launch", recorded):
        ours = _accurate_run(case, x, w, b, ids)
    assert blocks and set(blocks) == {torch.float32}, blocks
    with memops.kernels("torch"):
        theirs = _accurate_run(case, x, w, b, ids)
    for i, (a, th) in enumerate(zip(ours[0], theirs[0])):
        _close(a, th, _tol(dtype, th.float(), pair=True), f"output {i} vs torch heads")
    for name, a, th in zip("xwb", ours[1], theirs[1]):
        assert a.dtype == dtype
        _close(a.double(), th.double(), _tol(dtype, th.float(), pair=True, grad=True), f"grad {name} vs torch")
    blocks.clear()
    with triton_path(case["block"]), mock.patch.object(triton_heads, "_launch", recorded):
        memops.linear_logprobs(x, w, ids, b)
    assert set(blocks) == {dtype}, blocks  # the default precision reads the input dtype's block


def test_accurate_triton_chunks_off_the_cpu_are_fp32_from_the_gemm():
    """Off the CPU (meta tensors take that branch) an accurate fused chunk is ``mm(out_dtype=float32)`` into
    an fp32 block, the head gets that block, its ``dz`` is cast to bf16 once for both gradient GEMMs, and the
    chunks are sized for the fp32 block (not the bf16 one of the default fused path)."""
    from memops import config
    from memops.ops import engine

    n, d, v = 4096, 64, 50_000
    x = torch.empty(n, d, dtype=torch.bfloat16, device="meta")
    w = torch.empty(v, d, dtype=torch.bfloat16, device="meta")
    engine.fp32_out_gemm(x.device)
    seen = []

    def head(z, sel):
        seen.append((z.dtype, z.shape[0]))
        return z

    ops = Ops()
    with config.chunking(budget_bytes=64 << 20), ops:
        engine.run(x, w, None, head, grad_input=True, grad_weight=True, fused=True, accurate=True)
    with config.chunking(budget_bytes=64 << 20):
        rows = config.chunk_rows(n, v, d, x.dtype, x.device, 0, fused=False)
        narrow = config.chunk_rows(n, v, d, x.dtype, x.device, 0, fused=True)
    assert narrow > rows
    assert [s[1] for s in seen] == [min(rows, n - lo) for lo in range(0, n, rows)], (seen, rows)
    assert {s[0] for s in seen} == {torch.float32}
    chunks = len(seen)
    # each chunk's logits and the first weight gradient; where addmm cannot accumulate in place, every chunk's
    # weight gradient is an mm too
    mms = chunks + 1 if _fp32_kind() == "addmm" else 2 * chunks
    assert ops.seen.count("aten.mm.dtype_out") == mms
    assert ops.seen.count("aten._to_copy.default") == chunks  # dz cast once per chunk


def _fp32_kind() -> str:
    """The fp32-output GEMM memops' probe finds on this release (meta tensors: the build's CUDA ops): torch 2.13+
    accumulates in place (``addmm``); torch 2.11's ops refuse an fp32 ``out`` of bf16 operands to addmm (``mm``
    into a scratch, then ``add_``)."""
    from memops.ops import engine

    kind = engine.fp32_out_gemm(torch.device("meta"))
    assert kind == "addmm" if torch.__version__ >= "2.13" else kind in ("addmm", "mm"), kind
    return kind


# ---- selection ----------------------------------------------------------------------------------------


def test_set_kernels_checks_its_argument_and_kernels_restores():
    with pytest.raises(ValueError, match="kernels must be one of"):
        memops.set_kernels("cuda")
    assert memops.config.kernel_choice() == "auto"
    with memops.kernels("torch"):
        assert memops.config.kernel_choice() == "torch"
        with memops.kernels("triton"):
            assert memops.config.kernel_choice() == "triton"
        assert memops.config.kernel_choice() == "torch"
    assert memops.config.kernel_choice() == "auto"


def _small_ce():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=g, requires_grad=True)
    w = torch.randn(50, 4, generator=g, requires_grad=True)
    return x, w, torch.randint(0, 50, (6,), generator=g)


@pytest.mark.skipif(DEVICE != "cpu", reason="'auto' picks the Triton heads for CUDA tensors")
def test_auto_and_torch_run_the_torch_heads_on_cpu():
    x, w, t = _small_ce()
    before = sum(triton_heads.LAUNCHES.values())
    for kind in ("auto", "torch"):
        with memops.kernels(kind):
            memops.linear_cross_entropy(x, w, t).backward()
            memops.linear_logprobs(x.unsqueeze(0), w, t.unsqueeze(0)).sum().backward()
    assert sum(triton_heads.LAUNCHES.values()) == before


def test_families_without_a_triton_head_keep_the_torch_heads():
    """Distillation and user transforms run their torch heads (and stay exact) when Triton is chosen."""
    x, w, t = _small_ce()
    teacher = torch.randn(6, 4)
    with triton_path(expect=False):
        loss = memops.linear_distillation_loss(x, w, t, teacher, w.detach() * 0.5)
        loss2 = memops.linear_loss(x, w, t, "focal")
    with memops.kernels("torch"):
        ref = memops.linear_distillation_loss(x, w, t, teacher, w.detach() * 0.5)
        ref2 = memops.linear_loss(x, w, t, "focal")
    assert torch.equal(loss, ref) and torch.equal(loss2, ref2)


def test_triton_on_cpu_without_the_interpreter_is_a_clear_error():
    code = textwrap.dedent(
        """
        import torch, memops
        memops.set_kernels("triton")
        x, w = torch.randn(3, 4), torch.randn(7, 4)
        try:
            memops.linear_cross_entropy(x, w, torch.tensor([1, 2, 3]))
        except RuntimeError as err:
            print("ERROR:", err)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "ERROR: memops.set_kernels('triton')" in out.stdout and "TRITON_INTERPRET=1" in out.stdout


def test_compiled_graph_runs_the_triton_heads_inside_the_op():
    """The ops' fake kernels and graphs do not change: a fullgraph, dynamic-shape compile calls the op,
    whose real kernel launches the Triton head."""
    x, w, t = _small_ce()

    def step(x, w, t):
        return memops.linear_cross_entropy(x, w, t, label_smoothing=0.1)

    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend="aot_eager")
    with memops.kernels("torch"):
        ref = step(x, w, t)
        ref_grads = torch.autograd.grad(ref, (x, w))
    with triton_path():
        for n in (6, 5):
            loss = compiled(x[:n], w, t[:n])
            grads = torch.autograd.grad(loss, (x, w))
    _close(loss, memops.linear_cross_entropy(x[:5], w, t[:5], label_smoothing=0.1), 1e-6, "loss")
    assert ref_grads[0].shape == grads[0].shape


# ---- the kernels compile for a GPU --------------------------------------------------------------------


def _aot(*flags: str) -> str:
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "triton_aot_check.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, script, *flags], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_kernels_compile_for_sm90_without_spills():
    """Every kernel variant the launchers use, compiled as the JIT compiles it (divisibility hints, the
    default launch configuration, Triton's own ptxas run) for an H100/H200, and for sm_100 where this Triton
    targets it: no spills (the script exits non-zero on any), registers read per variant.  The spill count
    is real: a kernel made to spill reports its bytes."""
    import re

    out = _aot()
    m = re.search(r"compiled (\d+) kernel variants for sm_90(, sm_100)? .*: 0 with spills", out)
    assert m, out
    assert int(m.group(1)) >= 80  # every dtype's and flag combination's variant (92 per architecture now)
    probe = re.search(r"spill probe: (\d+) bytes", _aot("--spill-probe"))
    assert probe and int(probe.group(1)) > 0


def test_interpreted_is_decided_without_numpy():
    """``triton_heads.interpreted()`` (asked on every bf16 call) does not import numpy, which neither torch
    nor compiled Triton needs: with numpy hidden it answers, and numpy stays unimported."""
    code = """
import sys
class Hide:
    def find_spec(self, name, path=None, target=None):
        if name == "numpy" or name.startswith("numpy."):
            raise ModuleNotFoundError("No module named 'numpy'", name=name)
sys.meta_path.insert(0, Hide())
from memops.ops import triton_heads
print(triton_heads.interpreted(), "numpy" in sys.modules)
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"], out.stdout


def test_float_options_are_scalar_launch_arguments():
    """The heads' float options reach the kernels as fp32 scalar pairs (``hi + lo``), not a device tensor
    copied from host memory per call, which a captured CUDA graph would replay from freed memory: exact to
    48 bits for the fp64 kernels, exact for fp32 values, and a value outside fp32's range is refused."""
    from memops.ops import _triton_kernels as K
    from memops.ops import triton_heads as H

    for kernel in (K.ce_head, K.logprobs_head):
        assert "P" not in kernel.arg_names and "scale_hi" in kernel.arg_names
    values = (1 / 3, None, 0.1, 1e-4, 30.0)
    params = H._params(values)
    assert all(type(p) is float for p in params) and len(params) == 2 * len(values)
    for v, hi, lo in zip(values, params[::2], params[1::2]):
        v = 1.0 if v is None else v
        assert torch.tensor(hi, dtype=torch.float32).item() == hi and torch.tensor(lo, dtype=torch.float32).item() == lo
        assert abs((hi + lo) - v) <= abs(v) * 2.0**-48
        assert torch.tensor(v, dtype=torch.float32).item() == hi
    with pytest.raises(ValueError, match="fp32's range"):
        H._params((1e39,))


def test_launch_configurations_table_and_environment():
    """The launch configuration is a table a device check can time (``MEMOPS_TRITON_LAUNCH``); today's
    (4096-wide tile, 8 warps, Triton's 3 stages) is the default; anything else is refused by name."""
    from memops.ops import triton_heads as H

    assert H.LAUNCH_CONFIGS[0] == H.LaunchConfig(4096, 8, 3) == H.LAUNCH
    assert {c.block for c in H.LAUNCH_CONFIGS} == {4096, 8192} and {c.warps for c in H.LAUNCH_CONFIGS} == {8, 16}
    assert {c.stages for c in H.LAUNCH_CONFIGS} == {1, 2, 3}
    assert [c.maxnreg for c in H.LAUNCH_CONFIGS[:1]] == [255] and H.LaunchConfig(8192, 16).maxnreg == 128
    assert H._launch_shape(128256, torch.float32) == (4096, 8, 3)
    assert H._launch_shape(128256, torch.float64)[0] <= H.FP64_BLOCK
    assert H._launch_shape(1000, torch.float32) == (1024, 4, 3)
    code = "from memops.ops import triton_heads as H; print(H.LAUNCH, H.BLOCK_MAX)"
    for value, expect in (("8192,16,3", "LaunchConfig(block=8192, warps=16, stages=3) 8192"), ("1,2", None)):
        env = {**os.environ, "MEMOPS_TRITON_LAUNCH": value}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
        if expect:
            assert out.returncode == 0 and out.stdout.strip() == expect, out.stderr
        else:
            assert out.returncode != 0 and "MEMOPS_TRITON_LAUNCH='1,2' is not one of" in out.stderr


class Ops(TorchDispatchMode):
    """Records every aten op run under it, by name."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


# the "mm" kind's ops for a first and a second chunk: the first writes the accumulator, the second adds a scratch
_MM_TWO_CHUNKS = [
    "aten.t.default",
    "aten.mm.dtype_out",
    "aten.t.default",
    "aten.empty_like.default",
    "aten.mm.dtype_out",
    "aten.add_.Tensor",
]


def test_cuda_weight_gradient_accumulates_in_place_in_fp32():
    """Off the CPU a low-precision chunk's weight gradient is one fp32-output GEMM into the fp32 accumulator
    (``mm`` / ``addmm`` with ``out_dtype``): no product tensor and no extra pass over ``[V, D]`` per chunk.
    Shown on meta tensors, which take the same branch (the build's ops are the CUDA ones)."""
    from memops.ops import engine

    gw = torch.empty(50, 8, device="meta")
    dz, xc = (
        torch.empty(6, 50, dtype=torch.bfloat16, device="meta"),
        torch.empty(6, 8, dtype=torch.bfloat16, device="meta"),
    )
    engine.fp32_out_gemm(gw.device)  # the once-per-process probe, outside the recording
    ops = Ops()
    with ops:
        engine._accumulate_weight_grad(gw, dz, xc, first=True)
        engine._accumulate_weight_grad(gw, dz, xc, first=False)
    want = {
        "addmm": ["aten.t.default", "aten.mm.dtype_out", "aten.t.default", "aten.addmm.dtype_out"],
        "mm": _MM_TWO_CHUNKS,
    }[_fp32_kind()]
    assert ops.seen == want, ops.seen


@pytest.mark.parametrize(
    "kind, ops_seen",
    [
        ("mm", [*_MM_TWO_CHUNKS, "aten.t.default", "aten.mm.dtype_out", "aten.add_.Tensor"]),
        (
            "cast",
            [
                "aten.t.default",
                "aten.mm.default",
                "aten.copy_.default",
                "aten.t.default",
                "aten.mm.default",
                "aten.add_.Tensor",
                "aten.t.default",
                "aten.mm.default",
                "aten.add_.Tensor",
            ],
        ),
    ],
)
def test_weight_gradient_fallbacks_of_older_builds(monkeypatch, kind, ops_seen):
    """Builds whose addmm rejects an fp32 accumulator with bf16 operands ("mm"): fp32 partials through one
    scratch buffer reused by every chunk; builds without out_dtype ("cast"): the product, then an add."""
    from memops.ops import engine

    monkeypatch.setitem(engine._FP32_OUT_GEMM, "meta", kind)

    gw = torch.empty(50, 8, device="meta")
    dz, xc = (torch.empty(6, n, dtype=torch.bfloat16, device="meta") for n in (50, 8))
    ops, scratch = Ops(), []
    with ops:
        for first in (True, False, False):
            engine._accumulate_weight_grad(gw, dz, xc, first=first, scratch=scratch)
    assert ops.seen == ops_seen, ops.seen


def test_fp32_output_gemm_probed_once_and_warned_once(monkeypatch):
    from memops.ops import engine

    monkeypatch.setattr(engine, "_FP32_OUT_GEMM", {})
    assert engine.fp32_out_gemm(torch.device("meta")) == _fp32_kind()  # the build's CUDA ops, shown on meta

    def reject(*args, **kwargs):
        raise RuntimeError("self and mat2 must have the same dtype")

    calls = []

    def counted_mm(*args, **kwargs):
        calls.append(1)
        if "out_dtype" in kwargs:
            raise TypeError("mm() got an unexpected keyword argument 'out_dtype'")
        return torch.ones(2, 2)

    for patched_mm, want in ((None, "mm"), (counted_mm, "cast")):
        monkeypatch.setattr(engine, "_FP32_OUT_GEMM", {})
        monkeypatch.setattr(engine.torch, "addmm", reject)
        if patched_mm is not None:
            monkeypatch.setattr(engine.torch, "mm", patched_mm)
        with pytest.warns(UserWarning, match="no in-place fp32-output addmm") as seen:
            assert engine.fp32_out_gemm(torch.device("meta")) == want
            assert engine.fp32_out_gemm(torch.device("meta")) == want  # cached: no second probe, no warning
        assert len(seen) == 1
    assert len(calls) == 1


def test_torch_heads_off_the_cpu_cast_each_chunks_gradient_once():
    """bf16 input, fp32 chunk logits, torch heads, off the CPU (meta tensors take that branch): each chunk's
    ``d logits`` is cast to bf16 once for both gradient GEMMs."""
    from memops.ops import engine

    class Casts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.chunk_casts = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._to_copy.default and sorted(out.shape) == [4, 50]:
                self.chunk_casts += 1
            return out

    x = torch.empty(12, 8, dtype=torch.bfloat16, device="meta")
    w = torch.empty(50, 8, dtype=torch.bfloat16, device="meta")
    engine.fp32_out_gemm(x.device)
    casts = Casts()
    with casts:
        engine.run(x, w, None, lambda z, sel: z, chunk_size=4, grad_input=True, grad_weight=True)
    assert casts.chunk_casts == 3  # 3 chunks, d logits cast to bf16 once in each


# ---- bytes moved ---------------------------------------------------------------------------------------


def test_traffic_bf16_triton_ce_head_at_most_8_bytes_per_logit():
    from memops.bench import traffic

    name = "cross-entropy, forward + gradient"
    fused = traffic.triton_head_bytes(name, torch.bfloat16)
    unfused = traffic.torch_head_bytes(name, torch.bfloat16)
    assert fused["head"] <= 8.0, fused
    assert fused["head"] + fused["gemm"] < (unfused["head"] + unfused["gemm"]) / 4, (fused, unfused)
    capped = traffic.triton_head_bytes("cross-entropy, soft-cap + smoothing + z-loss", torch.bfloat16)
    assert capped["head"] <= 8.0, capped


def test_docs_hold_the_traffic_table():
    """docs/internals.md holds ``python -m memops traffic``'s table (regenerate: scripts/update_docs.py)."""
    from memops.bench import traffic

    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "internals.md")).read()
    assert traffic.table() in doc


def _invariant_logprobs(inp, p, dtype, **kw):
    """Log-probs and entropy at one temperature (the Triton head's case; a per-row temperature, extras and a
    sampling mask take the torch heads)."""
    x = inp["x"].to(dtype).detach().clone().requires_grad_()
    lp, ent = memops.linear_logprobs(x, p[0], inp["t"], p[1], temperature=0.7, return_entropy=True, **kw)
    return x, [lp, ent], lp.sum() + 0.1 * ent.sum()


@pytest.mark.parametrize("family", ["cross_entropy", "logprobs", "grpo"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_batch_invariant_rows_on_the_triton_heads(family, dtype):
    """Batch-invariant mode with the Triton heads (one row per program, a fixed tile order over the
    vocabulary): a row alone equals the row inside batches of other sizes at other positions, bitwise
    (``tests/test_batch_invariant.py``'s families and check; rows span several 32-wide tiles)."""
    import test_batch_invariant as bi

    make, fn = bi.FAMILIES[family]
    if family == "logprobs":
        fn = _invariant_logprobs
    g = torch.Generator().manual_seed(4)
    p = bi._params_for(family, dtype, 4)
    one = make(1, g)
    with triton_path(), memops.batch_invariant(rows=8):
        alone = bi._results(fn, one, p, dtype)
        for n, pos, pad in [(11, 9, 2), (5, 0, 0)]:
            inside = bi._results(fn, bi._batch(make, one, n, pos, pad, g), p, dtype, chunk_size=3)
            for k, (a, b) in enumerate(zip(alone, inside, strict=True)):
                assert torch.equal(a[0], b[pos]), (family, k)
