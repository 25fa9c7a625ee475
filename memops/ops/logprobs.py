"""Per-token log-probabilities for RL: ``memops::linear_logprobs`` and the fused GRPO loss ``memops::linear_grpo``.

Both run the chunk engine with ``logit_scale = 1 / temperature`` and one head: per chunk it gathers the
target logit, builds the softmax in place and returns ``log p(target)`` (and the entropy when asked).
Given per-row coefficients ``c1`` on the log-probability and ``c2`` on the entropy, the same head returns
``d/dz = c1 * (onehot - p) - c2 * p * (log p + H)``.

* ``linear_logprobs`` does forward work only; its backward op recomputes the chunks with the per-token
  ``grad_output`` of either output (four projection-sized matmuls: the per-token bound), leaving out
  tokens whose ``grad_output`` is 0 where that is exact (``engine.live_rows``).
* ``linear_grpo`` knows each token's coefficient as soon as the chunk's log-probabilities are known
  (autograd of the per-token GRPO loss with respect to the log-probability, a ``[rows]`` computation), so
  its forward also returns the loss's gradients: three matmuls in all, as in the unfused baseline, one
  for masked tokens, none for masked tokens with ``beta == 0`` where exact (see ``_grpo_chunks``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from .. import validation as V
from . import _autograd, engine

# coef(sel, logp, entropy) -> (c1 [n] or None, c2 [n] or None); None means no gradient.
Coef = Callable[["slice | Tensor", Tensor, Tensor | None], tuple | None]


def _chunks(
    x2d,
    weight,
    t1d,
    bias,
    *,
    temperature,
    entropy: bool,
    coef: Coef | None,
    need,
    chunk_size,
    rows: Tensor | None = None,
    out: tuple | None = None,
):
    """Run the head over ``x2d`` (only ``rows`` when given; see ``engine.run``), writing the per-row
    log-probs (and entropy) into ``out`` when given, else into new ``[N]`` tensors."""
    n = x2d.shape[0]
    cdt = engine.compute_dtype(x2d.dtype)
    if out is None:
        out = (
            engine.rows_out(n, cdt, x2d.device, rows),
            engine.rows_out(n, cdt, x2d.device, rows) if entropy else None,
        )
    logp_rows, ent_rows = out

    def head(z: Tensor, sel):
        t = t1d[sel].long().unsqueeze(1)
        zmax = z.amax(dim=1, keepdim=True)
        z.sub_(zmax)  # z <- s = z - rowmax
        s_t = z.gather(1, t).squeeze(1)
        if entropy:
            e = torch.exp(z)
            total = e.sum(dim=1)
            log_total = total.log()
            ent = log_total - (e * z).sum(dim=1) / total  # H = log sum e^s - sum p s
            ent_rows[sel] = ent
        else:
            z.exp_()
            e, total, ent = z, z.sum(dim=1), None
            log_total = total.log()
        logp = s_t - log_total
        logp_rows[sel] = logp
        c = coef(sel, logp, ent) if coef is not None else None
        if c is None:
            return None
        c1, c2 = c
        if c2 is not None:  # z holds s: -p * (c1 + c2 * (s - log_total + H))
            z.add_((ent - log_total).unsqueeze(1)).mul_(c2.unsqueeze(1))
            if c1 is not None:
                z.add_(c1.unsqueeze(1))
            z.mul_(e).mul_((-1.0 / total).unsqueeze(1))
        else:  # -p * c1
            if entropy:  # z still holds s
                z.copy_(e)
            z.mul_((-c1 / total).unsqueeze(1))
        if c1 is not None:
            z.scatter_add_(1, t, c1.unsqueeze(1))
        return z

    gx, gw, gb = engine.run(
        x2d,
        weight,
        bias,
        head,
        logit_scale=1.0 / temperature,
        chunk_size=chunk_size,
        grad_input=need[0],
        grad_weight=need[1],
        grad_bias=need[2] and bias is not None,
        rows=rows,
    )
    return logp_rows, ent_rows, gx, gw, gb


# ---- memops::linear_logprobs ---------------------------------------------------------------------------


@torch.library.custom_op("memops::linear_logprobs", mutates_args=())
def linear_logprobs_op(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None,
    temperature: float,
    return_entropy: bool,
    chunk_size: int,
) -> tuple[Tensor, Tensor]:
    V.check_linear_logprobs(input, weight, target, bias, temperature, chunk_size)
    V.check_target_range(target, weight.shape[0], None)
    x2d, t1d, _ = engine.flatten(input, target)
    logp, ent, _, _, _ = _chunks(
        x2d,
        weight,
        t1d,
        bias,
        temperature=temperature,
        entropy=return_entropy,
        coef=None,
        need=(False, False, False),
        chunk_size=chunk_size,
    )
    return logp.view(target.shape), (ent.view(target.shape) if return_entropy else engine.placeholder(logp))


@torch.library.custom_op("memops::linear_logprobs_backward", mutates_args=())
def linear_logprobs_backward(
    grad_logprobs: Tensor | None,
    grad_entropy: Tensor | None,
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None,
    temperature: float,
    chunk_size: int,
    need: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    V.check_linear_logprobs(input, weight, target, bias, temperature, chunk_size)
    x2d, t1d, _ = engine.flatten(input, target)
    cdt = engine.compute_dtype(input.dtype)
    g1 = None if grad_logprobs is None else grad_logprobs.reshape(-1).to(cdt)
    g2 = None if grad_entropy is None else grad_entropy.reshape(-1).to(cdt)

    def coef(sel, logp, ent):
        return (None if g1 is None else g1[sel]), (None if g2 is None else g2[sel])

    # tokens with no incoming gradient (masked by the caller's loss) are skipped where that is exact
    keep = functools.reduce(torch.logical_or, [g != 0 for g in (g1, g2) if g is not None])
    rows = engine.live_rows(x2d, weight, bias, keep, 1.0 / temperature)
    _, _, gx, gw, gb = _chunks(
        x2d,
        weight,
        t1d,
        bias,
        temperature=temperature,
        entropy=g2 is not None,
        coef=coef,
        need=need,
        chunk_size=chunk_size,
        rows=rows,
    )
    return engine.grads_out(gx, gw, gb, input, weight, bias)


def _logprobs_setup(ctx, inputs, output):
    input, weight, target, bias, temperature, return_entropy, chunk_size = inputs
    ctx.save_for_backward(input, weight, target, bias)
    ctx.options = (temperature, chunk_size)
    ctx.entropy = return_entropy  # else the entropy output is an empty placeholder
    ctx.set_materialize_grads(False)


def _logprobs_backward(ctx, grad_logprobs, grad_entropy):
    input, weight, target, bias = ctx.saved_tensors
    need = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[3]]
    if not ctx.entropy:
        grad_entropy = None
    if (grad_logprobs is None and grad_entropy is None) or not any(need):
        return (None,) * 7
    grads = torch.ops.memops.linear_logprobs_backward(
        grad_logprobs, grad_entropy, input, weight, target, bias, *ctx.options, need
    )
    dx, dw, db = (g if n else None for g, n in zip(grads, need))
    return (dx, dw, None, db, None, None, None)


torch.library.register_autograd("memops::linear_logprobs", _logprobs_backward, setup_context=_logprobs_setup)


def linear_logprobs(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """``log_softmax((input @ weight.T + bias) / temperature)`` at ``target``, shaped like ``target``.

    With ``return_entropy=True`` returns ``(logprobs, entropy)`` (the entropy of the same tempered
    distribution per token).  Both are differentiable with respect to input, weight and bias for any
    per-token ``grad_output``; under ``torch.no_grad()`` only the forward work is done.  Results are
    fp32 (fp64 for fp64 inputs).
    """
    chunk_size = V.as_chunk_size(chunk_size)
    V.check_linear_logprobs(input, weight, target, bias, temperature, chunk_size)
    logp, ent = torch.ops.memops.linear_logprobs(
        input, weight, target, bias, float(temperature), bool(return_entropy), chunk_size
    )
    return (logp, ent) if return_entropy else logp


# ---- memops::linear_grpo -------------------------------------------------------------------------------


def grpo_token_loss(
    logp: Tensor,
    advantages: Tensor,
    old_logprobs: Tensor | None,
    ref_logprobs: Tensor | None,
    beta: float,
    epsilon_low: float,
    epsilon_high: float,
) -> Tensor:
    """TRL's per-token GRPO loss: clipped importance-ratio surrogate plus ``beta`` times the k3 KL."""
    old = logp.detach() if old_logprobs is None else old_logprobs
    ratio = torch.exp(logp - old)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    loss = -torch.minimum(ratio * advantages, clipped * advantages)
    if beta != 0:
        delta = ref_logprobs - logp
        loss = loss + beta * (torch.exp(delta) - delta - 1)
    return loss


