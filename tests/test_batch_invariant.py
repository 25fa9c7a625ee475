"""Batch-invariant mode (``memops.set_batch_invariant`` / ``memops.batch_invariant``).

A row computed alone must give bitwise the same per-row results (loss rows, lse, top-1, log-probs, kept-set
log-probs, entropies, the input gradient's row) as the same row inside a batch of random other rows, at a
random position, among ignored (padding) rows, with any ``chunk_size``; weight and bias gradients bitwise the
same run to run.  Every family, fp32 and bf16.  ``test_other_cpu_kernels`` runs the same checks under
``ATEN_CPU_CAPABILITY=default`` and ``=avx2`` in fresh processes.  ``test_rows_differ_without_the_mode`` shows
the property is not free: without the mode, the fp32 rows of one of these batches change bits.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import memops

V, D, T = 67, 24, 5  # vocabulary, hidden size, tokens per sequence (GRPO)
DTYPES = (torch.float32, torch.bfloat16)


def _params(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(V, D, generator=g) * 0.5).to(dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype)
    wt = (torch.randn(V, D, generator=g) * 0.5).to(dtype)  # a teacher's head
    return w, b, wt


def _leaf(t):
    return t.detach().clone().requires_grad_()


# Each family: rows(n, g) makes n rows of its inputs (a dict of per-row tensors), run(inputs, params, **kw)
# returns (per-row outputs, a scalar to differentiate); the input gradient's rows join the per-row outputs.


def _ce_rows(n, g):
    t = torch.randint(0, V, (n,), generator=g)
    return {"x": torch.randn(n, D, generator=g), "t": t}


def _ce(inp, p, dtype, **kw):
    x = _leaf(inp["x"].to(dtype))
    w, b = p
    loss, lse, top1 = memops.linear_cross_entropy(
        x, w, inp["t"], b, reduction="none", return_lse=True, return_is_top1=True, softcap=3.0, z_loss=1e-3, **kw
    )
    return x, [loss, lse, top1], loss.sum()


def _focal(inp, p, dtype, **kw):
    x = _leaf(inp["x"].to(dtype))
    w, b = p
    loss = memops.linear_loss(x, w, inp["t"], "focal", b, reduction="none", gamma=2.0, **kw)
    return x, [loss], loss.sum()


def _lp_rows(n, g):
    rows = _ce_rows(n, g)
    keep = torch.randint(-1, V, (n, 6), generator=g)  # kept ids, -1 padding, duplicates possible
    keep[:, 0] = rows["t"]
    rows["keep"] = keep
    rows["temp"] = torch.rand(n, generator=g) + 0.5
    return rows


def _logprobs(inp, p, dtype, **kw):
    x = _leaf(inp["x"].to(dtype))
    w, b = p
    out = memops.linear_logprobs(
        x,
        w,
        inp["t"],
        b,
        temperature=inp["temp"],
        return_entropy=True,
        extras=("log_sum_sq_probs", "is_top1"),
        softcap=4.0,
        **kw,
    )
    lp, ent = out["log_probs"], out["entropy"]
    return x, [lp, ent, out["log_sum_sq_probs"], out["is_top1"]], lp.sum() + 0.1 * ent.sum()


def _kept_logprobs(inp, p, dtype, **kw):
    x = _leaf(inp["x"].to(dtype))
    w, b = p
    lp, ent = memops.linear_logprobs(
        x, w, inp["t"], b, sampling_mask=inp["keep"], return_entropy=True, entropy_over="kept", **kw
    )
    return x, [lp, ent], lp.sum() + 0.1 * ent.sum()


def _distill(inp, p, dtype, **kw):
    x = _leaf(inp["x"].to(dtype))
    w, b, wt = p
    xt = inp["x"].flip(1).to(dtype)  # the teacher's hidden states
    loss, ent = memops.linear_distillation_loss(
        x, w, inp["t"], xt, wt, student_bias=b, reduction="none", hard_label_weight=0.25, return_entropy=True, **kw
    )
    return x, [loss, ent], loss.sum()


def _grpo_rows(n, g):
    # n sequences of T tokens: a row here is a sequence
    return {
        "x": torch.randn(n, T, D, generator=g),
        "ids": torch.randint(0, V, (n, T), generator=g),
        "mask": (torch.rand(n, T, generator=g) > 0.2).long(),
        "adv": torch.randn(n, generator=g),
        "old": -torch.rand(n, T, generator=g) * 3,
    }


def _grpo(inp, p, dtype, **kw):
    x = _leaf(inp["x"].to(dtype))
    w, b = p
    # dapo with a fixed num_items: each token's weight is 1 / num_items whatever the batch (an entropy bonus is
    # a mean over the batch's tokens, so it is left out)
    loss, _ = memops.linear_grpo_loss(
        x,
        w,
        inp["ids"],
        inp["mask"],
        inp["adv"],
        bias=b,
        old_logprobs=inp["old"],
        loss_type="dapo",
        num_items=16,
        **kw,
    )
    return x, [], loss


FAMILIES = {
    "cross_entropy": (_ce_rows, _ce),
    "focal": (_ce_rows, _focal),
    "logprobs": (_lp_rows, _logprobs),
    "kept_logprobs": (_lp_rows, _kept_logprobs),
    "distillation": (_ce_rows, _distill),
    "grpo": (_grpo_rows, _grpo),
}


def _pick(rows: dict, i: int) -> dict:
    return {k: v[i : i + 1] for k, v in rows.items()}


def _batch(make, one: dict, n: int, pos: int, pad: int, g) -> dict:
    """``one`` at row ``pos`` of ``n`` random rows; ``pad`` more rows of ignored targets at the end (the
    families with an ``ignore_index``), empty completions (GRPO) or random rows (log-probs, which has none)."""
    rows = make(n + pad, g)
    for k, v in rows.items():
        v[pos] = one[k][0]
        if pad and k == "t" and "keep" not in rows:
            v[n:] = -100
        if pad and k == "mask":
            v[n:] = 0
    return rows


def _results(fn, inp, p, dtype, **kw):
    x, per_row, scalar = fn(inp, p, dtype, **kw)
    scalar.backward()
    return [r.detach() for r in per_row] + [x.grad]


def _params_for(name, dtype, seed):
    w, b, wt = _params(dtype, seed)
    return (w, b, wt) if name == "distillation" else (w, b)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    family=st.sampled_from(sorted(FAMILIES)),
    dtype=st.sampled_from(DTYPES),
    n=st.integers(1, 40),
    pad=st.integers(0, 5),
    seed=st.integers(0, 2**16),
    fixed=st.sampled_from([None, 8, 13]),
    chunks=st.tuples(st.sampled_from([None, 1, 3, 16, 100]), st.sampled_from([None, 2, 7, 64])),
    gemm=st.sampled_from(["auto", "native"]),
    precision=st.sampled_from([None, "accurate"]),
)
def test_a_row_alone_equals_the_row_in_any_batch(family, dtype, n, pad, seed, fixed, chunks, gemm, precision):
    """``gemm="native"``: bf16 gradient GEMMs in bf16 and the head on fp32 copies of bf16 sub-blocks, as on
    CPUs with fast bf16 GEMMs (this one may have none); ``precision="accurate"``: fp32 logits."""
    make, fn = FAMILIES[family]
    g = torch.Generator().manual_seed(seed)
    p = _params_for(family, dtype, seed)
    one = make(1, g)
    pos = int(torch.randint(0, n, (1,), generator=g))
    batch = _batch(make, one, n, pos, pad, g)
    memops.config.set_cpu_gemm(gemm)
    try:
        with memops.batch_invariant(rows=fixed), memops.precision(precision or "reference"):
            alone = _results(fn, one, p, dtype, chunk_size=chunks[0])
            inside = _results(fn, batch, p, dtype, chunk_size=chunks[1])
    finally:
        memops.config.set_cpu_gemm("auto")
    for k, (a, b) in enumerate(zip(alone, inside, strict=True)):
        assert torch.equal(a[0], b[pos]), (family, dtype, k, a[0], b[pos])


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parameter_gradients_repeat_bitwise(family, dtype):
    make, fn = FAMILIES[family]
    params = _params_for(family, dtype, 3)
    p = (_leaf(params[0]), _leaf(params[1])) + params[2:]  # the weight and bias; a teacher's stays frozen
    grads = []
    for _ in range(2):
        for t in p[:2]:
            t.grad = None
        with memops.batch_invariant(rows=8):
            _results(fn, make(21, torch.Generator().manual_seed(5)), p, dtype)
        grads.append([t.grad.clone() for t in p[:2]])
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def test_chunk_size_and_the_global_chunk_setting_change_nothing():
    make, fn = FAMILIES["logprobs"]
    p = _params_for("logprobs", torch.float32, 1)
    rows = make(30, torch.Generator().manual_seed(2))
    with memops.batch_invariant(rows=8):
        a = _results(fn, rows, p, torch.float32)
        b = _results(fn, rows, p, torch.float32, chunk_size=5)
        with memops.chunking(chunk_size=3):
            c = _results(fn, rows, p, torch.float32)
    for x, y, z in zip(a, b, c, strict=True):
        assert torch.equal(x, y) and torch.equal(x, z)


def test_rows_differ_without_the_mode():
    """The mode is needed: without it the same fp32 rows change bits with the batch (the GEMM's kernel
    changes with its row count on this CPU; any disagreement in 40 placements shows it)."""
    make, fn = FAMILIES["logprobs"]
    p = _params_for("logprobs", torch.float32, 0)
    g = torch.Generator().manual_seed(0)
    one = make(1, g)
    alone = _results(fn, one, p, torch.float32)
    differ = 0
    for n in range(2, 42):
        batch = _batch(make, one, n, n // 2, 0, g)
        inside = _results(fn, batch, p, torch.float32)
        differ += not all(torch.equal(a[0], b[n // 2]) for a, b in zip(alone, inside, strict=True))
    assert differ > 0


def test_settings_and_errors():
    assert memops.config.invariant_rows(torch.device("cpu")) is None
    with memops.batch_invariant():
        assert memops.config.invariant_rows(torch.device("cpu")) == memops.config.INVARIANT_ROWS["cpu"]
        with memops.batch_invariant(rows=32):
            assert memops.config.invariant_rows(torch.device("cpu")) == 32
        assert memops.config.invariant_rows(torch.device("cpu")) == 256
    memops.set_batch_invariant(True)
    try:
        assert memops.config.chunk_rows(3, V, D, torch.float32, torch.device("cpu"), requested=2) == 256
    finally:
        memops.set_batch_invariant(False)
    assert memops.config.invariant_rows(torch.device("cpu")) is None
    with pytest.raises(TypeError, match="set_batch_invariant takes a bool"):
        memops.set_batch_invariant(1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rows must be a positive int"):
        memops.set_batch_invariant(True, rows=0)


_CHILD = """
import torch, memops, sys
sys.path.insert(0, {tests!r})
import test_batch_invariant as m
m.V = {vocab}
if {threads}:
    torch.set_num_threads({threads})
