"""memops.linear_logprobs against the float64 references on full logits; what it shares with GRPO (matmul work,
errors, gradcheck, compile, export: GRPO's own tests are tests/test_grpo.py)."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch
import torch._dynamo
from helpers import MatmulFlops, backward_op_args, projection_flops
from hypothesis import given
from hypothesis import strategies as st
from reference import ref_linear_logprobs, ref_logprob_extras

import memops


def _close(a, b, what, tol=1e-9, equal_nan=False):
    assert a.shape == b.shape, f"{what}: shape {a.shape} vs {b.shape}"
    torch.testing.assert_close(a, b, rtol=tol, atol=tol, equal_nan=equal_nan, msg=lambda m: f"{what}: {m}")


def _same_grads(ours, ref, tensors, equal_nan=False):
    """The gradients of two scalars with respect to those of ``tensors`` that require grad agree."""
    names = [n for n, t in zip(("x", "w", "b"), tensors) if t is not None and t.requires_grad]
    for a, r, name in zip(_grads(ours, tensors), _grads(ref, tensors), names):
        _close(a, r, f"grad {name}", equal_nan=equal_nan)


def _params(g, lead, d, v, bias, dtype=torch.float64, needs=(True, True, True)):
    x = torch.randn(*lead, d, generator=g, dtype=dtype)
    w = torch.randn(v, d, generator=g, dtype=dtype) * (2 / math.sqrt(d))
    b = torch.randn(v, generator=g, dtype=dtype) if bias else None
    for t, n in zip((x, w, b), needs):
        if t is not None:
            t.requires_grad_(bool(n))
    return x, w, b


def _grads(out, tensors, grad_out=None):
    tensors = [t for t in tensors if t is not None and t.requires_grad]
    return list(torch.autograd.grad(out, tensors, grad_out)) if tensors else []


@st.composite
def logprob_case(draw):
    b, t = draw(st.integers(0, 6)), draw(st.integers(1, 40))
    return dict(
        lead=draw(st.sampled_from([(b, t), (b * t,)])),
        d=draw(st.integers(1, 16)),
        v=draw(st.sampled_from([1, 2, 7, 31, 97]) | st.integers(1, 130)),
        bias=draw(st.booleans()),
        temperature=draw(st.sampled_from([1.0, 0.7]) | st.floats(0.05, 4.0)),
        logit_scale=draw(st.sampled_from([1.0, 0.5, 1.7])),
        softcap=draw(st.sampled_from([None, None, 2.0, 30.0])),
        chunk_size=draw(st.none() | st.integers(1, 64)),
        outputs=draw(st.sampled_from(["logp", "entropy", "both"])),
        needs=draw(st.sampled_from([(1, 1, 1), (1, 0, 0), (0, 1, 1)])),
        seed=draw(st.integers(0, 2**16)),
    )


@given(logprob_case())
def test_logprobs_and_entropy_match_reference(case):
    g = torch.Generator().manual_seed(case["seed"])
    x, w, b = _params(g, case["lead"], case["d"], case["v"], case["bias"], needs=case["needs"])
    target = torch.randint(0, case["v"], case["lead"], generator=g)
    if case["seed"] % 2:
        target = target.int()
    kw = dict(temperature=case["temperature"], logit_scale=case["logit_scale"], softcap=case["softcap"])
    logp, ent = memops.linear_logprobs(x, w, target, b, return_entropy=True, chunk_size=case["chunk_size"], **kw)
    ref_logp, ref_ent = ref_linear_logprobs(x, w, target, b, **kw)
    _close(logp, ref_logp, "logprobs")
    _close(ent, ref_ent, "entropy")
    with torch.no_grad():
        names = ("log_sum_sq_probs", "mean_logits", "is_top1")
        extras = memops.linear_logprobs(x, w, target, b, extras=names, chunk_size=case["chunk_size"], **kw)
        ref_extras = ref_logprob_extras(x, w, target, b, **kw)
    assert set(extras) == {"log_probs", *names}
    _close(extras["log_probs"], ref_logp, "logprobs (with extras)")
    _close(extras["log_sum_sq_probs"], ref_extras["log_sum_sq_probs"], "log_sum_sq_probs")
    _close(extras["mean_logits"], ref_extras["mean_logits"], "mean_logits")
    assert torch.equal(extras["is_top1"], ref_extras["is_top1"])
    assert logp.dtype == torch.float64
    # random per-token grad_output on either output, or both
    g1, g2 = (
        torch.randn(target.shape, generator=g, dtype=torch.float64),
        torch.randn(target.shape, generator=g, dtype=torch.float64),
    )
    if case["outputs"] == "logp":
        ours, ref = (logp * g1).sum(), (ref_logp * g1).sum()
    elif case["outputs"] == "entropy":
        ours, ref = (ent * g2).sum(), (ref_ent * g2).sum()
    else:
        ours, ref = (logp * g1 + ent * g2).sum(), (ref_logp * g1 + ref_ent * g2).sum()
    _same_grads(ours, ref, (x, w, b))


def test_logprobs_without_entropy_and_fp32():
    g = torch.Generator().manual_seed(3)
    x, w, b = _params(g, (3, 9), 12, 50, True, dtype=torch.float32)
    t = torch.randint(0, 50, (3, 9), generator=g)
    logp = memops.linear_logprobs(x, w, t, b, temperature=0.9, chunk_size=4)
    ref, _ = ref_linear_logprobs(x.double(), w.double(), t, b.double(), temperature=0.9)
    assert logp.dtype == torch.float32 and logp.shape == t.shape
    _close(logp.double(), ref, "fp32 logprobs", tol=1e-5)


def test_matmul_work():
    n, d, v = 48, 8, 40
    g = torch.Generator().manual_seed(0)
    x, w, b = _params(g, (4, 12), d, v, True, dtype=torch.float32)
    ids = torch.randint(0, v, (4, 12), generator=g)
    mask, adv = torch.ones(4, 12), torch.randn(4, generator=g)
    with torch.no_grad(), MatmulFlops() as m:
        memops.linear_logprobs(x, w, ids, b, return_entropy=True, chunk_size=7)
    assert m.flops == projection_flops(n, v, d)  # no_grad: forward only
    with MatmulFlops() as m:
        loss, _ = memops.linear_grpo_loss(x, w, ids, mask, adv, bias=b, old_logprobs=torch.randn(4, 12), chunk_size=7)
        loss.backward()
    assert m.flops == 3 * projection_flops(n, v, d)  # as the unfused baseline: no second projection pass
    x.grad = w.grad = None
    with MatmulFlops() as m:
        logp = memops.linear_logprobs(x, w, ids, b, chunk_size=7)
        (logp * torch.randn(4, 12)).sum().backward()
    assert m.flops == 4 * projection_flops(n, v, d)  # per-token grad_output: recompute bound
    w.requires_grad_(False)
    with MatmulFlops() as m:
        loss, _ = memops.linear_grpo_loss(x, w, ids, mask, adv, chunk_size=7)
        loss.backward()
    assert m.flops == 2 * projection_flops(n, v, d)  # frozen head: no weight-gradient matmul
    w.requires_grad_(True)
    for loss_type in ("cispo", "sapo", "luspo"):
        with MatmulFlops() as m:
            loss, _ = memops.linear_grpo_loss(
                x, w, ids, mask, adv, loss_type=loss_type, entropy_coef=0.01, chunk_size=7
            )
            loss.backward()
        assert m.flops == 3 * projection_flops(n, v, d)  # every token-level loss type, entropy bonus included
    with MatmulFlops() as m:
        loss, _ = memops.linear_grpo_loss(
            x, w, ids, mask, adv, old_logprobs=torch.randn(4, 12), importance_sampling_level="sequence", chunk_size=7
        )
        loss.backward()
    assert m.flops == 4 * projection_flops(n, v, d)  # GSPO: the log-prob pass, then the gradient pass


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 1e300, 0.5])
def test_zero_gradient_token_with_non_finite_logits_matches_reference(value):
    # linear_logprobs' backward skips tokens with zero grad_output only where their logits are finite
    g = torch.Generator().manual_seed(6)
    x, w, b = _params(g, (2, 6), 5, 17, True)
    ids = torch.randint(0, 17, (2, 6), generator=g)
    mask = torch.ones(2, 6, dtype=torch.float64)
    mask[1, 3] = 0
    with torch.no_grad():
        x[1, 3, 0] = value
    go = torch.randn(2, 6, generator=g, dtype=torch.float64) * mask
    logp, ent = memops.linear_logprobs(x, w, ids, b, return_entropy=True, chunk_size=4)
    ref_logp, ref_ent = ref_linear_logprobs(x, w, ids, b)
    ours, theirs = (logp * go + ent * go).sum(), (ref_logp * go + ref_ent * go).sum()
    _same_grads(ours, theirs, (x, w, b), equal_nan=True)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda x, w, i, m, a: memops.linear_grpo_loss(x, w, i, m[:, :-1], a), "completion_mask shape"),
        (lambda x, w, i, m, a: memops.linear_grpo_loss(x, w, i[:, :-1], m, a), "completion_ids shape"),
        (lambda x, w, i, m, a: memops.linear_grpo_loss(x[0], w, i, m, a), "input must be the completion hidden states"),
        (lambda x, w, i, m, a: memops.linear_grpo_loss(x, w, i, m, a[:-1]), "advantages must have shape [B]=[2]"),
        (lambda x, w, i, m, a: memops.linear_grpo_loss(x, w, i, m, a, loss_type="ppo"), "loss_type must be one of"),
        (lambda x, w, i, m, a: memops.linear_grpo_loss(x, w, i, m, a, temperature=0.0), "temperature must be > 0"),
        (lambda x, w, i, m, a: memops.linear_grpo_loss(x, w, i, m, a, beta=0.1), "beta != 0 needs ref_logprobs"),
        (
            lambda x, w, i, m, a: memops.linear_grpo_loss(x, w, i, m, a, old_logprobs=m[:1].float()),
            "old_logprobs shape",
        ),
        (
            lambda x, w, i, m, a: memops.linear_grpo_loss(x, w, i + 100, m, a),
            "completion_ids value 100 is out of range",
        ),
        (lambda x, w, i, m, a: memops.linear_logprobs(x, w, i, temperature=-1.0), "temperature must be > 0"),
        (lambda x, w, i, m, a: memops.linear_logprobs(x, w, i.float()), "target must hold int64 or int32"),
        (lambda x, w, i, m, a: memops.linear_logprobs(x, w[:, :-1], i), "input's last dim"),
        (lambda x, w, i, m, a: memops.linear_logprobs(x, w, i - 1), "target value -1 is out of range [0, 7)"),
    ],
)
def test_errors_name_the_argument(call, message):
    x, w = torch.randn(2, 3, 4), torch.randn(7, 4)
    ids, mask, adv = torch.randint(0, 7, (2, 3)), torch.ones(2, 3), torch.randn(2)
    ids[0, 0] = 0
    with pytest.raises(ValueError) as info:
        call(x, w, ids, mask, adv)
    assert message in str(info.value)


def _small(dtype=torch.float32, bias=True, lead=(3, 5)):
    g = torch.Generator().manual_seed(0)
    x, w, b = _params(g, lead, 6, 11, bias, dtype=dtype, needs=(False, False, False))
    t = torch.randint(0, 11, lead, generator=g)
    return x, w, b, t


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("lead", [(3, 5), (0,)])
def test_opcheck_logprobs_ops(dtype, lead):
    x, w, b, t = _small(dtype, lead=lead)
    for ent in (False, True):
        torch.library.opcheck(
            torch.ops.memops.linear_logprobs.default,
            (
                x.requires_grad_(),
                w.requires_grad_(),
                t,
                b.requires_grad_(),
                torch.randint(-1, 11, (*lead, 3)) if ent else None,  # a sampling mask, with the kept entropy
                torch.rand(lead, dtype=dtype) + 0.5 if ent else None,  # a temperature per token
                0.8,
                1.0,
                None,
                ent,
                ent,
                ent,
                ent,
                4,
                "accurate",
                "kept" if ent else "full",
            ),
        )
    g1 = torch.randn(t.shape)
    for g2 in (None, torch.randn(t.shape)):
        args = backward_op_args(
            "linear_logprobs",
            (x, w, t, b, None, None, 0.8, 0.7, 3.0, True, False, True, False, 4, "accurate", "full"),
            [g1, g2],
        )
        torch.library.opcheck(torch.ops.memops.linear_logprobs_backward.default, args)


def test_gradcheck_float64():
    x, w, b, t = _small(torch.float64, lead=(2, 3))
    for tensor in (x, w, b):
        tensor.requires_grad_(True)
    g2 = torch.randn(t.shape, dtype=torch.float64)

    def lp(x, w, b):
        logp, ent = memops.linear_logprobs(x, w, t, b, temperature=0.7, return_entropy=True, chunk_size=4)
        return logp, ent * g2

    assert torch.autograd.gradcheck(lp, (x, w, b))
    mask, adv = torch.tensor([[1, 1, 0], [1, 0, 0]]), torch.tensor([0.5, -1.0], dtype=torch.float64)
    old = torch.randn(2, 3, dtype=torch.float64) * 0.1 - 2.4
    ref = torch.randn(2, 3, dtype=torch.float64) * 0.1 - 2.4

    def grpo(x, w, b):
        return memops.linear_grpo_loss(
            x, w, t, mask, adv, bias=b, old_logprobs=old, ref_logprobs=ref, beta=0.1, epsilon_high=10.0, chunk_size=4
        )[0]

    assert torch.autograd.gradcheck(grpo, (x, w, b))


def _grpo_step(x, w, ids, mask, adv, old, ref):
    loss, metrics = memops.linear_grpo_loss(
        x, w, ids, mask, adv, old_logprobs=old, ref_logprobs=ref, beta=0.04, temperature=0.9, chunk_size=5
    )
    ent = memops.linear_logprobs(x, w, ids, temperature=0.9, return_entropy=True, chunk_size=5)[1]
    return loss - 0.01 * (ent * mask).sum() / mask.sum(), metrics["kl"]


def _rl_inputs(t, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, t, 8, generator=g, requires_grad=True)
    w = torch.randn(29, 8, generator=g, requires_grad=True)
    ids = torch.randint(0, 29, (2, t), generator=g)
    mask = (torch.rand(2, t, generator=g) < 0.8).float()
    adv, old, ref = (
        torch.randn(2, generator=g),
        -3 + torch.randn(2, t, generator=g),
        -3 + torch.randn(2, t, generator=g),
    )
    return x, w, ids, mask, adv, old, ref


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_dynamic(backend):
    torch._dynamo.reset()
    cf = torch.compile(_grpo_step, backend=backend, fullgraph=True, dynamic=True)
    for t in (7, 11):
        args = _rl_inputs(t)
        loss, kl = cf(*args)
        grads = torch.autograd.grad(loss, args[:2])
        e_loss, e_kl = _grpo_step(*args)
        e_grads = torch.autograd.grad(e_loss, args[:2])
        torch.testing.assert_close(loss, e_loss)
        torch.testing.assert_close(kl, e_kl)
        for a, b in zip(grads, e_grads):
            torch.testing.assert_close(a, b)
    torch._dynamo.reset()


class TinyPolicy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(29, 8)
        self.lm_head = torch.nn.Linear(8, 29, bias=False)

    def forward(self, ids, mask, adv, old, ref):
        h = self.embed(ids)
        loss, metrics = memops.linear_grpo_loss(
            h, self.lm_head.weight, ids, mask, adv, old_logprobs=old, ref_logprobs=ref, beta=0.04, chunk_size=4
        )
        return loss, memops.linear_logprobs(h, self.lm_head.weight, ids, chunk_size=4), metrics["kl"]


def test_export_round_trip_in_fresh_process(tmp_path):
    torch.manual_seed(0)
    model = TinyPolicy()
    _, _, ids, mask, adv, old, ref = _rl_inputs(6)
    args = (ids, mask, adv, old, ref)
    ep = torch.export.export(model, args)
    targets = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    assert torch.ops.memops.linear_grpo.default in targets and torch.ops.memops.linear_logprobs.default in targets
    expected = model(*args)
    path = tmp_path / "policy.pt2"
    torch.export.save(ep, str(path))
    torch.save(args, tmp_path / "args.pt")
    script = textwrap.dedent(f"""
        import torch, memops
        ep = torch.export.load({str(path)!r})
        args = torch.load({str(tmp_path / "args.pt")!r})
        loss, logp, kl = ep.module()(*args)
        torch.save((loss, logp, kl), {str(tmp_path / "out.pt")!r})
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for a, b in zip(torch.load(tmp_path / "out.pt"), expected):
        torch.testing.assert_close(a, b)