def _rows(t: Tensor | None, cdt) -> Tensor | None:
    return None if t is None else t.reshape(-1).to(cdt)


def _grpo_chunks(
    x2d,
    weight,
    t1d,
    bias,
    w,
    adv,
    old,
    ref,
    upstream,
    need,
    *,
    beta,
    epsilon_low,
    epsilon_high,
    temperature,
    chunk_size,
    all_logprobs=True,
):
    """Per-token log-probs; when ``upstream`` is given, also the gradients of ``upstream * sum(w *
    token_loss)``, each chunk's coefficient by autograd of ``grpo_token_loss``.

    A token of weight 0 (masked) has the gradient coefficient ``0 * d token_loss / d logp``, exactly 0
    unless that derivative is not finite; with a zero coefficient its logits' gradient
    ``0 * (onehot - p)`` is 0 unless its logits hold NaN or +inf (then its log-prob is NaN).  So masked
    tokens get forward work only (their log-probs feed the loss and the metrics); the few whose
    coefficient turns out not to be 0 or whose log-prob is NaN, where the reference's gradients turn NaN,
    are then computed in full.

    With ``beta == 0`` and ``all_logprobs=False`` masked tokens are not computed at all where their
    log-prob provably cannot reach the loss or its gradients (:func:`_unreachable`); their log-prob is
    left 0.
    """

    def c1_of(sel, logp):
        with _autograd.autograd_inside_kernel():
            leaf = logp.detach().requires_grad_(True)
            tok = grpo_token_loss(
                leaf,
                adv[sel],
                None if old is None else old[sel],
                None if ref is None else ref[sel],
                beta,
                epsilon_low,
                epsilon_high,
            )
            (c1,) = torch.autograd.grad((tok * w[sel]).sum(), leaf)
        return (c1 * upstream).detach()

    def coef(sel, logp, ent):
        return c1_of(sel, logp), None

    run = functools.partial(
        _chunks, x2d, weight, t1d, bias, temperature=temperature, entropy=False, chunk_size=chunk_size
    )
    masked = w == 0
    skip = torch.zeros_like(masked)
    # a skipped row could hide the reference's NaN unless its logits are finite
    if (
        beta == 0
        and not all_logprobs
        and bool(masked.any())
        and engine.logits_bounded(x2d, weight, bias, 1.0 / temperature)
    ):
        skip[masked] = _unreachable(adv[masked], None if old is None else old[masked], epsilon_low, epsilon_high)
    if upstream is None:
        return run(coef=None, need=need, rows=(~skip).nonzero().squeeze(1) if bool(skip.any()) else None)
    if not bool(masked.any()):
        return run(coef=coef, need=need)
    bad = torch.zeros_like(masked)

    def probe(sel, logp, ent):  # forward only: which masked tokens have a gradient after all
        bad[sel] = (c1_of(sel, logp) != 0) | logp.isnan()
        return None

    logp, _, gx, gw, gb = run(coef=coef, need=need, rows=(~masked).nonzero().squeeze(1))
    run(coef=probe, need=(False, False, False), rows=(masked & ~skip).nonzero().squeeze(1), out=(logp, None))
    if bool(bad.any()):
        _, _, *extra = run(coef=coef, need=need, rows=bad.nonzero().squeeze(1), out=(logp, None))
        gx, gw, gb = (g if e is None else g + e for g, e in zip((gx, gw, gb), extra))
    return logp, None, gx, gw, gb


