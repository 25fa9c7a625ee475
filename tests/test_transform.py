"""memops.linear_loss / memops::linear_transform: any per-token loss, gradients by autograd."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from helpers import MatmulFlops, backward_op_args, projection_flops
from hypothesis import given
from hypothesis import strategies as st
from reference import ref_linear_loss

import memops

IGNORE = -100

# ---- random transforms: compositions of elementwise maps, vocab reductions, gathers and extras ----

ELEMENTWISE = {
    "tanh": torch.tanh,
    "sin": torch.sin,
    "softplus": F.softplus,
    "half_square": lambda z: 0.5 * z.square(),
    "scale": lambda z: 1.7 * z - 0.3,
    "gauss": lambda z: torch.exp(-z.square()),
}
REDUCTIONS = {
    "logsumexp": lambda z: torch.logsumexp(z, -1),
    "mean": lambda z: z.mean(-1),
    "softmax_expectation": lambda z: (torch.softmax(z, -1) * z).sum(-1),
    "norm": lambda z: z.square().sum(-1).add(1.0).sqrt(),
}


def make_transform(maps, reduction, gather, extra_modes):
    def fn(logits, target, *extras):
        z = logits
        for m in maps:
            z = ELEMENTWISE[m](z)
        out = REDUCTIONS[reduction](z)
        if gather:
            out = out - torch.log_softmax(z, -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
        for mode, e in zip(extra_modes, extras):
            e = e.to(out.dtype)
            if mode == "mul":
                out = out * e
            elif mode == "add_sq":
                out = out + e.square()
            else:  # "vector": a per-token vector extra [n, 3]
                out = out + (e * z[:, :1]).sum(-1)
        return out

    return fn


@st.composite
def transform_case(draw):
    n_extras = draw(st.integers(0, 2))
    modes = [draw(st.sampled_from(["mul", "add_sq", "vector"])) for _ in range(n_extras)]
    return dict(
        maps=draw(st.lists(st.sampled_from(sorted(ELEMENTWISE)), max_size=3)),
        reduction_fn=draw(st.sampled_from(sorted(REDUCTIONS))),
        gather=draw(st.booleans()),
        modes=modes,
        extra_grad=[draw(st.booleans()) for _ in modes],
        lead=draw(st.sampled_from([(0,), (1,), (7,), (33,), (3, 11), (2, 40)]) | st.tuples(st.integers(1, 150))),
        d=draw(st.integers(1, 12)),
        v=draw(st.sampled_from([1, 2, 5, 13, 31, 97]) | st.integers(1, 120)),
        bias=draw(st.booleans()),
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        chunk=draw(st.none() | st.integers(1, 64)),
        softcap=draw(st.none() | st.floats(1.0, 20.0)),
        ignore_p=draw(st.sampled_from([0.0, 0.3, 1.0])),
        seed=draw(st.integers(0, 2**16)),
    )


_counter = [0]


@given(transform_case())
def test_random_transforms_match_unfused_float64(case):
    fn = make_transform(case["maps"], case["reduction_fn"], case["gather"], case["modes"])
    _counter[0] += 1
    name = f"_test_random_{_counter[0]}"
    memops.transform(name, fn)
    g = torch.Generator().manual_seed(case["seed"])
    lead, d, v = case["lead"], case["d"], case["v"]
    x = torch.randn(*lead, d, generator=g, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(v, d, generator=g, dtype=torch.float64) / math.sqrt(d)).requires_grad_(True)
    b = torch.randn(v, generator=g, dtype=torch.float64, requires_grad=True) if case["bias"] else None
    t = torch.randint(0, v, lead, generator=g)
    t = torch.where(torch.rand(lead, generator=g) < case["ignore_p"], IGNORE, t)
    extras = []
    for mode, eg in zip(case["modes"], case["extra_grad"]):
        shape = lead + ((3,) if mode == "vector" else ())
        extras.append(torch.randn(shape, generator=g, dtype=torch.float64).requires_grad_(eg))
    kw = dict(extras=tuple(extras), reduction=case["reduction"], softcap=case["softcap"])
    out = memops.linear_loss(x, w, t, name, b, chunk_size=case["chunk"], **kw)
    ref = ref_linear_loss(x, w, t, fn, b, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9, equal_nan=True)
    wrt = [p for p in (x, w, b, *extras) if p is not None and p.requires_grad]
    go = torch.randn_like(ref)
    for a, r in zip(torch.autograd.grad(out, wrt, go), torch.autograd.grad(ref, wrt, go)):
        torch.testing.assert_close(a, r, rtol=1e-8, atol=1e-9, equal_nan=True)


# ---- the seed use case: a transform written as a user writes it for full logits ----


@memops.transform("_test_user_ce")
def user_ce(logits, target):
    return F.cross_entropy(logits.float(), target, reduction="none")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_user_written_cross_entropy_matches_unfused(reduction):
    torch.manual_seed(0)
    x = torch.randn(3, 50, 16, requires_grad=True)
    w = torch.randn(101, 16, requires_grad=True)
    t = torch.randint(0, 101, (3, 50))
    t[:, -5:] = IGNORE
    out = memops.linear_loss(x, w, t, "_test_user_ce", reduction=reduction, chunk_size=32)
    ref = F.cross_entropy(F.linear(x, w).float().transpose(1, 2), t, reduction=reduction)
    torch.testing.assert_close(out, ref)
    go = torch.randn_like(ref)
    for a, r in zip(torch.autograd.grad(out, (x, w), go), torch.autograd.grad(ref, (x, w), go)):
        torch.testing.assert_close(a, r)


# ---- built-ins against their own definition on full logits ----

BUILTINS = [
    ("cross_entropy", {}, 0),
    ("cross_entropy", {"label_smoothing": 0.2}, 0),
    ("z_loss", {"z_loss": 1e-2}, 0),
    ("label_smoothing", {}, 0),
    ("weighted_cross_entropy", {}, 1),
    ("focal", {"gamma": 2.0, "alpha": 0.25}, 0),
    ("focal", {"gamma": 0.0}, 0),
    ("target_logprob", {"temperature": 0.7}, 0),
    ("entropy", {}, 0),
]


@pytest.mark.parametrize("name,options,n_extras", BUILTINS, ids=[f"{b[0]}{i}" for i, b in enumerate(BUILTINS)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_builtin_transforms(name, options, n_extras, reduction):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 9, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(23, 8, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(23, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 23, (4, 9), generator=g)
    t[1, :4] = IGNORE
    extras = tuple(torch.rand(4, 9, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(n_extras))
    fn = memops.registry.get_transform(name).fn
    out = memops.linear_loss(x, w, t, name, b, extras=extras, reduction=reduction, chunk_size=10, **options)
    ref = ref_linear_loss(x, w, t, fn, b, extras=extras, reduction=reduction, **options)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    wrt = (x, w, b, *extras)
    go = torch.randn_like(ref)
    for a, r in zip(torch.autograd.grad(out, wrt, go), torch.autograd.grad(ref, wrt, go)):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-10)


def test_class_weighted_cross_entropy_matches_torch_weight_argument():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 8, generator=g, dtype=torch.float64, requires_grad=True)
    cw = torch.rand(11, generator=g, dtype=torch.float64) + 0.1
    t = torch.randint(0, 11, (40,), generator=g)
    t[::6] = IGNORE
    valid = t != IGNORE
    tok_w = torch.where(valid, cw[t.clamp_min(0)], 0.0)
    out = memops.linear_loss(x, w, t, "weighted_cross_entropy", extras=(tok_w,), num_items=tok_w.sum(), chunk_size=7)
    ref = F.cross_entropy(x @ w.T, t, weight=cw)
    torch.testing.assert_close(out, ref)
    for a, r in zip(torch.autograd.grad(out, (x, w)), torch.autograd.grad(ref, (x, w))):
        torch.testing.assert_close(a, r)


# ---- work: a scalar-reduced transform costs the three projection matmuls ----


@pytest.mark.parametrize("reduction,expected", [("mean", 3), ("sum", 3), ("none", 4)])
def test_transform_matmul_work(reduction, expected):
    n, d, v = 64, 16, 40
    x = torch.randn(n, d, requires_grad=True)
    w = torch.randn(v, d, requires_grad=True)
    t = torch.randint(0, v, (n,))
    with MatmulFlops() as m:
        loss = memops.linear_loss(x, w, t, "focal", reduction=reduction, chunk_size=16)
        (loss * torch.randn_like(loss)).sum().backward()
    assert m.flops == expected * projection_flops(n, v, d)


def test_frozen_weight_transform_skips_weight_gradient():
    n, d, v = 64, 16, 40
    x = torch.randn(n, d, requires_grad=True)
    w = torch.randn(v, d)
    t = torch.randint(0, v, (n,))
    with MatmulFlops() as m:
        memops.linear_loss(x, w, t, "entropy", chunk_size=16).backward()
    assert m.flops == 2 * projection_flops(n, v, d)


# ---- errors ----


def _xwt():
    return torch.randn(5, 4), torch.randn(7, 4), torch.randint(0, 7, (5,))


def test_unknown_transform():
    with pytest.raises(ValueError, match="unknown transform 'nope'"):
        memops.linear_loss(*_xwt(), "nope")


def test_transform_returning_wrong_shape():
    memops.transform("_test_bad_shape", lambda z, t: z, replace=True)
    with pytest.raises(ValueError, match=r"_test_bad_shape.*shape \[5\]"):
        memops.linear_loss(*_xwt(), "_test_bad_shape")


def test_options_must_be_finite_scalars():
    with pytest.raises(ValueError, match="option gamma of transform 'focal' must be a finite"):
        memops.linear_loss(*_xwt(), "focal", gamma=float("nan"))
    with pytest.raises(TypeError, match="option gamma=.* must be a bool, int, float, str or None"):
        memops.linear_loss(*_xwt(), "focal", gamma=torch.tensor(2.0))


def test_extras_shape_checked():
    x, w, t = _xwt()
    with pytest.raises(ValueError, match=r"extras\[0\] shape \(4,\) must start with target's shape \(5,\)"):
        memops.linear_loss(x, w, t, "weighted_cross_entropy", extras=(torch.ones(4),))


def test_duplicate_registration_needs_replace():
    memops.transform("_test_dup", lambda z, t: z.sum(-1))
    with pytest.raises(ValueError, match="already registered"):
        memops.transform("_test_dup", lambda z, t: z.mean(-1))


# ---- opcheck, compile, export ----


@memops.transform("_test_weighted_focal")
def weighted_focal(logits, target, weight, gamma: float = 2.0):
    logp = torch.log_softmax(logits, -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return -weight * (1 - logp.exp()).pow(gamma) * logp


@pytest.mark.parametrize("reduction,chunk", [("mean", 0), ("sum", 4), ("none", 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_linear_transform(reduction, chunk, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 6, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(11, 6, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(11, generator=g, dtype=dtype, requires_grad=True)
    e = torch.rand(3, 5, generator=g, dtype=dtype, requires_grad=True)
    t = torch.randint(0, 11, (3, 5), generator=g)
    t[0, 0] = IGNORE
    opts = memops.registry.encode_options({"gamma": 1.5})
    args = (
        x,
        w,
        t,
        b,
        [e],
        None,
        "_test_weighted_focal",
        opts,
        IGNORE,
        reduction,
        None,
        1.0,
        chunk,
        "accurate",
        [True] * 4,
    )
    torch.library.opcheck(torch.ops.memops.linear_transform.default, args)
    grad = torch.randn(t.shape if reduction == "none" else ()).to(dtype)
    bargs = backward_op_args("linear_transform", args, [grad])
    torch.library.opcheck(torch.ops.memops.linear_transform_backward.default, bargs)


def test_compile_fullgraph_with_user_transform():
    torch._dynamo.reset()

    def f(x, w, t, e):
        return memops.linear_loss(x, w, t, "_test_weighted_focal", extras=(e,), gamma=1.5, chunk_size=8)

    cf = torch.compile(f, fullgraph=True, dynamic=True, backend="aot_eager")
    for n in (20, 31):
        x = torch.randn(n, 6, requires_grad=True)
        w = torch.randn(13, 6, requires_grad=True)
        e = torch.rand(n, requires_grad=True)
        t = torch.randint(0, 13, (n,))
        got = (cf(x, w, t, e), *torch.autograd.grad(cf(x, w, t, e), (x, w, e)))
        want = (f(x, w, t, e), *torch.autograd.grad(f(x, w, t, e), (x, w, e)))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
    torch._dynamo.reset()


def test_export_round_trip_with_user_transform(tmp_path):
    (tmp_path / "my_losses.py").write_text(
        textwrap.dedent("""
        import torch, memops

        @memops.transform("_test_exported_focal")
        def focal(logits, target, gamma: float = 2.0):
            logp = torch.log_softmax(logits, -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
            return -(1 - logp.exp()).pow(gamma) * logp
    """)
    )
    sys.path.insert(0, str(tmp_path))
    try:
        import my_losses  # noqa: F401
    finally:
        sys.path.remove(str(tmp_path))

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)
            self.lm_head = torch.nn.Linear(8, 19, bias=False)

        def forward(self, h, y):
            return memops.linear_loss(self.proj(h), self.lm_head.weight, y, "_test_exported_focal", gamma=1.5)

    torch.manual_seed(0)
    model, h, y = Head(), torch.randn(2, 7, 8), torch.randint(0, 19, (2, 7))
    ep = torch.export.export(model, (h, y))
    assert any(n.target is torch.ops.memops.linear_transform.default for n in ep.graph.nodes)
    torch.export.save(ep, str(tmp_path / "m.pt2"))
    torch.save({"h": h, "y": y}, tmp_path / "in.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(tmp_path)!r})
        import memops, my_losses   # the module that registers the transform
        ep = torch.export.load({str(tmp_path / "m.pt2")!r})
        inp = torch.load({str(tmp_path / "in.pt")!r})
        print(repr(ep.module()(inp["h"], inp["y"]).item()))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip().splitlines()[-1]) == pytest.approx(model(h, y).item(), rel=1e-6)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_extra_on_an_ignored_row_matches_reference(bad):
    # the reference's gradient sees 0 * inf there (NaN), so that row is computed, not skipped
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, IGNORE, 2, 3, IGNORE, 6])
    weight = torch.rand(6, dtype=torch.float64)
    weight[1] = bad
    fn = memops.transforms.weighted_cross_entropy
    ref = ref_linear_loss(x, w, t, fn, extras=(weight,))
    out = memops.linear_loss(x, w, t, "weighted_cross_entropy", extras=(weight,), chunk_size=4)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10, equal_nan=True)
    for a, r in zip(torch.autograd.grad(out, (x, w)), torch.autograd.grad(ref, (x, w))):
        assert torch.equal(a.isnan(), r.isnan()) and a.isnan().any()
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10, equal_nan=True)