# ---- sampling masks: log-probs over the tokens the sampler kept -------------------------------------------


@st.composite
def kept_case(draw):
    b, t = draw(st.integers(0, 4)), draw(st.integers(1, 12))
    v = draw(st.sampled_from([1, 2, 7, 31]) | st.integers(1, 60))
    return dict(
        lead=draw(st.sampled_from([(b, t), (b * t,)])),
        d=draw(st.integers(1, 8)),
        v=v,
        k=draw(st.sampled_from([1, 2, 5]) | st.integers(1, 2 * v + 2)),
        pad=draw(st.sampled_from([0.0, 0.3, 1.0])),  # the share of -1 entries (1.0: the target alone)
        dup=draw(st.booleans()),
        int32=draw(st.booleans()),
        bias=draw(st.booleans()),
        temperature=draw(st.sampled_from([1.0, 0.6]) | st.floats(0.1, 3.0)),
        logit_scale=draw(st.sampled_from([1.0, 1.7])),
        softcap=draw(st.sampled_from([None, 2.0])),
        entropy_over=draw(st.sampled_from(["full", "kept"])),
        chunk_size=draw(st.none() | st.integers(1, 16)),
        per=draw(st.sampled_from([None, "token", "sequence"])),  # a temperature tensor in place of the float
        seed=draw(st.integers(0, 2**16)),
    )


