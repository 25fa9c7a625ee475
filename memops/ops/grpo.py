"""The fused GRPO loss ``memops::linear_grpo`` (TRL 1.16's loss types, GSPO, KL term, entropy bonus, metrics).

It runs the log-prob chunk loop (``ops/logprobs.py``: ``chunks``) with ``logit_scale = 1 / temperature``; each
token's coefficient ``c1`` on its log-probability is known as soon as the chunk's log-probabilities are
(autograd of the per-token GRPO loss with respect to the log-probability, a ``[rows]`` computation), so the
forward also returns the loss's gradients: three matmuls in all, as in the unfused baseline, one for masked
tokens, none for masked tokens with ``beta == 0`` where exact (see ``chunks``).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .. import config, validation
from ..contract import Args
from ..meta import grpo as meta_grpo
from ..meta.grpo import GRPO
from ..meta.vocab_parallel import Layout, resolve
from ..rules import placeholder
from . import engine, family, logprobs, plan
from .reducer import gather_tokens, process_group, reducer_of, token_sizes
from .torch_private import autograd_inside_kernel


def grpo_token_loss(logp: Tensor, adv: Tensor, old: Tensor | None, ref: Tensor | None, a, log_iw=None) -> Tensor:
    """TRL 1.16's ``GRPOTrainer._compute_loss`` per-token loss before masking and normalization, for
    ``a.loss_type`` (grpo/bnpo/dr_grpo/dapo/luspo: the clipped surrogate with ``delta`` two-sided clipping;
    cispo; sapo) plus ``a.beta`` times the k3 KL (times the ratio with ``use_bias_correction_kl``).
    ``log_iw``: the log importance weights when they are not the per-token log-ratio (sequence level)."""
    old = logp.detach() if old is None else old
    coef_1 = torch.exp(logp - old if log_iw is None else log_iw)
    loss = None
    if a.loss_type == "cispo":
        loss = -torch.clamp(coef_1, max=a.epsilon_high).detach() * adv * logp
    elif a.loss_type == "sapo":
        temps = torch.where(adv > 0, a.sapo_temperature_pos, a.sapo_temperature_neg)
        loss = -(torch.sigmoid(temps * (coef_1 - 1)) * 4 / temps) * adv
    if a.beta != 0:
        assert ref is not None, "beta != 0 needs ref_logprobs (checked by the spec)"
        kl = torch.exp(ref - logp) - (ref - logp) - 1
        if a.use_bias_correction_kl:
            kl = kl * coef_1
    if loss is None:
        coef_2 = torch.clamp(coef_1, 1 - a.epsilon_low, 1 + a.epsilon_high)
        if a.delta is not None:
            coef_1 = torch.clamp(coef_1, max=a.delta)
        loss = -torch.minimum(coef_1 * adv, coef_2 * adv)
    return loss + a.beta * kl if a.beta != 0 else loss


def sequence_log_weights(logp: Tensor, old: Tensor | None, mask: Tensor) -> Tensor:
    """GSPO's per-sequence log importance weight, expanded over ``[B, T]``: the masked mean log-ratio."""
    old = logp.detach() if old is None else old
    seq = ((logp - old) * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    return seq.unsqueeze(-1).expand_as(logp)


def chunks(x2d, t1d, w, adv, old, ref, ent_w, upstream, need, a: Args):
    """Per-token log-probs (and entropies); when ``upstream`` is given, also the gradients of ``upstream *
    (sum(w * token_loss) + sum(ent_w * entropy))``, each chunk's log-prob coefficient by autograd of
    ``grpo_token_loss`` (token level).

    A token of weight 0 (masked) has the gradient coefficient ``0 * d token_loss / d logp``, exactly 0
    unless that derivative is not finite; with a zero coefficient its logits' gradient
    ``0 * (onehot - p)`` is 0 unless its logits hold NaN or +inf (then its log-prob is NaN).  So masked
    tokens are probed (``ops/plan.py``): forward work only (their log-probs feed the loss and the
    metrics); the few whose coefficient turns out not to be 0 or whose log-prob is NaN, where the
    reference's gradients turn NaN, are then computed in full.

    With ``beta == 0``, the clipped-surrogate loss types and ``all_logprobs=False`` masked tokens are not
    computed at all where their log-prob provably cannot reach the loss or its gradients
    (:func:`_unreachable`); their log-prob is left 0.
    """
    weight, bias = a.weight, a.bias
    entropy = ent_w is not None or a.return_entropy
    reducer = reducer_of(a)
    temps = logprobs.token_temperatures(a, engine.compute_dtype(x2d.dtype))

    def c1_of(sel, logp):
        with autograd_inside_kernel():
            leaf = logp.detach().requires_grad_(True)
            tok = grpo_token_loss(
                leaf, adv[sel], None if old is None else old[sel], None if ref is None else ref[sel], a
            )
            (c1,) = torch.autograd.grad((tok * w[sel]).sum(), leaf)
        return (c1 * upstream).detach()

    def coef(sel, logp, ent):
        return c1_of(sel, logp), None if ent_w is None else ent_w[sel] * upstream

    run = functools.partial(
        logprobs.chunks,
        x2d,
        weight,
        t1d,
        bias,
        temperature=a.temperature,
        entropy=entropy,
        chunk_size=a.chunk_size,
        logit_scale=a.logit_scale,
        softcap=a.softcap,
        reducer=reducer,
        accurate=a.precision == "accurate",
        kept=logprobs.kept_set(a, t1d, reducer.vocab_of(weight)),
        entropy_over=a.entropy_over,
        token_temperature=temps,
    )
    masked = (w == 0) if ent_w is None else (w == 0) & (ent_w == 0)
    needed = ok = None
    scale = logprobs.plan_scale(a, temps)
    if a.beta == 0 and not a.all_logprobs and a.loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        needed = ~(masked & _unreachable(adv, old, a.epsilon_low, a.epsilon_high))
        ok = plan.bounded(x2d, weight, bias, scale, reducer=reducer)
    probe = masked if upstream is not None else None
    rows = plan.plan(x2d, weight, bias, scale, needed=needed, probe=probe, ok=ok, reducer=reducer)

    def outputs(logp, ent, *grads):
        """A token the plan may skip has log-prob (and entropy) 0, computed or not: one result either way."""
        if needed is None:
            return logp, ent, *grads
        keep = needed | ~ok
        return torch.where(keep, logp, 0.0), None if ent is None else torch.where(keep, ent, 0.0), *grads

    if upstream is None:
        return outputs(*run(coef=None, need=need, rows=rows.full))
    logp, ent, gx, gw, gb = run(coef=coef, need=need, rows=rows.full)
    if rows.probe is None:
        return outputs(logp, ent, gx, gw, gb)
    bad = torch.zeros_like(masked)

    def mark(sel, logp, ent):  # forward only: which masked tokens have a gradient after all
        bad[sel] = (c1_of(sel, logp) != 0) | logp.isnan()
        return None

    run(coef=mark, need=(False, False, False), rows=rows.probe, out=(logp, ent))
    again = bad.nonzero().squeeze(1)  # the one sync after a probe
    if again.numel():
        _, _, *extra = run(coef=coef, need=need, rows=again, out=(logp, ent))
        gx, gw, gb = (g if e is None else g + e for g, e in zip((gx, gw, gb), extra))
    return outputs(logp, ent, gx, gw, gb)


def sequence_chunks(x2d, t1d, w, adv, old, ref, ent_w, upstream, need, a: Args, shape):
    """Sequence-level importance sampling (GSPO): a token's coefficient needs its whole sequence's
    log-probs, so a first pass computes every log-prob (forward work), autograd of the sequence-level loss
    over the ``[B, T]`` log-probs gives every coefficient, and a second pass computes the gradients: one
    projection-sized matmul more than the token level's three."""
    entropy = ent_w is not None or a.return_entropy
    reducer = reducer_of(a)
    common = dict(
        temperature=a.temperature,
        chunk_size=a.chunk_size,
        logit_scale=a.logit_scale,
        softcap=a.softcap,
        reducer=reducer,
        accurate=a.precision == "accurate",
        kept=logprobs.kept_set(a, t1d, reducer.vocab_of(a.weight)),
        entropy_over=a.entropy_over,
        token_temperature=logprobs.token_temperatures(a, engine.compute_dtype(x2d.dtype)),
    )
    logp, ent, *_ = logprobs.chunks(x2d, a.weight, t1d, a.bias, entropy=entropy, coef=None, need=(False,) * 3, **common)
    if upstream is None:
        return logp, ent, None, None, None
    with autograd_inside_kernel():
        leaf = logp.detach().view(shape).requires_grad_(True)
        mask = (w != 0).to(leaf.dtype).view(shape)
        o = None if old is None else old.view(shape)
        log_iw = sequence_log_weights(leaf, o, mask)
        tok = grpo_token_loss(leaf, adv.view(shape), o, None if ref is None else ref.view(shape), a, log_iw)
        (c1,) = torch.autograd.grad((tok * w.view(shape)).sum(), leaf)
    c1 = (c1.reshape(-1) * upstream).detach()
    fixed = (c1, None if ent_w is None else ent_w * upstream)
    scratch = (torch.empty_like(logp), torch.empty_like(ent) if ent_w is not None else None)
    *_, gx, gw, gb = logprobs.chunks(
        x2d, a.weight, t1d, a.bias, entropy=ent_w is not None, fixed=fixed, need=need, out=scratch, **common
    )
    return logp, ent, gx, gw, gb


def _unreachable(adv: Tensor, old: Tensor | None, epsilon_low: float, epsilon_high: float) -> Tensor:
    """Per token, for ``beta == 0`` and finite logits: whether ``grpo_token_loss`` and its derivative are
    finite for every log-prob ``<= 0`` (then ``0 * loss`` and ``0 * derivative`` are 0, whatever the
    log-prob).  Both are at most ``|adv|`` times the ratio ``exp(logp - old) <= exp(-old)`` or a clip
    bound."""
    a = adv.double()
    ratio = torch.ones_like(a) if old is None else torch.exp(-old.double())  # NaN old: NaN, never < below
    clip = max(1.0, abs(1.0 - epsilon_low), abs(1.0 + epsilon_high))
    return torch.maximum(ratio, torch.full_like(a, clip)) * (1.0 + a.abs()) < torch.finfo(adv.dtype).max / 16


def _grpo_rows(a: Args):
    """Rows: ``x2d, t1d`` and the per-token tensors flattened in the compute dtype."""
    cdt = engine.compute_dtype(a.input.dtype)
    x2d, t1d, _ = engine.flatten(a.input, a.target)

    def rows(t):
        return None if t is None else t.reshape(-1).to(cdt)

    per_token = (a.token_weight, a.advantages, a.old_logprobs, a.ref_logprobs, a.entropy_weight)
    return (x2d, t1d, *(rows(t) for t in per_token))


def _grpo_pass(a: Args, upstream, need):
    x2d, t1d, w, adv, old, ref, ent_w = _grpo_rows(a)
    if a.importance_sampling_level == "sequence":
        out = sequence_chunks(x2d, t1d, w, adv, old, ref, ent_w, upstream, need, a, a.target.shape)
    else:
        out = chunks(x2d, t1d, w, adv, old, ref, ent_w, upstream, need, a)
    return (w, adv, old, ref, ent_w), out


def forward(a: Args, need: list) -> tuple:
    validation.check_target_range(a.target, reducer_of(a).vocab_of(a.weight), None, "completion_ids")
    up = torch.ones((), dtype=engine.compute_dtype(a.input.dtype), device=a.input.device) if any(need) else None
    (w, adv, old, ref, ent_w), (logp, ent, gx, gw, gb) = _grpo_pass(a, up, need)
    shape = a.target.shape
    log_iw = None
    if a.importance_sampling_level == "sequence":
        o = None if old is None else old.view(shape)
        log_iw = sequence_log_weights(logp.view(shape), o, (w != 0).to(logp.dtype).view(shape)).reshape(-1)
    loss = (grpo_token_loss(logp, adv, old, ref, a, log_iw) * w).sum()
    if ent_w is not None:
        loss = loss + (ent * ent_w).sum()
    ent_out = ent.view(shape) if a.return_entropy else placeholder(logp)
    return (loss, logp.view(shape), ent_out), engine.grads_out(gx, gw, gb, a.input, a.weight, a.bias)


def gradients(a: Args, grad_outputs: list, need: list) -> list:
    up = grad_outputs[0].to(engine.compute_dtype(a.input.dtype))
    *_, (_, _, gx, gw, gb) = _grpo_pass(a.replace(all_logprobs=False), up, need)
    return engine.grads_out(gx, gw, gb, a.input, a.weight, a.bias)


family.implement(GRPO, forward, gradients)


def token_weights(
    mask: Tensor,
    loss_type: str,
    dtype: torch.dtype,
    *,
    max_completion_length: int | None = None,
    num_items=None,
    accumulation: float = 1.0,
    processes: int = 1,
    steps_per_generation: int = 1,
) -> Tensor:
    """Each token's share of the loss, TRL 1.16's normalizations: the loss is ``sum(token_weights *
    per_token_loss)``.  The one source of them, for ``linear_grpo_loss`` (one call: the factors at their
    defaults) and for memops' TRL ``GRPOTrainer``, which passes its own: ``accumulation`` (the gradient
    accumulation steps of this optimizer step; TRL divides every loss type by it but dapo / cispo, whose
    ``num_items`` already counts the whole generation batch), ``processes`` and ``steps_per_generation``
    (dapo / cispo: TRL's normalizer is ``num_items_in_batch / processes * accumulation /
    steps_per_generation``)."""
    m = mask.to(dtype)
    if loss_type in ("grpo", "sapo"):  # mean over each sequence's tokens, then over sequences
        return m / m.sum(-1, keepdim=True).clamp(min=1.0) / mask.shape[0] / accumulation
    if loss_type == "dr_grpo":  # a constant normalizer: B * max_completion_length
        return m / (mask.shape[0] * (max_completion_length or mask.shape[1])) / accumulation
    if loss_type == "luspo":  # sum over each sequence's tokens, mean over sequences
        return m / mask.shape[0] / accumulation
    if loss_type in ("dapo", "cispo") and num_items is not None:  # the batch's active tokens (num_items_in_batch)
        normalizer = engine.scalar_on(num_items, m.dtype, m.device).clamp(min=1.0) / processes
        if accumulation != 1.0 or steps_per_generation != 1:
            normalizer = normalizer * accumulation / steps_per_generation
        return m / normalizer
    if loss_type in ("dapo", "cispo"):  # within one call: this call's active tokens
        return m / m.sum().clamp(min=1.0)
    return m / m.sum().clamp(min=1.0) / accumulation  # bnpo


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
    temperature: float | Tensor = 1.0,
    loss_type: str = "grpo",
    importance_sampling_level: str = "token",
    delta: float | None = None,
    use_bias_correction_kl: bool = False,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    entropy_coef: float = 0.0,
    sampling_mask: Tensor | None = None,
    entropy_over: str = "full",
    logit_scale: float = 1.0,
    softcap: float | None = None,
    max_completion_length: int | None = None,
    num_items: int | float | Tensor | None = None,
    chunk_size: int | None = None,
    precision: str | None = None,
    _parallel: Layout | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """TRL 1.16's GRPO loss on ``input [B, T, D]`` completion hidden states, without materializing logits.

    ``loss_type``: grpo, bnpo, dr_grpo, dapo, luspo (clipped surrogate, ``delta`` two-sided clipping), cispo,
    sapo (``sapo_temperature_pos/neg``); ``importance_sampling_level="sequence"`` is GSPO (one projection
    matmul more: a token's coefficient needs its sequence's log-probs); ``beta`` weighs the k3 KL against
    ``ref_logprobs`` (times the importance ratio with ``use_bias_correction_kl``, TRL's default there);
    ``entropy_coef`` subtracts that times the masked mean entropy (TRL's entropy bonus).  The logits are
    ``softcap(logit_scale * (input @ weight.T + bias)) / temperature``.

    Returns ``(loss, metrics)``; ``metrics`` holds detached tensors: ``clip_ratio/low_mean``,
    ``clip_ratio/high_mean``, ``clip_ratio/region_mean`` (masked token fractions whose ratio was clipped
    against the advantage's sign; ``cispo_clip_ratio`` for cispo), ``entropy`` (masked mean) with an entropy
    bonus, and, when ``ref_logprobs`` is given, ``kl`` (masked mean of the KL term).

    ``sampling_mask`` (``[B, T, K]`` token ids, -1 padding) and ``entropy_over``: as ``linear_logprobs``: the
    policy's log-probabilities (hence every ratio, the KL and the loss) renormalized over the tokens the
    sampler kept, the entropy bonus over the whole vocabulary or the kept set.
    """
    meta_grpo.check_front(input, completion_ids, completion_mask, advantages, loss_type, max_completion_length)
    validation.check_finite("entropy_coef", entropy_coef)
    cdt = engine.compute_dtype(input.dtype)
    spec, parallel = resolve(GRPO, _parallel)
    temperature, token_temperature = logprobs.split_temperature(temperature, completion_ids, "completion_ids")
    # sequence parallelism: the token weights, the metrics and which log-probs they read are the group's
    whole, mine = _group_rows(_parallel, completion_ids.shape[0], input.device)
    mask_all = whole(completion_mask)
    w_all = token_weights(mask_all, loss_type, cdt, max_completion_length=max_completion_length, num_items=num_items)
    w = mine(w_all)
    adv = advantages.to(cdt).unsqueeze(1).expand(completion_ids.shape).contiguous()
    old = None if old_logprobs is None else old_logprobs.detach().to(cdt)
    ref = None if ref_logprobs is None else ref_logprobs.detach().to(cdt)
    m_all = mask_all.to(cdt)
    ent_w = None if entropy_coef == 0 else mine(-entropy_coef * m_all / m_all.sum().clamp(min=1.0))
    # the metrics read the log-probs of every token with mask 1, and the kl metric those of every token;
    # sync-free or traced (torch.compile cannot branch on a tensor's value), every row is computed anyway
    all_logprobs = (
        ref is not None
        or config.is_sync_free(input)
        or torch.compiler.is_compiling()
        or bool(((w_all == 0) & (m_all != 0)).any())
    )
    loss, logp, ent, _ = spec.call(
        **parallel,
        input=input,
        weight=weight,
        target=completion_ids,
        bias=bias,
        token_weight=w,
        advantages=adv,
        old_logprobs=old,
        ref_logprobs=ref,
        entropy_weight=ent_w,
        loss_type=loss_type,
        importance_sampling_level=importance_sampling_level,
        beta=beta,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        delta=delta,
        use_bias_correction_kl=bool(use_bias_correction_kl),
        sapo_temperature_pos=sapo_temperature_pos,
        sapo_temperature_neg=sapo_temperature_neg,
        temperature=temperature,
        logit_scale=logit_scale,
        softcap=softcap,
        return_entropy=ent_w is not None,
        sampling_mask=sampling_mask,
        token_temperature=token_temperature,
        entropy_over=entropy_over,
        chunk_size=chunk_size,
        precision=config.precision_of(precision),
        all_logprobs=all_logprobs,
    )
    family.donate(loss)
    return loss, _metrics(
        whole(logp.detach()),
        None if ent_w is None else whole(ent),
        whole(adv),
        None if old is None else whole(old),
        None if ref is None else whole(ref),
        m_all,
        loss_type,
        importance_sampling_level,
        epsilon_low,
        epsilon_high,
        bool(use_bias_correction_kl),
        delta,
    )


def _group_rows(layout: Layout | None, rows: int, device: torch.device):
    """``(whole, mine)`` for per-completion tensors under sequence parallelism (each rank holds ``rows`` whole
    completions): ``whole(t)`` the group's ``[B, ...]`` from this rank's ``[rows, ...]`` (one all-gather),
    ``mine(t)`` this rank's rows of a group-wide tensor.  Otherwise both return ``t``."""
    if layout is None or not layout.sequence_parallel:
        return (lambda t: t), (lambda t: t)
    pg = process_group(layout.group_name)
    sizes = token_sizes(rows, pg, device)
    first = sum(sizes[: torch.distributed.get_rank(pg)])
    return (lambda t: gather_tokens(t, pg, sizes)), (lambda t: t[first : first + rows])


def metric_terms(
    logp: Tensor,
    adv: Tensor,
    old: Tensor | None,
    ref: Tensor | None,
    m: Tensor,
    *,
    loss_type: str,
    level: str,
    epsilon_low: float,
    epsilon_high: float,
    delta: float | None,
    bias_corrected: bool,
) -> dict[str, Tensor]:
    """TRL 1.16's logged GRPO quantities before they are averaged, detached: the one source of them, for
    ``linear_grpo_loss``' metrics and memops' TRL ``GRPOTrainer`` (which averages them across processes).

    ``"clip_ratio/low"``, ``"clip_ratio/high"`` (not for cispo and sapo) or ``"cispo_clip_ratio"``: 0/1 per
    token ``[B, T]`` whose importance ratio was clipped against its advantage's sign (the ratio read after
    ``delta``'s two-sided clipping, as TRL), per sequence ``[B, 1]`` with ``level="sequence"`` (GSPO);
    ``"kl"`` per token when ``ref`` is given (k3, times the ratio when ``bias_corrected``).  ``adv`` is per
    token ``[B, T]``, ``m`` the float completion mask."""
    logp = logp.detach()
    old = logp if old is None else old.to(logp.dtype)
    if level == "sequence":
        log_iw = sequence_log_weights(logp, old, m)[:, :1]
        adv = adv[:, :1]
    else:
        log_iw = logp - old
    ratio = torch.exp(log_iw)
    terms = {}
    if loss_type == "cispo":
        terms["cispo_clip_ratio"] = ((ratio > epsilon_high) & (adv > 0)).to(m.dtype)
    elif loss_type != "sapo":
        clipped = ratio if delta is None else torch.clamp(ratio, max=delta)
        terms["clip_ratio/low"] = ((clipped < 1 - epsilon_low) & (adv < 0)).to(m.dtype)
        terms["clip_ratio/high"] = ((clipped > 1 + epsilon_high) & (adv > 0)).to(m.dtype)
    if ref is not None:
        gap = ref.to(logp.dtype) - logp
        kl = torch.exp(gap) - gap - 1
        terms["kl"] = kl * ratio if bias_corrected else kl
    return terms


def _metrics(logp, ent, adv, old, ref, m, loss_type, level, epsilon_low, epsilon_high, bias_corrected, delta):
    """TRL's logged GRPO metrics over one call's tokens: masked means of :func:`metric_terms` (a per-sequence
    term: the mean over sequences), detached."""
    terms = metric_terms(
        logp,
        adv,
        old,
        ref,
        m,
        loss_type=loss_type,
        level=level,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        delta=delta,
        bias_corrected=bias_corrected,
    )
    denom = m.sum().clamp(min=1.0)

    def mean(x):
        return x[:, 0].mean() if x.shape[1] == 1 and level == "sequence" else (x * m).sum() / denom

    metrics = {}
    if "cispo_clip_ratio" in terms:
        metrics["cispo_clip_ratio"] = mean(terms["cispo_clip_ratio"])
    if "clip_ratio/low" in terms:
        low, high = terms["clip_ratio/low"], terms["clip_ratio/high"]
        metrics["clip_ratio/low_mean"] = mean(low)
        metrics["clip_ratio/high_mean"] = mean(high)
        metrics["clip_ratio/region_mean"] = mean(torch.maximum(low, high))
    if ent is not None:
        metrics["entropy"] = (ent.detach() * m).sum() / denom
    if "kl" in terms:
        metrics["kl"] = (terms["kl"] * m).sum() / denom
    return metrics
