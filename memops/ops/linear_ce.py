"""``memops::linear_ce``: chunked projection + cross-entropy (label smoothing, z-loss, soft-capping).

The family is declared in ``memops/meta/linear_ce.py``; this module gives it its per-chunk head
(:func:`ce_chunks`), its forward and recompute functions and its front end.  With a scalar reduction
the forward pass also computes the loss's gradients (three projection-sized matmuls in all, as in the
unfused baseline); with ``reduction="none"`` the backward op recomputes the chunks with the per-token
``grad_output``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import validation
from ..contract import Args
from ..meta.linear_ce import SPEC
from ..rules import placeholder
from . import engine, family, plan, triton_heads


class Reducer:
    """Per-row statistics of a head whose vocabulary is split over processes (``ops/vocab_parallel.py``).

    This one is for a single process: the head's weight is the whole vocabulary and there is nothing to
    reduce.  A group reducer all-reduces the row max (``max_``) and the sums (``sum_``) in place, once
    per chunk (``whole_chunk``: the head sees whole chunks)."""

    start = 0  # the first vocabulary row of this process's weight
    vocab: int | None = None  # the whole vocabulary's size (None: the weight's rows)
    whole_chunk = False

    def max_(self, t: Tensor) -> None:
        pass

    def sum_(self, *ts: Tensor | None) -> None:
        pass


LOCAL = Reducer()


def ce_chunks(
    x2d,
    weight,
    t1d,
    bias,
    upstream: Tensor | None,
    need,
    a: Args,
    rows=None,
    reducer: Reducer = LOCAL,
    top1=None,
    valid: Tensor | None = None,
):
    """Per-row loss and lse over the rows ``rows`` (``plan.plan``); gradients when ``upstream`` is given.

    ``upstream`` is the per-row (``[N]``) or shared (0-dim) factor that multiplies each non-ignored
    row's d(loss)/d(logits); ignored rows get factor 0.  ``a`` holds the CE options by name.  With a
    group ``reducer``, ``weight`` holds vocabulary rows ``reducer.start ...``: the row max, the sum of
    exponentials, the target logit and the logit sum are reduced across the group, and the gradients
    are this shard's (input gradient: its partial sum).  ``top1`` (bool ``[N]``), when given, gets whether
    each non-ignored row's target is its first most likely token (one process only).  ``valid``: the
    caller's ``t1d != ignore_index``, when it has it.
    """
    n = x2d.shape[0]
    local = weight.shape[0]
    vocab, first = reducer.vocab or local, reducer.start
    cdt = engine.compute_dtype(x2d.dtype)
    loss_rows = torch.zeros(n, dtype=cdt, device=x2d.device)
    lse_rows = plan.rows_out(n, cdt, x2d.device, rows)
    eps, zl, ignore = a.label_smoothing, a.z_loss, a.ignore_index
    # per-row target facts, once per call (a head indexes them by its rows)
    t_all = t1d.long()
    valid_all = t_all != ignore if valid is None else valid
    if reducer is LOCAL:  # targets were range-checked: every valid target's row is in this weight
        mine_all, safe_all = valid_all, torch.where(valid_all, t_all, 0).unsqueeze(1)
    else:
        mine_all = valid_all & (t_all >= first) & (t_all < first + local)  # the target's row is in this weight
        safe_all = torch.where(mine_all, t_all - first, 0).unsqueeze(1)
    coef_all = None if upstream is None else engine.row_coef(upstream, slice(None), valid_all)

    def head(z: Tensor, sel):
        valid, safe = valid_all[sel], safe_all[sel]
        z_target = z.gather(1, safe).squeeze(1)
        if reducer is not LOCAL:  # summed over the group: the shards that do not hold the target add 0
            z_target = torch.where(mine_all[sel], z_target, 0.0)
        z_sum = z.sum(dim=1) if eps else None
        if top1 is not None:  # the first maximum, as argmax: a tie with an earlier token is not top-1
            top1[sel] = valid & (z.argmax(dim=1) == t_all[sel])
        # softmax numerator in place over the logits: z <- exp(z - rowmax)
        zmax = z.amax(dim=1, keepdim=True)
        reducer.max_(zmax)
        z.sub_(zmax).exp_()
        total = z.sum(dim=1)
        reducer.sum_(total, z_target, z_sum)
        zmax = zmax.squeeze(1)
        # logsumexp as torch.logsumexp gives it (a +-inf row max is the answer) ...
        lse_out = torch.where(zmax.isinf(), zmax, zmax + total.log())
        # ... but log_softmax, hence the loss and its gradient, is NaN across such a row
        # (x - x + x is x exactly for finite x and NaN for +-inf and NaN: isfinite + where in two ops)
        lse = (lse_out - lse_out).add_(lse_out)
        loss = lse - z_target  # an ignored row's (a stand-in target's) is masked below
        if eps:
            loss = (1.0 - eps) * loss + eps * (lse - z_sum / vocab)
        if zl:
            loss = loss + zl * lse.square()
        loss_rows[sel] = torch.where(valid, loss, 0.0)
        lse_rows[sel] = lse_out
        if upstream is None:
            return None
        coef = coef_all[sel]
        # d loss / d z = coef * [softmax * (1 + 2 zl lse) - eps / V - (1 - eps) onehot(target)]
        row = coef / total
        if zl:
            row = row * (1.0 + 2.0 * zl * lse)
        z.mul_(row.unsqueeze(1))
        if eps:
            z.sub_((coef * (eps / vocab)).unsqueeze(1))
        onehot = coef * (eps - 1.0)  # 0 at ignored rows (coef is)
        if reducer is not LOCAL:
            onehot = torch.where(mine_all[sel], onehot, 0.0)
        return z.scatter_add_(1, safe, onehot.unsqueeze(1))

    fused = reducer is LOCAL and triton_heads.wanted(x2d)
    if fused:  # the same head in one Triton kernel per chunk
        head = triton_heads.ce(t1d, coef_all, a, loss_rows, lse_rows, top1)
    gx, gw, gb = engine.run(
        x2d,
        weight,
        bias,
        head,
        logit_scale=a.logit_scale,
        softcap=a.softcap,
        chunk_size=a.chunk_size,
        grad_input=need[0],
        grad_weight=need[1],
        grad_bias=need[2] and bias is not None,
        rows=rows,
        sub_block_bytes=engine.WHOLE_CHUNK if reducer.whole_chunk else None,
        fused=fused,
    )
    return loss_rows, lse_rows, gx, gw, gb


def _forward(a: Args, need: list) -> tuple:
    validation.check_target_range(a.target, a.weight.shape[0], a.ignore_index)
    x2d, t1d, _ = engine.flatten(a.input, a.target)
    cdt = engine.compute_dtype(a.input.dtype)
    valid = t1d != a.ignore_index
    den = engine.denominator(valid, a.num_items, cdt) if a.reduction == "mean" else None
    up = engine.upstream(None, a.reduction, valid, a.num_items, cdt, den=den) if any(need) else None
    # ignored rows reach no output unless their lse was asked for
    rows = plan.plan(x2d, a.weight, a.bias, a.logit_scale, needed=None if a.all_lse else valid).full
    top1 = torch.zeros(t1d.shape, dtype=torch.bool, device=x2d.device) if a.return_is_top1 else None
    loss_rows, lse_rows, gx, gw, gb = ce_chunks(x2d, a.weight, t1d, a.bias, up, need, a, rows, top1=top1, valid=valid)
    loss = engine.reduce_rows(loss_rows, a.reduction, valid, a.num_items, a.target.shape, den=den)
    top1 = placeholder(loss) if top1 is None else top1.view(a.target.shape)
    if not a.all_lse:  # an ignored row's lse is 0 then, whether the plan computed the row or not
        lse_rows = torch.where(valid, lse_rows, 0.0)
    return (loss, lse_rows.view(a.target.shape), top1), engine.grads_out(gx, gw, gb, a.input, a.weight, a.bias)


def _gradients(a: Args, grad_outputs: list, need: list) -> list:
    x2d, t1d, _ = engine.flatten(a.input, a.target)
    valid = t1d != a.ignore_index
    up = engine.upstream(grad_outputs[0], a.reduction, valid, a.num_items, engine.compute_dtype(a.input.dtype))
    rows = plan.plan(x2d, a.weight, a.bias, a.logit_scale, needed=valid).full
    *_, gx, gw, gb = ce_chunks(x2d, a.weight, t1d, a.bias, up, need, a, rows, valid=valid)
    return engine.grads_out(gx, gw, gb, a.input, a.weight, a.bias)


family.implement(SPEC, _forward, _gradients)


def linear_cross_entropy(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    num_items: int | float | Tensor | None = None,
    chunk_size: int | None = None,
    return_lse: bool = False,
    return_is_top1: bool = False,
) -> Tensor | tuple[Tensor, ...]:
    """Cross-entropy of ``logit_scale * (input @ weight.T + bias)`` without materializing the logits.

    Equals ``F.cross_entropy(logits.float(), target, ignore_index=..., reduction=...,
    label_smoothing=...)`` plus ``z_loss * logsumexp(logits)**2`` per non-ignored token,
    where ``logits`` are soft-capped to ``softcap * tanh(logits / softcap)`` when ``softcap``
    is set.  ``num_items`` replaces the token count as the divisor of ``reduction="mean"``.
    With ``return_lse=True`` also returns the per-token logsumexp (shaped like
    ``target``, detached) from the same pass.  Otherwise tokens whose target is
    ``ignore_index`` are not computed at all (when that is exact: see ``ops/plan.py``),
    so padding and prompt tokens cost no matmul work.  With ``return_is_top1=True`` also returns, last,
    whether each token's target is its most likely token (bool, shaped like ``target``, False at ignored
    tokens; a tie with an earlier token does not count, as ``argmax``): the accuracy TRL's SFT logs.
    """
    loss, lse, top1, _ = SPEC.call(
        input=input,
        weight=weight,
        target=target,
        bias=bias,
        num_items=num_items,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        logit_scale=logit_scale,
        chunk_size=chunk_size,
        all_lse=bool(return_lse),
        return_is_top1=bool(return_is_top1),
    )
    family.donate(loss)
    out = (loss,) + ((lse,) if return_lse else ()) + ((top1,) if return_is_top1 else ())
    return out if len(out) > 1 else loss