def _kept_mask(g, lead, v, k, pad, dup, int32=False):
    mask = torch.randint(0, v, (*lead, k), generator=g)
    mask[torch.rand(mask.shape, generator=g) < pad] = -1
    if dup and k > 1:
        mask[..., -1] = mask[..., 0]
    return mask.int() if int32 else mask


@given(kept_case())
def test_sampling_mask_logprobs_and_entropy_match_reference(case):
    """Log-probs renormalized over each token's kept ids (any K, -1 padding, duplicates, the target counted as
    kept), the entropy over the vocabulary or the kept set, and every gradient, against float64."""
    g = torch.Generator().manual_seed(case["seed"])
    x, w, b = _params(g, case["lead"], case["d"], case["v"], case["bias"])
    target = torch.randint(0, case["v"], case["lead"], generator=g)
    mask = _kept_mask(g, case["lead"], case["v"], case["k"], case["pad"], case["dup"], case["int32"])
    temperature = case["temperature"]
    if case["per"]:  # per token, or per sequence ([B, 1]; per token for 1-D targets)
        shape = (*case["lead"][:-1], 1) if case["per"] == "sequence" and len(case["lead"]) == 2 else case["lead"]
        temperature = torch.rand(shape, generator=g, dtype=torch.float64) * 2 + 0.2
    kw = dict(temperature=temperature, logit_scale=case["logit_scale"], softcap=case["softcap"])
    kept = dict(sampling_mask=mask, entropy_over=case["entropy_over"])
    logp, ent = memops.linear_logprobs(
        x, w, target, b, return_entropy=True, chunk_size=case["chunk_size"], **kw, **kept
    )
    ref_logp, ref_ent = ref_linear_logprobs(x, w, target, b, **kw, **kept)
    _close(logp, ref_logp, "kept logprobs")
    _close(ent, ref_ent, f"entropy over {case['entropy_over']}")
    g1 = torch.randn(target.shape, generator=g, dtype=torch.float64)
    g2 = torch.randn(target.shape, generator=g, dtype=torch.float64)
    _same_grads((logp * g1 + ent * g2).sum(), (ref_logp * g1 + ref_ent * g2).sum(), (x, w, b))
    # the log-prob alone (its own recompute path)
    lp = memops.linear_logprobs(x, w, target, b, chunk_size=case["chunk_size"], **kw, sampling_mask=mask)
    ref_lp, _ = ref_linear_logprobs(x, w, target, b, **kw, sampling_mask=mask)
    _close(lp, ref_lp, "kept logprobs without entropy")
    _same_grads((lp * g1).sum(), (ref_lp * g1).sum(), (x, w, b))


