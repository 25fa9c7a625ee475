"""memops.linear_grpo_loss against TRL 1.16's formulas (the float64 reference on full logits): every loss type, the
masked tokens' work and their non-finite terms, the backward, opcheck of the op."""

from __future__ import annotations

import pytest
import torch
from helpers import MatmulFlops, backward_op_args, projection_flops
from hypothesis import given
from hypothesis import strategies as st
from reference import ref_grpo_loss, ref_linear_logprobs
from test_logprobs import _close, _params, _same_grads, _small

import memops

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo"]


@st.composite
def grpo_case(draw):
    b, t = draw(st.integers(1, 5)), draw(st.integers(1, 24))
    mask_kind = draw(st.sampled_from(["random", "all", "none", "rows"]))
    return dict(
        b=b,
        t=t,
        d=draw(st.integers(1, 12)),
        v=draw(st.sampled_from([2, 13, 61]) | st.integers(1, 90)),
        bias=draw(st.booleans()),
        loss_type=draw(st.sampled_from(LOSS_TYPES)),
        mask=mask_kind,
        old=draw(st.booleans()),
        ref=draw(st.booleans()),
        beta=draw(st.sampled_from([0.0, 0.04, 0.5])),
        eps=(draw(st.sampled_from([0.2, 0.1, 0.0])), draw(st.sampled_from([0.2, 0.28, 1.0]))),
        temperature=draw(st.sampled_from([1.0, 0.6, 1.3])),
        chunk_size=draw(st.none() | st.integers(1, 40)),
        max_len=draw(st.none() | st.integers(24, 40)),
        kept=draw(st.sampled_from([None, 1, 3, 9])),  # a sampling mask of K kept ids per token
        per_sequence_temperature=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def _grpo_inputs(case, g):
    b, t, v = case["b"], case["t"], case["v"]
    x, w, bias = _params(g, (b, t), case["d"], v, case["bias"])
    ids = torch.randint(0, v, (b, t), generator=g)
    mask = {
        "random": torch.rand(b, t, generator=g) < 0.7,
        "all": torch.ones(b, t, dtype=torch.bool),
        "none": torch.zeros(b, t, dtype=torch.bool),
        "rows": (torch.rand(b, 1, generator=g) < 0.5).expand(b, t),
    }[case["mask"]].long()
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    kept = None
    if case.get("kept"):
        kept = torch.randint(-1, v, (b, t, case["kept"]), generator=g)
    case["sampling_mask"] = kept
    if case.get("per_sequence_temperature"):  # one temperature per completion, [B, 1]
        case["temperature"] = torch.rand(b, 1, generator=g, dtype=torch.float64) + 0.4
    with torch.no_grad():
        logp, _ = ref_linear_logprobs(x, w, ids, bias, temperature=case["temperature"], sampling_mask=kept)
    # old / ref log-probs near the current ones, so some ratios fall inside and some outside the clip range
    old = logp + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64) if case["old"] else None
    ref = logp + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64) if (case["ref"] or case["beta"]) else None
    return x, w, bias, ids, mask, adv, old, ref


@given(grpo_case())
def test_grpo_loss_and_gradients_match_trl_formulas(case):
    g = torch.Generator().manual_seed(case["seed"])
    x, w, bias, ids, mask, adv, old, ref = _grpo_inputs(case, g)
    kw = dict(
        bias=bias,
        old_logprobs=old,
        ref_logprobs=ref,
        beta=case["beta"],
        epsilon_low=case["eps"][0],
        epsilon_high=case["eps"][1],
        temperature=case["temperature"],
        loss_type=case["loss_type"],
        max_completion_length=case["max_len"],
        sampling_mask=case["sampling_mask"],
    )
    loss, metrics = memops.linear_grpo_loss(x, w, ids, mask, adv, chunk_size=case["chunk_size"], **kw)
    ref_loss, ref_logp = ref_grpo_loss(x, w, ids, mask, adv, **kw)
    _close(loss, ref_loss, "loss")
    _same_grads(loss, ref_loss, (x, w, bias))
    # metrics, from the published definitions
    m = mask.double()
    denom = m.sum().clamp(min=1)
    ratio = torch.exp(ref_logp - old) if old is not None else torch.ones_like(ref_logp)
    low = ((ratio < 1 - case["eps"][0]) & (adv[:, None] < 0)).double()
    high = ((ratio > 1 + case["eps"][1]) & (adv[:, None] > 0)).double()
    _close(metrics["clip_ratio/low_mean"], (low * m).sum() / denom, "low clip ratio", tol=1e-12)
    _close(metrics["clip_ratio/high_mean"], (high * m).sum() / denom, "high clip ratio", tol=1e-12)
    _close(metrics["clip_ratio/region_mean"], (((low + high) > 0) * m).sum() / denom, "region clip ratio", tol=1e-12)
    if ref is not None:
        k3 = torch.exp(ref - ref_logp) - (ref - ref_logp) - 1
        _close(metrics["kl"], (k3 * m).sum() / denom, "kl")
    else:
        assert "kl" not in metrics