bad = []
for family, (make, fn) in sorted(m.FAMILIES.items()):
  for gemm in ("auto", "native"):
    memops.config.set_cpu_gemm(gemm)
    for dtype in m.DTYPES:
        for seed, (n, pad) in enumerate([(1, 3), (9, 0), (37, 4)]):
            g = torch.Generator().manual_seed(seed)
            p = m._params_for(family, dtype, seed)
            one = make(1, g)
            pos = (5 * seed) % n
            batch = m._batch(make, one, n, pos, pad, g)
            with memops.batch_invariant(rows=8 if seed else None):
                alone = m._results(fn, one, p, dtype)
                inside = m._results(fn, batch, p, dtype, chunk_size=3)
            pairs = enumerate(zip(alone, inside))
            bad += [(family, gemm, str(dtype), k) for k, (a, b) in pairs if not torch.equal(a[0], b[pos])]
print("BAD", bad)
"""


@pytest.mark.parametrize(
    "capability, threads, vocab",
    [("default", 0, V), ("avx2", 0, V), (None, 16, 40_000)],
    ids=["default", "avx2", "native-16-threads"],
)
def test_other_cpu_kernels(capability, threads, vocab):
    """The checks above under other ATen CPU kernels, and with 16 threads over a vocabulary large enough for
    ATen to split one row's reduction across threads (a ``[r, V]`` block's row sums then change bits with
    ``r``: why the torch heads get single rows in this mode)."""
    env = dict(os.environ)
    if capability:
        env["ATEN_CPU_CAPABILITY"] = capability
    code = _CHILD.format(tests=os.path.dirname(__file__), threads=threads, vocab=vocab)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "BAD []" in done.stdout, done.stdout[-3000:]