def test_sampling_mask_of_the_whole_vocabulary_changes_nothing():
    g = torch.Generator().manual_seed(3)
    x, w, b = _params(g, (4, 5), 6, 9, True)
    t = torch.randint(0, 9, (4, 5), generator=g)
    every = torch.arange(9).expand(4, 5, 9)
    ours = memops.linear_logprobs(x, w, t, b, return_entropy=True, sampling_mask=every, entropy_over="kept")
    plain = memops.linear_logprobs(x, w, t, b, return_entropy=True)
    for a, r in zip(ours, plain):
        _close(a, r, "every id kept", tol=1e-12)


def test_sampling_mask_keeps_far_below_the_row_max_finite():
    """A kept set whose logits are all far below the row's maximum (exp underflows against it): the kept set's
    own maximum stabilizes the sum, so the log-prob is finite and exact."""
    x = torch.zeros(1, 2, dtype=torch.float64)
    x[0, 0] = 1.0
    w = torch.zeros(5, 2, dtype=torch.float64)
    w[0, 0] = 2000.0  # token 0 dominates the row by 2000 nats
    w[3, 0], w[4, 0] = 1.0, 2.0
    t = torch.tensor([3])
    mask = torch.tensor([[4, -1]])
    logp = memops.linear_logprobs(x.float(), w.float(), t, sampling_mask=mask)
    expected = 1.0 - math.log(math.exp(1.0) + math.exp(2.0))
    assert abs(logp.item() - expected) < 1e-6