def _unreachable(adv: Tensor, old: Tensor | None, epsilon_low: float, epsilon_high: float) -> Tensor:
    """For masked tokens with ``beta == 0`` and finite logits: whether ``grpo_token_loss`` and its
    derivative are finite for every log-prob ``<= 0`` (then ``0 * loss`` and ``0 * derivative`` are 0,
    whatever the log-prob).  Both are at most ``|adv|`` times the ratio ``exp(logp - old) <= exp(-old)``
    or a clip bound."""
    a = adv.double()
    ratio = torch.ones_like(a) if old is None else torch.exp(-old.double())  # NaN old: NaN, never < below
    clip = max(1.0, abs(1.0 - epsilon_low), abs(1.0 + epsilon_high))
    return torch.maximum(ratio, torch.full_like(a, clip)) * (1.0 + a.abs()) < torch.finfo(adv.dtype).max / 16


def _grpo_rows(input, target, token_weight, advantages, old_logprobs, ref_logprobs):
    cdt = engine.compute_dtype(input.dtype)
    x2d, t1d, _ = engine.flatten(input, target)
    return (
        x2d,
        t1d,
        cdt,
        _rows(token_weight, cdt),
        _rows(advantages, cdt),
        _rows(old_logprobs, cdt),
        _rows(ref_logprobs, cdt),
    )