def test_grpo_dapo_num_items_and_no_old_gives_plain_policy_gradient():
    g = torch.Generator().manual_seed(5)
    x, w, _ = _params(g, (2, 6), 5, 17, False)
    ids = torch.randint(0, 17, (2, 6), generator=g)
    mask = torch.ones(2, 6, dtype=torch.long)
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    loss, _ = memops.linear_grpo_loss(x, w, ids, mask, adv, loss_type="dapo", num_items=24)
    logp, _ = ref_linear_logprobs(x, w, ids)
    # without old log-probs the ratio is exp(logp - logp.detach()) = 1: loss = -mean(adv), grad = -adv * dlogp
    _close(loss, -(adv[:, None].expand(2, 6)).sum() / 24, "dapo loss")
    (gx,) = torch.autograd.grad(loss, x)
    (rx,) = torch.autograd.grad(-(adv[:, None] * logp).sum() / 24, x)
    _close(gx, rx, "policy gradient")


N_MASKED, D_MASKED, V_MASKED, K_MASKED = 48, 8, 40, 13


def _masked_inputs():
    """fp32 GRPO inputs, [4, 12] tokens of which K_MASKED are masked, and the generator for more."""
    g = torch.Generator().manual_seed(1)
    x, w, b = _params(g, (4, 12), D_MASKED, V_MASKED, True, dtype=torch.float32)
    ids = torch.randint(0, V_MASKED, (4, 12), generator=g)
    mask = torch.ones(4, 12)
    mask.view(-1)[torch.randperm(N_MASKED, generator=g)[:K_MASKED]] = 0
    adv, old, ref = (
        torch.randn(4, generator=g),
        torch.randn(4, 12, generator=g) - 3,
        torch.randn(4, 12, generator=g) - 3,
    )
    return g, x, w, b, ids, mask, adv, old, ref


@pytest.mark.usefixtures("plan_small_calls")
def test_masked_tokens_cost_forward_work_only():
    n, d, v, k = N_MASKED, D_MASKED, V_MASKED, K_MASKED
    g, x, w, b, ids, mask, adv, old, ref = _masked_inputs()
    with MatmulFlops() as m:
        loss, _ = memops.linear_grpo_loss(
            x, w, ids, mask, adv, bias=b, old_logprobs=old, ref_logprobs=ref, beta=0.04, chunk_size=7
        )
        loss.backward()
    # every token's log-prob (the loss and metrics read them), gradient matmuls for unmasked ones only
    assert m.flops == projection_flops(n, v, d) + 2 * projection_flops(n - k, v, d)
    # a caller's own masked loss on linear_logprobs: zero-gradient tokens are not recomputed in backward
    x.grad = w.grad = b.grad = None
    with MatmulFlops() as m:
        logp = memops.linear_logprobs(x, w, ids, b, chunk_size=7)
        (logp * torch.randn(4, 12, generator=g) * mask).sum().backward()
    assert m.flops == projection_flops(n, v, d) + 3 * projection_flops(n - k, v, d)


@pytest.mark.usefixtures("plan_small_calls")
@pytest.mark.parametrize("ref_given", [False, True])
def test_masked_tokens_cost_nothing_without_kl(ref_given):
    # beta = 0 (TRL's default): a masked token's log-prob reaches neither the loss nor its gradients
    # when exp(-old) * |adv| is finite and the logits are, so it is not computed at all; the kl metric
    # (ref_logprobs given) reads every token's log-prob, so then they are computed
    n, d, v, k = N_MASKED, D_MASKED, V_MASKED, K_MASKED
    _, x, w, b, ids, mask, adv, old, ref = _masked_inputs()
    ref = ref if ref_given else None
    with MatmulFlops() as m:
        loss, _ = memops.linear_grpo_loss(
            x, w, ids, mask, adv, bias=b, old_logprobs=old, ref_logprobs=ref, chunk_size=7
        )
        loss.backward()
    assert m.flops == (projection_flops(k, v, d) if ref_given else 0) + 3 * projection_flops(n - k, v, d)
    with torch.no_grad(), MatmulFlops() as m:
        memops.linear_grpo_loss(x, w, ids, mask, adv, bias=b, old_logprobs=old, ref_logprobs=ref, chunk_size=7)
    assert m.flops == projection_flops(n if ref_given else n - k, v, d)