@given(logprob_case())
def test_per_token_temperature_matches_reference(case):
    """A temperature per token (or per sequence), with bias, soft-cap and logit scale in the unfused order,
    against float64: log-probs, entropy and every gradient."""
    g = torch.Generator().manual_seed(case["seed"])
    x, w, b = _params(g, case["lead"], case["d"], case["v"], case["bias"], needs=case["needs"])
    target = torch.randint(0, case["v"], case["lead"], generator=g)
    lead = case["lead"]
    shape = (*lead[:-1], 1) if (len(lead) == 2 and case["seed"] % 2) else lead
    temperature = torch.rand(shape, generator=g, dtype=torch.float64) * 3 + 0.05
    kw = dict(temperature=temperature, logit_scale=case["logit_scale"], softcap=case["softcap"])
    logp, ent = memops.linear_logprobs(x, w, target, b, return_entropy=True, chunk_size=case["chunk_size"], **kw)
    ref_logp, ref_ent = ref_linear_logprobs(x, w, target, b, **kw)
    _close(logp, ref_logp, "logprobs, a temperature per token")
    _close(ent, ref_ent, "entropy, a temperature per token")
    g1 = torch.randn(target.shape, generator=g, dtype=torch.float64)
    g2 = torch.randn(target.shape, generator=g, dtype=torch.float64)
    _same_grads((logp * g1 + ent * g2).sum(), (ref_logp * g1 + ref_ent * g2).sum(), (x, w, b))