@torch.library.custom_op("memops::linear_grpo", mutates_args=())
def linear_grpo(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None,
    token_weight: Tensor,
    advantages: Tensor,
    old_logprobs: Tensor | None,
    ref_logprobs: Tensor | None,
    beta: float,
    epsilon_low: float,
    epsilon_high: float,
    temperature: float,
    chunk_size: int,
    all_logprobs: bool,
    grad_mask: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(sum(token_weight * grpo_token_loss), logprobs, grad_input, grad_weight, grad_bias)``; with
    ``beta == 0`` the log-prob of a token of weight 0 may be 0 unless ``all_logprobs``."""
    args = (beta, epsilon_low, epsilon_high, temperature, chunk_size)
    V.check_linear_grpo(input, weight, target, bias, token_weight, advantages, old_logprobs, ref_logprobs, *args)
    V.check_target_range(target, weight.shape[0], None, "completion_ids")
    x2d, t1d, cdt, w, adv, old, ref = _grpo_rows(input, target, token_weight, advantages, old_logprobs, ref_logprobs)
    need = tuple(grad_mask)
    up = torch.ones((), dtype=cdt, device=input.device) if any(need) else None
    logp, _, gx, gw, gb = _grpo_chunks(
        x2d,
        weight,
        t1d,
        bias,
        w,
        adv,
        old,
        ref,
        up,
        need,
        beta=beta,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        temperature=temperature,
        chunk_size=chunk_size,
        all_logprobs=all_logprobs,
    )
    loss = (grpo_token_loss(logp, adv, old, ref, beta, epsilon_low, epsilon_high) * w).sum()
    return (loss, logp.view(target.shape)) + engine.grads_out(gx, gw, gb, input, weight, bias)


@torch.library.custom_op("memops::linear_grpo_backward", mutates_args=())
def linear_grpo_backward(
    grad_loss: Tensor,
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None,
    token_weight: Tensor,
    advantages: Tensor,
    old_logprobs: Tensor | None,
    ref_logprobs: Tensor | None,
    saved_grad_input: Tensor,
    saved_grad_weight: Tensor,
    saved_grad_bias: Tensor,
    beta: float,
    epsilon_low: float,
    epsilon_high: float,
    temperature: float,
    chunk_size: int,
    need: list[bool],
    have: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``linear_grpo``'s loss: scale what the forward computed, recompute the rest."""
    V.check_linear_grpo(
        input,
        weight,
        target,
        bias,
        token_weight,
        advantages,
        old_logprobs,
        ref_logprobs,
        beta,
        epsilon_low,
        epsilon_high,
        temperature,
        chunk_size,
    )
    cdt = engine.compute_dtype(input.dtype)
    out, missing = engine.scale_saved(
        grad_loss, (saved_grad_input, saved_grad_weight, saved_grad_bias), need, have, cdt
    )
    if any(missing):
        x2d, t1d, cdt, w, adv, old, ref = _grpo_rows(
            input, target, token_weight, advantages, old_logprobs, ref_logprobs
        )
        _, _, gx, gw, gb = _grpo_chunks(
            x2d,
            weight,
            t1d,
            bias,
            w,
            adv,
            old,
            ref,
            grad_loss.to(cdt),
            missing,
            beta=beta,
            epsilon_low=epsilon_low,
            epsilon_high=epsilon_high,
            temperature=temperature,
            chunk_size=chunk_size,
            all_logprobs=False,
        )
        fresh = engine.grads_out(gx, gw, gb, input, weight, bias)
        out = [f if m else o for o, f, m in zip(out, fresh, missing)]
    return tuple(engine.placeholder(input) if o is None else o for o in out)


def _grpo_setup(ctx, inputs, output):
    (
        input,
        weight,
        target,
        bias,
        token_weight,
        advantages,
        old_logprobs,
        ref_logprobs,
        beta,
        epsilon_low,
        epsilon_high,
        temperature,
        chunk_size,
        _all_logprobs,
        grad_mask,
    ) = inputs
    _, logp, gx, gw, gb = output
    ctx.save_for_backward(input, weight, target, bias, token_weight, advantages, old_logprobs, ref_logprobs)
    ctx.options = (beta, epsilon_low, epsilon_high, temperature, chunk_size)
    _autograd.setup(ctx, (gx, gw, gb), [bool(m) for m in grad_mask], (logp,))


def _grpo_backward(ctx, grad_loss, _grad_logp, _ggx, _ggw, _ggb):
    input, weight, target, bias, token_weight, advantages, old, ref = ctx.saved_tensors
    need = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[3]]
    if grad_loss is None or not any(need):
        return (None,) * 15
    dx, dw, db = _autograd.backward_grads(
        ctx,
        grad_loss,
        need,
        torch.ops.memops.linear_grpo_backward,
        (input, weight, target, bias, token_weight, advantages, old, ref),
    )
    return (dx, dw, None, db) + (None,) * 11