# A masked token whose per-token loss or its derivative is not finite turns the reference's loss or
# gradients NaN (0 * inf): such tokens must be computed in full, the others cost forward work only.


@pytest.mark.parametrize("bad", ["old=-1e4", "old=-inf", "old=nan", "ref=1e4", "adv=inf", "x=nan", "x=inf", "x=1e300"])
@pytest.mark.parametrize("adv_sign", [1.0, -1.0])
@pytest.mark.parametrize("kl", [True, False])  # False: beta = 0 and no ref, where masked tokens may be skipped
def test_masked_token_with_non_finite_terms_matches_reference(bad, adv_sign, kl):
    g = torch.Generator().manual_seed(4)
    x, w, b = _params(g, (2, 6), 5, 17, True)
    ids = torch.randint(0, 17, (2, 6), generator=g)
    mask = torch.ones(2, 6)
    mask[0, 2] = mask[1, 4] = 0
    adv = torch.tensor([adv_sign, 0.5], dtype=torch.float64)
    old = torch.randn(2, 6, generator=g, dtype=torch.float64) - 3
    ref = torch.randn(2, 6, generator=g, dtype=torch.float64) - 3
    what, value = bad.split("=")
    with torch.no_grad():
        {"old": old[0, 2:3], "ref": ref[0, 2:3], "x": x[0, 2, :1], "adv": adv[:1]}[what].fill_(float(value))
    kw = dict(bias=b, old_logprobs=old, ref_logprobs=ref if kl else None, beta=0.04 if kl else 0.0)
    loss, _ = memops.linear_grpo_loss(x, w, ids, mask, adv, chunk_size=4, **kw)
    ref_loss, _ = ref_grpo_loss(x, w, ids, mask, adv, **kw)
    _close(loss, ref_loss, "loss", equal_nan=True)
    _same_grads(loss, ref_loss, (x, w, b), equal_nan=True)


@given(st.data())
def test_masked_tokens_with_random_extreme_terms_match_reference(data):
    # masked tokens skip their gradient matmuls; whatever their old/ref log-probs or hidden states,
    # the loss and gradients (NaN pattern included) are those of the reference
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    b, t, v = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 8)), data.draw(st.integers(2, 20))
    x, w, bias = _params(g, (b, t), 4, v, data.draw(st.booleans()))
    ids = torch.randint(0, v, (b, t), generator=g)
    mask = (torch.rand(b, t, generator=g) < 0.6).long()
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    old = torch.randn(b, t, generator=g, dtype=torch.float64) - 3
    ref = torch.randn(b, t, generator=g, dtype=torch.float64) - 3
    extreme = st.sampled_from([-1e4, 1e4, -800.0, 800.0, float("inf"), -float("inf"), float("nan"), 0.0])
    with torch.no_grad():
        for _ in range(data.draw(st.integers(0, 3))):
            i, j = data.draw(st.integers(0, b - 1)), data.draw(st.integers(0, t - 1))
            where = data.draw(st.sampled_from(["old", "ref", "x", "adv"]))
            {"old": old[i, j : j + 1], "ref": ref[i, j : j + 1], "x": x[i, j, :1], "adv": adv[i : i + 1]}[where].fill_(
                data.draw(extreme)
            )
    beta = data.draw(st.sampled_from([0.0, 0.04]))
    if beta == 0 and data.draw(st.booleans()):
        ref = None  # masked tokens then need not be computed at all (where provably exact)
    if data.draw(st.booleans()):
        old = None
    kw = dict(
        bias=bias,
        old_logprobs=old,
        ref_logprobs=ref,
        beta=beta,
        epsilon_high=data.draw(st.sampled_from([0.2, 1e38])),
        loss_type=data.draw(st.sampled_from(LOSS_TYPES)),
        temperature=data.draw(st.sampled_from([1.0, 0.7])),
    )
    loss, _ = memops.linear_grpo_loss(x, w, ids, mask, adv, chunk_size=data.draw(st.integers(1, 9)), **kw)
    ref_loss, _ = ref_grpo_loss(x, w, ids, mask, adv, **kw)
    _close(loss, ref_loss, "loss", equal_nan=True)
    _same_grads(loss, ref_loss, (x, w, bias), equal_nan=True)