def test_temperature_tensor_errors_name_the_argument():
    x, w, t = torch.randn(2, 3, 4), torch.randn(7, 4), torch.randint(0, 7, (2, 3))
    for temperature, message in [
        (torch.ones(2, 3, requires_grad=True), "temperature requires grad"),
        (torch.ones(3, 2), "temperature shape (3, 2) must broadcast to target's shape (2, 3)"),
        (torch.tensor([[1.0], [0.0]]), "every temperature must be finite and > 0, got 0.0"),
        (torch.tensor([[1.0], [float("nan")]]), "every temperature must be finite and > 0, got nan"),
        (torch.ones(2, 3, dtype=torch.long), "a temperature tensor must hold floats"),
    ]:
        with pytest.raises(ValueError) as info:
            memops.linear_logprobs(x, w, t, temperature=temperature)
        assert message in str(info.value), (message, str(info.value))
    with torch.no_grad():  # no gradient is wanted: a temperature that requires grad is used as a value
        memops.linear_logprobs(x, w, t, temperature=torch.ones(2, 1, requires_grad=True))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(sampling_mask=torch.full((2, 3, 2), 7)), "sampling_mask value 7 is out of range [0, 7)"),
        (dict(sampling_mask=torch.full((2, 3, 2), -2)), "sampling_mask value -2 is out of range"),
        (dict(sampling_mask=torch.zeros(2, 3, dtype=torch.long)), "sampling_mask must have shape target.shape + (K,)"),
        (dict(sampling_mask=torch.zeros(2, 3, 0, dtype=torch.long)), "with K >= 1"),
        (dict(sampling_mask=torch.zeros(2, 3, 2)), "sampling_mask must hold int64 or int32"),
        (dict(entropy_over="kept"), "entropy_over='kept' needs sampling_mask"),
        (dict(sampling_mask=torch.zeros(2, 3, 1, dtype=torch.long), entropy_over="vocab"), "entropy_over must be"),
    ],
)
def test_sampling_mask_errors_name_the_argument(kwargs, message):
    x, w, t = torch.randn(2, 3, 4), torch.randn(7, 4), torch.randint(0, 7, (2, 3))
    with pytest.raises(ValueError) as info:
        memops.linear_logprobs(x, w, t, **kwargs)
    assert message in str(info.value)
