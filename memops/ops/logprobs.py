"""Per-token log-probabilities for RL: ``memops::linear_logprobs``, and the chunk loop it shares with the fused
GRPO loss ``memops::linear_grpo`` (``ops/grpo.py``).

Both run the chunk engine with ``logit_scale = 1 / temperature`` and one head: per chunk it gathers the
target logit, builds the softmax in place and returns ``log p(target)`` (and the entropy when asked).
Given per-row coefficients ``c1`` on the log-probability and ``c2`` on the entropy, the same head returns
``d/dz = c1 * (onehot - p) - c2 * p * (log p + H)``.

* ``linear_logprobs`` does forward work only; its backward op recomputes the chunks with the per-token
  ``grad_output`` of either output (four projection-sized matmuls: the per-token bound), leaving out
  tokens whose ``grad_output`` is 0 where that is exact (``ops/plan.py``).
* ``linear_grpo`` knows each token's coefficient as soon as the chunk's log-probabilities are known
  (autograd of the per-token GRPO loss with respect to the log-probability, a ``[rows]`` computation), so
  its forward also returns the loss's gradients: three matmuls in all, as in the unfused baseline, one
  for masked tokens, none for masked tokens with ``beta == 0`` where exact (see ``grpo.chunks``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .. import config, validation
from ..contract import Args
from ..meta.logprobs import EXTRAS, LOGPROBS
from ..meta.vocab_parallel import Layout, resolve
from ..rules import placeholder
from . import engine, family, plan, triton_heads
from .reducer import LOCAL, Reducer, reducer_of

# coef(sel, logp, entropy) -> (c1 [n] or None, c2 [n] or None); None means no gradient.
Coef = Callable[["slice | Tensor", Tensor, Tensor | None], tuple | None]


def kept_set(a: Args, t1d: Tensor, vocab: int) -> Tensor | None:
    """``sampling_mask`` as :func:`chunks` takes it: ``[N, K + 1]`` int64, each row's kept ids with its target
    added (a target outside its row's kept set counts as kept: its log-probability stays finite), each id
    once, -1 elsewhere; ids out of ``[-1, vocab)`` refused by name.  None without a mask."""
    mask = a.sampling_mask
    if mask is None:
        return None
    n = t1d.numel()
    rows = mask.reshape(n, mask.shape[-1])
    validation.check_target_range(rows, vocab, -1, "sampling_mask", "padding")
    ids = torch.cat([rows.long(), t1d.long().reshape(n, 1)], dim=1).sort(dim=1).values
    repeat = torch.zeros_like(ids, dtype=torch.bool)
    repeat[:, 1:] = ids[:, 1:] == ids[:, :-1]
    return ids.masked_fill_(repeat, -1)


def split_temperature(temperature, target: Tensor, name: str = "target") -> tuple[float, Tensor | None]:
    """A front end's ``temperature``: a number, or a tensor broadcastable to ``target`` (one per token, or per
    sequence as ``[B, 1]``), then passed to the op expanded to ``target``'s shape with the option at 1.  A
    tensor that requires grad is refused: the ops have no derivative for it."""
    if not isinstance(temperature, Tensor):
        return float(temperature), None
    if temperature.requires_grad and torch.is_grad_enabled():
        validation.fail("temperature requires grad, but the ops give it no gradient: pass temperature.detach()")
    try:
        expanded = temperature.expand(target.shape)
    except RuntimeError:
        validation.fail(
            f"temperature shape {tuple(temperature.shape)} must broadcast to {name}'s shape {tuple(target.shape)}"
        )
    return 1.0, expanded.contiguous()


def token_temperatures(a: Args, cdt: torch.dtype) -> Tensor | None:
    """The call's per-token temperatures as rows ``[N]`` in the compute dtype, checked positive (reads tensor
    data: one device-to-host copy; sync-free a device-side assert), or None."""
    temp = a.token_temperature
    if temp is None:
        return None
    rows = temp.reshape(-1).to(cdt)
    if rows.numel():
        positive = (rows > 0).all() & rows.isfinite().all()
        if config.is_sync_free(rows):
            torch._assert_async(positive, "memops: every temperature must be finite and > 0")
        elif not bool(positive):
            bad = rows[~((rows > 0) & rows.isfinite())][0].item()
            validation.fail(f"every temperature must be finite and > 0, got {bad}")
    return rows


def plan_scale(a: Args, rows: Tensor | None):
    """The largest factor on the projection's logits before any soft-capping: ``logit_scale / temperature``
    (the smallest per-token temperature's, a 0-dim tensor, when there is one per token)."""
    if rows is None or not rows.numel():
        return a.logit_scale / a.temperature
    return a.logit_scale / rows.min()


def chunks(
    x2d,
    weight,
    t1d,
    bias,
    *,
    temperature,
    entropy: bool,
    coef: Coef | None = None,
    fixed: tuple | None = None,
    need,
    chunk_size,
    rows: Tensor | None = None,
    out: tuple | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    extras: dict | None = None,
    reducer: Reducer = LOCAL,
    accurate: bool = False,
    kept: Tensor | None = None,
    entropy_over: str = "full",
    token_temperature: Tensor | None = None,
):
    """Run the head over ``x2d`` (only ``rows`` when given; see ``engine.run``), writing the per-row
    log-probs (and entropy) into ``out`` when given, else into new ``[N]`` tensors.  ``extras`` maps
    ``log_sum_sq_probs`` / ``mean_logits`` / ``is_top1`` to ``[N]`` tensors to fill as well.  The gradient
    coefficients come from ``coef`` (computed from each chunk's log-probs) or ``fixed`` (``(c1, c2)``,
    ``[N]`` tensors or None, known beforehand); neither: forward work only.

    The logits are ``softcap(logit_scale * (x @ W.T + b)) / temperature``: without soft-capping the
    engine applies ``logit_scale / temperature`` in one go, with it the head divides by the temperature
    (and multiplies its gradient by ``1 / temperature``).

    With a group ``reducer`` ``weight`` holds the vocabulary rows ``reducer.start ...``: the row max, then
    the sums (exponentials, the target logit, those of the entropy and the extras) are reduced across the
    group once per chunk (``is_top1``: two more), and the gradients are this shard's.

    ``kept`` (``[N, K]``, :func:`kept_set`): each row's kept token ids (the target among them, each once, -1
    elsewhere): the log-probability is renormalized over them, ``z_t - logsumexp_kept(z)``, with gradient
    ``onehot - p_kept`` on the kept ids; the entropy too with ``entropy_over="kept"``.  The kept logits'
    maximum is reduced with the row's, their sums with the others: no extra collective per chunk.

    ``token_temperature`` (``[N]``, compute dtype): each row's temperature in place of ``temperature``, applied
    in the head after soft-capping (the unfused order), its gradient too."""
    n = x2d.shape[0]
    cdt = engine.compute_dtype(x2d.dtype)
    if out is None:
        out = (
            plan.rows_out(n, cdt, x2d.device, rows),
            plan.rows_out(n, cdt, x2d.device, rows) if entropy else None,
        )
    logp_rows, ent_rows = out
    extras = extras or {}
    inv_t = 1.0 / temperature
    inv_rows = None if token_temperature is None else token_temperature.reciprocal()
    # the temperature after soft-capping, or one per row: applied by the head
    in_head = (softcap is not None and inv_t != 1.0) or inv_rows is not None

    def tempered(z: Tensor, sel) -> Tensor:
        """``z`` divided by the temperature in place (its row's when there is one per row)."""
        return z.mul_(inv_t) if inv_rows is None else z.mul_(inv_rows[sel].unsqueeze(1))

    if fixed is not None:
        c1_all, c2_all = fixed

        def coef(sel, logp, ent):
            return (None if c1_all is None else c1_all[sel]), (None if c2_all is None else c2_all[sel])

    local = reducer is LOCAL
    vocab = reducer.vocab_of(weight)
    t_all = t1d.long()
    mine_all, safe_all = reducer.owned(t_all, weight.shape[0])  # the target's row in this weight
    if kept is not None:  # each kept id's row in this weight, and whether this weight holds it
        kown_all, kidx_all = reducer.owned_valid(kept, kept >= 0, weight.shape[0])
    ent_kept = entropy and kept is not None and entropy_over == "kept"

    def head(z: Tensor, sel):
        if in_head:
            tempered(z, sel)
        t = safe_all[sel].unsqueeze(1)
        z_sum = None
        if "mean_logits" in extras:
            if local:
                extras["mean_logits"][sel] = z.mean(dim=1)
            else:
                z_sum = z.sum(dim=1)
        if "is_top1" in extras:  # the first maximum, as argmax: a tie with an earlier token is not top-1
            extras["is_top1"][sel] = reducer.first_argmax(z) == t_all[sel]
        zmax = z.amax(dim=1, keepdim=True)
        # the kept set's logits, maximum, ownership and rows in this weight: None without a sampling mask
        zk: Any = None
        kmax: Any = None
        kown: Any = None
        kidx: Any = None
        if kept is not None:  # the kept logits and their maximum (-inf where this weight does not hold the id)
            kown, kidx = kown_all[sel], kidx_all[sel]
            zk = z.gather(1, kidx).masked_fill_(~kown, -torch.inf)
            kmax = zk.amax(dim=1)
        reducer.max_(zmax, kmax)
        z.sub_(zmax)  # z <- s = z - rowmax
        s_t = z.gather(1, t).squeeze(1)
        if mine_all is not None:  # summed over the group: the shards that do not hold the target add 0
            s_t = torch.where(mine_all[sel], s_t, 0.0)
        full_entropy = entropy and not ent_kept
        if full_entropy:
            e = torch.exp(z)
            total, ez = e.sum(dim=1), (e * z).sum(dim=1)
        else:
            z.exp_()
            e, total, ez = z, z.sum(dim=1), None
        e_sq = e.square().sum(dim=1) if "log_sum_sq_probs" in extras else None
        ek = dk = k_total = k_ez = None
        if zk is not None:  # exp(z_k - kmax) over the kept ids, and for the kept entropy sum p_k (z_k - kmax)
            dk = torch.where(kown, zk - kmax.unsqueeze(1), 0.0)
            ek = torch.where(kown, dk.exp(), 0.0)
            k_total = ek.sum(dim=1)
            k_ez = (ek * dk).sum(dim=1) if ent_kept else None
        reducer.sum_(total, s_t, ez, e_sq, z_sum, k_total, k_ez)
        log_total = total.log()
        ent = None
        if ez is not None:  # the entropy asked for
            ent = log_total - ez / total  # H = log sum e^s - sum p s
            ent_rows[sel] = ent
        log_k = None
        if k_total is not None:
            log_k = k_total.log()
            if k_ez is not None:  # the entropy over the kept set
                ent = log_k - k_ez / k_total
                ent_rows[sel] = ent
        if e_sq is not None:
            extras["log_sum_sq_probs"][sel] = e_sq.log() - 2 * log_total
        if z_sum is not None:
            extras["mean_logits"][sel] = z_sum / vocab
        if log_k is None:
            logp = s_t - log_total
        else:  # z_t - logsumexp_kept(z) = s_t + rowmax - kmax - log sum_kept exp(z_k - kmax)
            logp = s_t + (zmax.squeeze(1) - kmax) - log_k
        logp_rows[sel] = logp
        c = coef(sel, logp, ent) if coef is not None else None
        if c is None:
            return None
        c1, c2 = c
        if log_k is not None:
            return kept_grad(z, e, total, log_total, ent, t, sel, c1, c2, ek, dk, k_total, log_k, kown, kidx)
        if c2 is not None:  # z holds s: -p * (c1 + c2 * (s - log_total + H))
            assert ent is not None, "an entropy coefficient needs the entropy"
            z.add_((ent - log_total).unsqueeze(1)).mul_(c2.unsqueeze(1))
            if c1 is not None:
                z.add_(c1.unsqueeze(1))
            z.mul_(e).mul_((-1.0 / total).unsqueeze(1))
        else:  # -p * c1
            if entropy:  # z still holds s
                z.copy_(e)
            z.mul_((-c1 / total).unsqueeze(1))
        if c1 is not None:
            z.scatter_add_(1, t, (c1 if mine_all is None else torch.where(mine_all[sel], c1, 0.0)).unsqueeze(1))
        return tempered(z, sel) if in_head else z

    def kept_grad(z, e, total, log_total, ent, t, sel, c1, c2, ek, dk, k_total, log_k, kown, kidx):
        """d/dz with a kept set: ``c1 (onehot - p_kept)`` on the kept ids, plus the entropy's term: the full
        vocabulary's ``-c2 p (s - log_total + H)`` (z holds s) or the kept set's ``-c2 p_k (d_k - log_k +
        H_k)``."""
        if c2 is not None and not ent_kept:
            assert ent is not None, "an entropy coefficient needs the entropy"
            z.add_((ent - log_total).unsqueeze(1)).mul_(c2.unsqueeze(1)).mul_(e).mul_((-1.0 / total).unsqueeze(1))
        else:
            z.zero_()
        pk = ek / k_total.unsqueeze(1)
        sparse = None
        if c1 is not None:
            sparse = pk * (-c1).unsqueeze(1)
        if c2 is not None and ent_kept:
            term = pk * (dk - (log_k - ent).unsqueeze(1)) * (-c2).unsqueeze(1)
            sparse = term if sparse is None else sparse.add_(term)
        if sparse is not None:
            z.scatter_add_(1, kidx, torch.where(kown, sparse, 0.0))
        if c1 is not None:
            z.scatter_add_(1, t, (c1 if mine_all is None else torch.where(mine_all[sel], c1, 0.0)).unsqueeze(1))
        return tempered(z, sel) if in_head else z

    fused = local and kept is None and inv_rows is None and triton_heads.wanted(x2d)
    if fused:  # the same head in Triton: one launch per chunk (two with ``coef``: forward, then gradient)
        scale = logit_scale if in_head else logit_scale * inv_t
        fused_coef = None if fixed is not None else coef
        head = triton_heads.logprobs(
            t1d, out, extras, scale=scale, softcap=softcap, post=inv_t if in_head else 1.0, coef=fused_coef, fixed=fixed
        )
    gx, gw, gb = engine.run(
        x2d,
        weight,
        bias,
        head,
        logit_scale=logit_scale if in_head else logit_scale * inv_t,
        softcap=softcap,
        chunk_size=chunk_size,
        grad_input=need[0],
        grad_weight=need[1],
        grad_bias=need[2] and bias is not None,
        rows=rows,
        fused=fused,
        reducer=reducer,
        accurate=accurate,
    )
    return logp_rows, ent_rows, gx, gw, gb


# ---- memops::linear_logprobs ---------------------------------------------------------------------------


def forward(a: Args, need: list) -> tuple:
    reducer = reducer_of(a)
    validation.check_target_range(a.target, reducer.vocab_of(a.weight), None)
    x2d, t1d, _ = engine.flatten(a.input, a.target)
    n, cdt = t1d.numel(), engine.compute_dtype(a.input.dtype)
    extras = {
        name: torch.empty(n, dtype=torch.bool if name == "is_top1" else cdt, device=x2d.device)
        for name in EXTRAS[1:]
        if getattr(a, "return_" + name)
    }
    logp, ent, *_ = chunks(
        x2d,
        a.weight,
        t1d,
        a.bias,
        token_temperature=token_temperatures(a, cdt),
        temperature=a.temperature,
        entropy=a.return_entropy,
        coef=None,
        need=(False, False, False),
        chunk_size=a.chunk_size,
        logit_scale=a.logit_scale,
        softcap=a.softcap,
        extras=extras,
        reducer=reducer,
        accurate=a.precision == "accurate",
        kept=kept_set(a, t1d, reducer.vocab_of(a.weight)),
        entropy_over=a.entropy_over,
    )
    shaped = [logp, ent] + [extras.get(name) for name in EXTRAS[1:]]
    return tuple(placeholder(logp) if t is None else t.view(a.target.shape) for t in shaped), []


def gradients(a: Args, grad_outputs: list, need: list) -> list:
    x2d, t1d, _ = engine.flatten(a.input, a.target)
    cdt = engine.compute_dtype(a.input.dtype)
    grad_logprobs, grad_entropy = grad_outputs[:2]
    if not a.return_entropy:  # the entropy output was an empty placeholder
        grad_entropy = None
    g1 = None if grad_logprobs is None else grad_logprobs.reshape(-1).to(cdt)
    g2 = None if grad_entropy is None else grad_entropy.reshape(-1).to(cdt)
    if g1 is None and g2 is None:
        return [None] * len(need)

    # tokens with no incoming gradient (masked by the caller's loss) are skipped where that is exact
    needed = functools.reduce(torch.logical_or, [g != 0 for g in (g1, g2) if g is not None])
    reducer = reducer_of(a)
    if reducer is not LOCAL:  # every rank skips the same rows: those no rank has a gradient for
        needed = needed.to(torch.uint8)
        reducer.max_(needed)
        needed = needed.bool()
    temps = token_temperatures(a, cdt)
    rows = plan.plan(x2d, a.weight, a.bias, plan_scale(a, temps), needed=needed, reducer=reducer).full
    *_, gx, gw, gb = chunks(
        x2d,
        a.weight,
        t1d,
        a.bias,
        token_temperature=temps,
        temperature=a.temperature,
        entropy=g2 is not None,
        fixed=(g1, g2),
        need=need,
        chunk_size=a.chunk_size,
        rows=rows,
        logit_scale=a.logit_scale,
        softcap=a.softcap,
        reducer=reducer,
        accurate=a.precision == "accurate",
        kept=kept_set(a, t1d, reducer.vocab_of(a.weight)),
        entropy_over=a.entropy_over,
    )
    return engine.grads_out(gx, gw, gb, a.input, a.weight, a.bias)


family.implement(LOGPROBS, forward, gradients)


def linear_logprobs(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    *,
    temperature: float | Tensor = 1.0,
    return_entropy: bool = False,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    extras: Sequence[str] = (),
    sampling_mask: Tensor | None = None,
    entropy_over: str = "full",
    chunk_size: int | None = None,
    precision: str | None = None,
    _parallel: Layout | None = None,
) -> Tensor | tuple[Tensor, Tensor] | dict[str, Tensor]:
    """``log_softmax(softcap(logit_scale * (input @ weight.T + bias)) / temperature)`` at ``target``, shaped
    like ``target`` (``softcap(y) = c * tanh(y / c)`` when ``softcap=c`` is set).

    With ``return_entropy=True`` returns ``(logprobs, entropy)`` (the entropy of the same tempered
    distribution per token).  Both are differentiable with respect to input, weight and bias for any
    per-token ``grad_output``; under ``torch.no_grad()`` only the forward work is done.  ``extras`` asks for
    more per-token outputs from the same pass, without gradient: ``"log_sum_sq_probs"`` (``log sum_v p_v^2``),
    ``"mean_logits"`` (mean of the tempered logits over the vocabulary), ``"is_top1"`` (the target is the
    first most likely token); then a dict is returned with ``"log_probs"``, ``"entropy"`` when asked for, and
    each extra.  Results are fp32 (fp64 for fp64 inputs); ``is_top1`` is bool.

    ``sampling_mask`` (``target.shape + (K,)`` integer ids, -1 padding, duplicates allowed): the tokens the
    sampler kept (top-k / top-p) per token.  The log-probability is then the sampler's, renormalized over the
    kept set: ``z_t / T - logsumexp_{j kept}(z_j / T)``, gradient exact; a target outside its row's kept set
    counts as kept.  ``temperature`` may be a tensor broadcastable to ``target`` (one per token, or ``[B, 1]``
    per sequence; positive, without gradient), applied after soft-capping as the sampler does.  The entropy
    stays over the whole vocabulary (``entropy_over="full"``) or is the kept
    set's (``entropy_over="kept"``); the other extras are the whole vocabulary's.
    """
    extras = tuple(extras)
    unknown = sorted(set(extras) - set(EXTRAS[1:]))
    if unknown:
        raise ValueError(f"extras must be among {EXTRAS[1:]}, got {unknown}")
    spec, parallel = resolve(LOGPROBS, _parallel)
    temperature, token_temperature = split_temperature(temperature, target)
    out = spec.call(
        **parallel,
        input=input,
        weight=weight,
        target=target,
        bias=bias,
        temperature=temperature,
        logit_scale=logit_scale,
        softcap=softcap,
        return_entropy=bool(return_entropy),
        sampling_mask=sampling_mask,
        token_temperature=token_temperature,
        entropy_over=entropy_over,
        chunk_size=chunk_size,
        precision=config.precision_of(precision),
        **{"return_" + name: name in extras for name in EXTRAS[1:]},
    )
    if extras:
        asked = ("entropy",) * bool(return_entropy) + extras
        return {"log_probs": out[0], **{name: out[1 + EXTRAS.index(name)] for name in asked}}
    return (out[0], out[1]) if return_entropy else out[0]
