"""The contract every op under ``torch.ops.memops`` keeps, checked for each op found in the dispatcher (so a
new op cannot be missed): ``torch.library.opcheck`` of the op and its backward op;
``torch.compile(fullgraph=True, dynamic=True)`` of forward + backward with one compile across three token
counts, matching eager; ``torch.export`` -> save -> load in a fresh process, matching eager.  The
vocab-parallel op runs on a one-process gloo group.  Numerics live in the per-family test files."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import Syncs, backward_op_args
from torch._dynamo.testing import CompileCounterWithBackend

import memops
from memops.contract import SPECS
from memops.ops import torch_private

# the registration path memops_private took at import (memops/ops/torch_private.py): on the public one,
# torch.func transforms are refused by name instead of computed (CI runs this file on both paths)
PUBLIC = torch_private.PATH == "public"

V, D = 11, 6
pytestmark = pytest.mark.usefixtures("one_process_group")  # conftest.py: the vocab-parallel op's group


def _base(n: int, g: torch.Generator, dtype=torch.float32):
    x = torch.randn(n, 2, D, generator=g, dtype=dtype)
    w = torch.randn(V, D, generator=g, dtype=dtype)
    b = torch.randn(V, generator=g, dtype=dtype)
    t = torch.randint(0, V, (n, 2), generator=g)
    return x, w, b, t


def _ce(n, g):
    x, w, b, t = _base(n, g)
    t[0, 0] = -100
    cw = torch.rand(V, generator=g) + 0.5
    return (
        x,
        w,
        t,
        b,
        None,
        cw,
        -100,
        "mean",
        0.1,
        1e-3,
        4.0,
        0.9,
        3,
        False,
        True,
        False,
        "accurate",
        [True, True, False, True],
    )


def _vocab_parallel(n, g):
    x, w, b, t = _base(n, g)
    t[0, 0] = -100
    return (
        x,
        w,
        t,
        b,
        None,
        torch.rand(V, generator=g) + 0.5,
        0,
        V,
        dist.group.WORLD.group_name,
        False,
        "partial",  # input_grad: on one process the same gradient as "reduced", through the option's path
        -100,
        "sum",
        0.1,
        1e-3,
        None,
        1.0,
        3,
        "reference",
        [True, True, False, True],
    )


def _transform(n, g):
    x, w, b, t = _base(n, g)
    t[0, 1] = -100
    e = torch.rand(n, 2, generator=g)
    opts = memops.registry.encode_options({"gamma": 1.5})
    return (
        x,
        w,
        t,
        b,
        [e],
        None,
        "_contract_focal",
        opts,
        -100,
        "mean",
        None,
        1.0,
        3,
        "reference",
        [True, True, True, True],
    )


def _kept(t, g):
    """A sampling mask: 3 kept ids per token, -1 padding and duplicates among them."""
    mask = torch.randint(-1, V, (*t.shape, 3), generator=g)
    mask[..., 2] = mask[..., 1]
    return mask


def _logprobs(n, g):
    x, w, b, t = _base(n, g)
    temps = torch.rand(t.shape, generator=g) + 0.5  # a temperature per token (the option then 1)
    return (x, w, t, b, _kept(t, g), temps, 1.0, 1.3, 2.5, True, True, True, True, 3, "accurate", "kept")


def _grpo(n, g):
    x, w, b, t = _base(n, g)
    tw = torch.rand(t.shape, generator=g) * (torch.rand(t.shape, generator=g) < 0.7)
    adv = torch.randn(t.shape, generator=g)
    old, ref = (torch.randn(t.shape, generator=g) * 0.1 - 2.5 for _ in range(2))
    ent_w = -0.01 * (tw != 0) / t.numel()
    opts = (
        "grpo",
        "token",
        0.04,
        0.2,
        0.28,
        3.0,
        True,
        1.0,
        1.05,
        0.9,
        1.1,
        2.5,
        True,
        3,
        True,
        "reference",
        "full",
        [True, True, True],
    )
    return (x, w, t, b, tw, adv, old, ref, ent_w, _kept(t, g), None, *opts)


def _distill(n, g):
    x, w, b, t = _base(n, g)
    t[0, 1] = -100
    xt, wt = torch.randn(n, 2, D + 2, generator=g), torch.randn(V, D + 2, generator=g)
    opts = (0.3, 1.5, 0.2, -100, "batchmean", 1.2, 3.0, 0.8, 2.5, True, 3, "accurate", [True, True, True])
    return (x, w, t, b, xt, wt, None, None, None, None, *opts)


def _mtp(n, g):
    """Two depths over 2 sequences of ``n`` tokens, shifts 1 and 2, a document restart halfway."""
    hs = torch.randn(2, 2, n, D, generator=g)
    w, b = torch.randn(V, D, generator=g), torch.randn(V, generator=g)
    t = torch.randint(0, V, (2, n), generator=g)
    t[0, 0] = -100
    pos = torch.arange(n).repeat(2, 1)
    pos[1, n // 2 :] -= n // 2
    dw = torch.tensor([1.0, 0.3])
    opts = ((1, 2), -100, "mean", 0.1, 1e-3, 4.0, 0.9, 3, "reference", [True, True, False, True])
    return (hs, w, t, b, None, torch.rand(V, generator=g) + 0.5, dw, pos, *opts)


def _parallel(base, name: str, sequence_parallel: bool):
    """``base``'s sample for the vocabulary-parallel op: the whole vocabulary on the one-process group, the
    tokens split over it when ``sequence_parallel`` (all on this rank: the gathered path still runs)."""
    inputs = len(SPECS[name].inputs)

    def sample(n, g):
        args = base(n, g)
        input_grad = "reduced" if sequence_parallel else "partial"  # "partial" is refused with sequence_parallel
        return (*args[:inputs], 0, V, dist.group.WORLD.group_name, sequence_parallel, input_grad, *args[inputs:])

    return sample


SAMPLES = {
    "vocab_parallel_logprobs": _parallel(_logprobs, "vocab_parallel_logprobs", True),
    "vocab_parallel_grpo": _parallel(_grpo, "vocab_parallel_grpo", True),
    "vocab_parallel_distill": _parallel(_distill, "vocab_parallel_distill", False),
    "vocab_parallel_mtp_ce": _parallel(_mtp, "vocab_parallel_mtp_ce", False),
    "linear_mtp_ce": _mtp,
    "linear_distill": _distill,
    "linear_ce": _ce,
    "vocab_parallel_ce": _vocab_parallel,
    "linear_transform": _transform,
    "linear_logprobs": _logprobs,
    "linear_grpo": _grpo,
}


@memops.transform("_contract_focal")
def _focal(logits, target, weight, gamma=2.0):
    logp = torch.log_softmax(logits, -1).gather(1, target[:, None]).squeeze(1)
    return -weight * (1 - logp.exp()).pow(gamma) * logp


def _discovered() -> list[str]:
    names = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("memops::")}
    return sorted(n for n in names if not n.endswith("_backward"))


def test_every_op_is_declared_and_sampled():
    ops = _discovered()
    assert ops == sorted(SPECS), "every memops op comes from a declared family"
    assert ops == sorted(SAMPLES), f"give each op a sample here: {sorted(set(ops) - set(SAMPLES))}"
    for name in ops:
        assert hasattr(torch.ops.memops, name + "_backward")


def _requiring_grad(args, spec):
    a = spec.bind(args)
    for i in spec.inputs:
        v = getattr(a, i.name)
        if i.grad and v is not None:
            for t in v if isinstance(v, list) else [v]:
                if t.is_floating_point():  # a class-index target has a gradient slot but no gradient
                    t.requires_grad_(True)
    return args


def _scalar(spec, out):
    """A scalar of every differentiable output (uneven weights on per-token ones)."""
    total = 0
    for name, o in zip(spec.outputs, out):
        if name in spec.differentiable:
            total = total + (o * torch.cos(o.detach())).sum() if o.dim() else total + o
    return total


@pytest.mark.parametrize("name", _discovered())
def test_opcheck(name):
    spec = SPECS[name]
    g = torch.Generator().manual_seed(0)
    args = _requiring_grad(SAMPLES[name](4, g), spec)
    torch.library.opcheck(spec.op().default, args)
    out = spec.op()(*args)
    grads = [torch.randn(o.shape, generator=g) if n in spec.differentiable else None for n, o in zip(spec.outputs, out)]
    grads = [gr for n, gr in zip(spec.outputs, grads) if n in spec.differentiable]
    torch.library.opcheck(spec.backward_op().default, backward_op_args(name, args, grads))


def _leaves(args, spec):
    a = spec.bind(args)
    leaves = []
    for i in spec.inputs:
        v = getattr(a, i.name)
        if i.grad and v is not None:
            leaves.extend(t for t in (v if isinstance(v, list) else [v]) if t.is_floating_point())
    return leaves


@pytest.mark.parametrize("name", _discovered())
def test_sync_free_forward_and_backward_make_no_sync(name, plan_small_calls):
    """Sync-free (``memops.sync_free()``), the op's forward with its gradients, autograd's backward and the
    backward op recomputing every gradient (``have`` all False) make no device-to-host sync; without it the
    same calls make some (the counter sees inside the op).  Rows are planned at every size here."""
    spec = SPECS[name]

    def calls():
        g = torch.Generator().manual_seed(3)
        args = _requiring_grad(SAMPLES[name](6, g), spec)
        out = spec.op()(*args)
        _scalar(spec, out).backward()
        grads = [torch.randn(o.shape, generator=g) for n, o in zip(spec.outputs, out) if n in spec.differentiable]
        bargs = list(backward_op_args(name, args, grads))
        bargs[-1] = [False] * len(bargs[-1])  # nothing precomputed: the recompute path
        spec.backward_op()(*bargs)

    from memops.ops import reducer

    with Syncs() as default:
        calls()
    reducer._TILED.clear()  # the shard layout's first check, sync-free: a device-side assert
    with memops.sync_free(), Syncs() as free:
        calls()
    assert default.seen, f"{name}: the counter saw no sync in the default path"
    assert free.seen == [], f"{name}: sync-free path synced: {free.seen}"


@pytest.mark.parametrize("name", _discovered())
def test_compile_fullgraph_dynamic_compiles_once(name):
    spec = SPECS[name]
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")

    def step(*args):
        return _scalar(spec, spec.op()(*args))

    compiled = torch.compile(step, backend=counter, fullgraph=True, dynamic=True)
    first = None
    for n in (5, 8, 13):
        g = torch.Generator().manual_seed(n)
        args = _requiring_grad(SAMPLES[name](n, g), spec)
        with torch._dynamo.config.patch(error_on_recompile=first is not None):
            compiled(*args).backward()
        first = counter.frame_count if first is None else first
        got = [t.grad for t in _leaves(args, spec)]
        args2 = _requiring_grad(SAMPLES[name](n, torch.Generator().manual_seed(n)), spec)
        step(*args2).backward()
        want = [t.grad for t in _leaves(args2, spec)]
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert first >= 1 and counter.frame_count == first, f"{name}: a new token count recompiled"


_LOAD = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    import memops
    sys.path.insert(0, {tests!r})
    import test_contract  # registers the sample transform
    dist.init_process_group("gloo", store=dist.FileStore({store!r}, 1), rank=0, world_size=1)
    for name in {names!r}:
        ep = torch.export.load({root!r} + "/" + name + ".pt2")
        args, want = torch.load({root!r} + "/" + name + ".args", weights_only=False)
        got = ep.module()(*args)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, equal_nan=True)
        print("loaded", name)
    dist.destroy_process_group()
    """
)