def test_grpo_backward_retain_graph_and_scaled_grad():
    g = torch.Generator().manual_seed(2)
    x, w, b = _params(g, (3, 5), 4, 11, True)
    ids, mask, adv = (
        torch.randint(0, 11, (3, 5), generator=g),
        torch.ones(3, 5),
        torch.randn(3, generator=g, dtype=torch.float64),
    )
    loss, _ = memops.linear_grpo_loss(x, w, ids, mask, adv, bias=b, chunk_size=4)
    (3 * loss).backward(retain_graph=True)
    first = x.grad.clone()
    x.grad = None
    (3 * loss).backward()  # second backward recomputes
    _close(x.grad, first, "second backward")
    ref, _ = ref_grpo_loss(x, w, ids, mask, adv, bias=b)
    _close(first, torch.autograd.grad(3 * ref, x)[0], "scaled grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("lead", [(3, 5), (1, 0)])
@pytest.mark.parametrize("beta,all_logprobs", [(0.04, True), (0.0, False)])
def test_opcheck_grpo_ops(dtype, lead, beta, all_logprobs):
    x, w, b, t = _small(dtype, lead=lead)
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(7)
    tw = torch.rand(t.shape, generator=g, dtype=cdt) * (torch.rand(t.shape, generator=g) < 0.7)  # some masked
    adv = torch.rand(t.shape, generator=g, dtype=cdt) + 0.5
    # old and reference log-probs near the policy's own: ratio about 1 and a small KL, so the loss is about
    # -sum(token_weight * adv) and takes the advantages' sign
    with torch.no_grad():
        logp = memops.linear_logprobs(x, w, t, b, temperature=0.9).to(cdt)
    old, ref = (logp + 0.01 * torch.randn(t.shape, generator=g, dtype=cdt) for _ in range(2))
    mask = [True, True, True]
    options = ("grpo", "token", beta, 0.2, 0.28, None, False, 1.0, 1.05, 0.9, 1.0, None, False, 4)
    args = (
        x.requires_grad_(),
        w.requires_grad_(),
        t,
        b.requires_grad_(),
        tw,
        adv,
        old,
        ref,
        None,
        torch.randint(-1, 11, (*t.shape, 3), generator=g) if beta else None,  # a sampling mask
        torch.rand(t.shape, generator=g, dtype=cdt) + 0.5 if all_logprobs else None,  # a temperature per token
        *options,
        all_logprobs,
        "accurate",
        "full",
        mask,
    )
    signs = set()
    for sign in (1.0, -1.0):  # negative and positive losses: a direct call donates nothing, so both pass
        flipped = args[:5] + (sign * adv,) + args[6:]
        signs.add(bool(torch.ops.memops.linear_grpo(*flipped)[0] > 0))
        torch.library.opcheck(torch.ops.memops.linear_grpo.default, flipped)
    assert signs == {True, False} or t.numel() == 0
    bargs = backward_op_args("linear_grpo", args, [torch.tensor(1.5, dtype=cdt)])
    torch.library.opcheck(torch.ops.memops.linear_grpo_backward.default, bargs)


def test_token_weights_take_the_trainers_factors():
    """``token_weights`` is the one source of GRPO's normalizations: one call's (the defaults) and TRL's trainer's
    with its accumulation, process-count and steps_per_generation factors (numbers worked by hand)."""
    from memops.ops.grpo import token_weights

    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    f64 = torch.float64
    kw = dict(accumulation=2.0, processes=2, steps_per_generation=4)
    # grpo / sapo: a sequence's tokens share 1 / (B * its length), divided by the accumulation steps
    assert token_weights(mask, "grpo", f64)[0, 0].item() == 1 / 4
    assert token_weights(mask, "sapo", f64, **kw)[1, 0].item() == 1 / 8 / 2
    assert token_weights(mask, "bnpo", f64, **kw)[1, 0].item() == 1 / 6 / 2
    assert token_weights(mask, "dr_grpo", f64, max_completion_length=8, **kw)[0, 0].item() == 1 / 16 / 2
    assert token_weights(mask, "luspo", f64, **kw)[0, 1].item() == 1 / 2 / 2
    # dapo / cispo: num_items_in_batch (the generation batch's tokens, all processes) / processes * accum / steps
    assert token_weights(mask, "dapo", f64, num_items=48, **kw)[0, 0].item() == 1 / (48 / 2 * 2 / 4)
    assert token_weights(mask, "cispo", f64, num_items=torch.tensor(48), **kw)[1, 3].item() == 1 / 12
    assert token_weights(mask, "dapo", f64)[0, 0].item() == 1 / 6  # one call without num_items: its own tokens
    for lt in ("grpo", "bnpo", "dapo"):
        assert token_weights(mask, lt, f64, num_items=48, **kw)[0, 2].item() == 0.0  # masked tokens weigh 0