torch.library.register_autograd("memops::linear_grpo", _grpo_backward, setup_context=_grpo_setup)


def _token_weight(mask: Tensor, loss_type: str, max_completion_length: int | None, num_items, cdt) -> Tensor:
    """Each token's share of the loss: the loss is ``sum(token_weight * per_token_loss)``."""
    m = mask.to(cdt)
    if loss_type == "grpo":  # mean over each sequence's tokens, then over sequences
        return m / m.sum(-1, keepdim=True).clamp(min=1.0) / mask.shape[0]
    if loss_type == "dr_grpo":  # a constant normalizer: B * max_completion_length
        return m / (mask.shape[0] * (max_completion_length or mask.shape[1]))
    if loss_type == "dapo" and num_items is not None:  # the whole batch's active tokens (TRL: num_items_in_batch)
        return m / torch.as_tensor(num_items, dtype=m.dtype, device=m.device)
    return m / m.sum().clamp(min=1.0)  # bnpo, and dapo within one call


def linear_grpo_loss(
    input: Tensor,
    weight: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    advantages: Tensor,
    *,
    bias: Tensor | None = None,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    temperature: float = 1.0,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    num_items: int | float | Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """TRL's GRPO loss on ``input [B, T, D]`` completion hidden states, without materializing logits.

    Returns ``(loss, metrics)``; ``metrics`` holds detached tensors: ``clip_ratio/low_mean``,
    ``clip_ratio/high_mean``, ``clip_ratio/region_mean`` (masked token fractions whose ratio was clipped
    against the advantage's sign) and, when ``ref_logprobs`` is given, ``kl`` (masked mean k3 estimator).
    """
    V.check_grpo_front(input, completion_ids, completion_mask, advantages, loss_type, max_completion_length)
    chunk_size = V.as_chunk_size(chunk_size)
    cdt = engine.compute_dtype(input.dtype)
    w = _token_weight(completion_mask, loss_type, max_completion_length, num_items, cdt)
    adv = advantages.to(cdt).unsqueeze(1).expand(completion_ids.shape).contiguous()
    old = None if old_logprobs is None else old_logprobs.detach().to(cdt)
    ref = None if ref_logprobs is None else ref_logprobs.detach().to(cdt)
    mask = _autograd.grad_mask(input, weight, bias)
    m = completion_mask.to(cdt)
    # the metrics read the log-probs of every token with mask 1, and the kl metric those of every token
    all_logprobs = ref is not None or bool(((w == 0) & (m != 0)).any())
    loss, logp, _, _, _ = torch.ops.memops.linear_grpo(
        input,
        weight,
        completion_ids,
        bias,
        w,
        adv,
        old,
        ref,
        float(beta),
        float(epsilon_low),
        float(epsilon_high),
        float(temperature),
        chunk_size,
        all_logprobs,
        mask,
    )
    _autograd.donate(loss)
    denom = m.sum().clamp(min=1.0)
    ratio = torch.ones_like(logp) if old is None else torch.exp(logp - old)
    low = ((ratio < 1 - epsilon_low) & (adv < 0)).to(cdt)
    high = ((ratio > 1 + epsilon_high) & (adv > 0)).to(cdt)
    metrics = {
        "clip_ratio/low_mean": (low * m).sum() / denom,
        "clip_ratio/high_mean": (high * m).sum() / denom,
        "clip_ratio/region_mean": (torch.maximum(low, high) * m).sum() / denom,
    }
    if ref is not None:
        delta = ref - logp
        metrics["kl"] = ((torch.exp(delta) - delta - 1) * m).sum() / denom
    return loss, metrics