class _Call(torch.nn.Module):
    def __init__(self, spec, options):
        super().__init__()
        self.spec, self.options = spec, options

    def forward(self, *tensors):
        return self.spec.op()(*tensors, *self.options)


def test_export_save_load_in_a_fresh_process(tmp_path):
    names = _discovered()
    for name in names:
        spec = SPECS[name]
        args = SAMPLES[name](4, torch.Generator().manual_seed(1))
        k = len(spec.inputs)
        tensors, options = args[:k], args[k:]
        if spec.forward_grads:  # export records the inference graph: no gradient work
            options = options[:-1] + ([False] * len(options[-1]),)
        mod = _Call(spec, options)
        ep = torch.export.export(mod, tuple(tensors))
        assert sum(n.target is spec.op().default for n in ep.graph.nodes) == 1
        torch.export.save(ep, str(tmp_path / f"{name}.pt2"))
        torch.save((tensors, mod(*tensors)), tmp_path / f"{name}.args")
    code = _LOAD.format(
        tests=os.path.dirname(__file__), store=str(tmp_path / "store2"), names=names, root=str(tmp_path)
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # only the script's own lines: torch 2.9's gloo prints a line of its own on stdout
    assert [ln for ln in done.stdout.splitlines() if ln.startswith("loaded ")] == [f"loaded {n}" for n in names]


def test_docs_list_every_schema():
    """docs/architecture.md holds ``python -m memops schemas``' output (regenerate it with that command)."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "architecture.md").read_text()
    listed = memops.contract.schemas()
    assert len(listed) == 2 * len(SPECS)
    for line in listed:
        assert line in text


def test_front_end_defaults_are_the_declared_ones():
    """A front end's keyword defaults equal its family's option defaults: the declaration stays the one place
    an option's default lives (a front end only repeats it in its signature)."""
    import inspect

    from memops import distributed

    front_ends = {
        "linear_ce": memops.linear_cross_entropy,
        "vocab_parallel_ce": distributed.vocab_parallel_cross_entropy,
        "vocab_parallel_logprobs": distributed.vocab_parallel_logprobs,
        "vocab_parallel_grpo": distributed.vocab_parallel_grpo_loss,
        "vocab_parallel_distill": distributed.vocab_parallel_distillation_loss,
        "linear_transform": memops.linear_loss,
        "linear_logprobs": memops.linear_logprobs,
        "linear_grpo": memops.linear_grpo_loss,
        "linear_distill": memops.linear_distillation_loss,
        "linear_mtp_ce": memops.linear_mtp_cross_entropy,
        "vocab_parallel_mtp_ce": distributed.vocab_parallel_mtp_cross_entropy,
    }
    assert set(front_ends) == set(SPECS)
    checked = 0
    for name, fn in front_ends.items():
        params = inspect.signature(fn).parameters
        for option in SPECS[name].options:
            p = params.get(option.name)
            if option.name == "precision":  # the front ends' None: memops.set_precision's global choice
                assert p is not None and p.default is None, f"{fn.__name__}(precision=None)"
                continue
            if p is not None and p.default is not inspect.Parameter.empty and option.default is not None:
                assert p.default == option.default, f"{fn.__name__}({option.name}=...)"
                checked += 1
    assert checked >= 50


# ---- function transforms: torch.func.grad / vjp, forward-mode AD, vmap, higher order -----------------


def _as_function_of_leaves(name, n=4, seed=5, dtype=torch.float64):
    """``(f, leaves)``: ``f(*leaves)`` is the sample's scalar of every differentiable output with the
    gradient inputs replaced by ``leaves`` (float64 copies of the sample's)."""
    spec = SPECS[name]
    args = list(SAMPLES[name](n, torch.Generator().manual_seed(seed)))
    args = [
        a.to(dtype)
        if isinstance(a, torch.Tensor) and a.is_floating_point()
        else [e.to(dtype) for e in a]
        if isinstance(a, list) and a and isinstance(a[0], torch.Tensor)
        else a
        for a in args
    ]
    where = []  # (argument position, list index or None) of each gradient input
    for k, i in enumerate(spec.inputs):
        v = args[k]
        if i.grad and v is not None:
            if isinstance(v, list):
                where += [(k, j) for j in range(len(v))]
            elif v.is_floating_point():
                where += [(k, None)]
    leaves = [args[k] if j is None else args[k][j] for k, j in where]

    def f(*ls):
        call = [list(a) if isinstance(a, list) else a for a in args]
        for (k, j), t in zip(where, ls):
            if j is None:
                call[k] = t
            else:
                call[k][j] = t
        return _scalar(spec, spec.op()(*call))

    return f, leaves


def _autograd_grads(f, leaves):
    ls = [t.detach().clone().requires_grad_(True) for t in leaves]
    return torch.autograd.grad(f(*ls), ls)


@pytest.mark.parametrize("name", _discovered())
def test_func_grad_and_vjp_match_autograd(name):
    f, leaves = _as_function_of_leaves(name)
    want = _autograd_grads(f, leaves)
    if PUBLIC:  # torch's register_autograd function refuses functorch; the front ends name the op
        with pytest.raises(RuntimeError, match="functorch transforms"):
            torch.func.grad(f, argnums=tuple(range(len(leaves))))(*leaves)
        with pytest.raises(RuntimeError, match="functorch transforms"):
            torch.func.vjp(f, *leaves)
        return
    got = torch.func.grad(f, argnums=tuple(range(len(leaves))))(*leaves)
    value, vjp = torch.func.vjp(f, *leaves)
    by_vjp = vjp(torch.tensor(-1.5, dtype=value.dtype))
    for a, b, c in zip(got, by_vjp, want):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(b, -1.5 * c, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", _discovered())
def test_forward_mode_ad_is_exact_or_refused(name):
    """A scalar loss's tangent is the gradient dotted with the tangents (exact, float64); a per-token
    differentiable output is refused with the op's name, in torch.func.jvp and torch.autograd.forward_ad
    alike -- never a zero tangent."""
    from memops.ops.family import ForwardADError

    spec = SPECS[name]
    f, leaves = _as_function_of_leaves(name)
    g = torch.Generator().manual_seed(9)
    tangents = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in leaves]
    a = spec.bind(SAMPLES[name](4, torch.Generator().manual_seed(5)))
    scalar = spec.forward_grads and spec.scalar(a) and len(spec.live(a)) == 1
    if PUBLIC:  # no forward derivative there: refused by name, never a zero tangent
        import torch.autograd.forward_ad as fwAD

        with pytest.raises(torch_private.FunctorchUnavailable, match=spec.qualname):
            torch.func.jvp(f, tuple(leaves), tuple(tangents))
        with pytest.raises(torch_private.FunctorchUnavailable, match=spec.qualname), fwAD.dual_level():
            f(*(fwAD.make_dual(p, t) for p, t in zip(leaves, tangents)))
        return
    if not scalar:
        with pytest.raises(ForwardADError, match=spec.qualname):
            torch.func.jvp(f, tuple(leaves), tuple(tangents))
        return
    want = sum((gr * t).sum() for gr, t in zip(_autograd_grads(f, leaves), tangents))
    _, got = torch.func.jvp(f, tuple(leaves), tuple(tangents))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert got.abs() > 1e-6
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        out = f(*(fwAD.make_dual(p, t) for p, t in zip(leaves, tangents)))
        torch.testing.assert_close(fwAD.unpack_dual(out).tangent, want, rtol=1e-12, atol=1e-12)
    jac = torch.func.jacfwd(f, argnums=0)(*leaves)
    torch.testing.assert_close(jac, _autograd_grads(f, leaves)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", _discovered())
def test_vmap_of_the_op_and_of_its_gradient(name):
    """``torch.func.vmap`` over the op (the first gradient input batched) equals one call per batch element,
    and so does ``vmap(grad(...))`` (the backward op batched too)."""
    f, leaves = _as_function_of_leaves(name)
    g = torch.Generator().manual_seed(2)
    batch = torch.stack(
        [leaves[0] + 0.1 * k * torch.randn(leaves[0].shape, generator=g, dtype=leaves[0].dtype) for k in range(3)]
    )

    def first(x):
        return f(x, *leaves[1:])

    got = torch.func.vmap(first)(batch)
    torch.testing.assert_close(got, torch.stack([first(b) for b in batch]), rtol=1e-12, atol=1e-12)
    if PUBLIC:  # vmap of the op works (register_vmap); of its gradient, torch.func.grad is refused
        with pytest.raises(RuntimeError, match="functorch transforms"):
            torch.func.vmap(torch.func.grad(first))(batch)
        return
    got = torch.func.vmap(torch.func.grad(first))(batch)
    want = torch.stack([_autograd_grads(first, [b])[0] for b in batch])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", _discovered())
def test_higher_order_derivatives_and_legacy_batched_grads_are_refused(name):
    from memops.ops.family import HigherOrderError

    spec = SPECS[name]
    f, leaves = _as_function_of_leaves(name)
    ls = [t.detach().clone().requires_grad_(True) for t in leaves]
    with pytest.raises(HigherOrderError, match=spec.qualname):
        torch.autograd.grad(f(*ls), ls, create_graph=True)
    if not PUBLIC:  # torch.func is refused there (test_func_grad_and_vjp_match_autograd)
        with pytest.raises(HigherOrderError, match=spec.qualname):
            torch.func.grad(lambda x: torch.func.grad(f)(x, *leaves[1:]).sum())(leaves[0])
        with pytest.raises(HigherOrderError, match=spec.qualname):
            torch.func.hessian(f)(*leaves)
    out = f(*ls)
    with pytest.raises(NotImplementedError, match="is_grads_batched"):
        torch.autograd.grad(out.expand(2), ls[0], torch.ones(2, 2, dtype=out.dtype), is_grads_batched=True)
