"""``memops::linear_ce``: chunked projection + cross-entropy (label smoothing, z-loss, soft-capping).

Forward returns ``(loss, lse, grad_input, grad_weight, grad_bias)``.  With a
scalar reduction and a non-empty ``grad_mask`` the forward pass also computes
the gradients of the loss (three projection-sized matmuls in all, as in the
unfused baseline); the backward op then only scales them by ``grad_output``.
With ``reduction="none"`` the backward op recomputes the chunks with the
per-token ``grad_output``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import validation as V
from . import _autograd, engine


class Shard:
    """This process's slice ``[start, start + rows)`` of a ``vocab``-row weight split over a process group
    (vocab parallelism); ``max_`` and ``sum_`` all-reduce per-row statistics across the group in place."""

    def __init__(self, start: int, vocab: int, max_, sum_):
        self.start, self.vocab, self.max_, self.sum_ = start, vocab, max_, sum_


def _ce_chunks(
    x2d,
    weight,
    t1d,
    bias,
    upstream: Tensor | None,
    need,
    *,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    logit_scale,
    chunk_size,
    shard: Shard | None = None,
    all_lse: bool = True,
):
    """Per-row loss and lse; gradients when ``upstream`` is given.

    With ``all_lse=False`` rows whose target is ``ignore_index`` are skipped where
    that is exact (``engine.live_rows``): their loss and gradients are zero and
    their lse is left 0.

    ``upstream`` is the per-row (``[N]``) or shared (0-dim) factor that multiplies
    each non-ignored row's d(loss)/d(logits); ignored rows get factor 0.  With a
    ``shard``, ``weight`` holds rows ``shard.start ...`` of the vocabulary: the row
    max, the sum of exponentials, the target logit and the logit sum are reduced
    across the group, and the gradients are this shard's (input gradient: its
    partial sum).
    """
    n = x2d.shape[0]
    local = weight.shape[0]
    vocab, first = (shard.vocab, shard.start) if shard is not None else (local, 0)
    cdt = engine.compute_dtype(x2d.dtype)
    loss_rows = torch.zeros(n, dtype=cdt, device=x2d.device)
    eps, zl = label_smoothing, z_loss
    rows = None
    if shard is None and not all_lse:
        rows = engine.live_rows(x2d, weight, bias, t1d != ignore_index, logit_scale)
    lse_rows = engine.rows_out(n, cdt, x2d.device, rows)

    def head(z: Tensor, sel):
        t = t1d[sel].long()
        valid = t != ignore_index
        mine = valid if shard is None else valid & (t >= first) & (t < first + local)
        safe = torch.where(mine, t - first, 0).unsqueeze(1)
        z_target = z.gather(1, safe).squeeze(1)
        if shard is not None:
            z_target = torch.where(mine, z_target, 0.0)
        z_sum = z.sum(dim=1) if eps else None
        # softmax numerator in place over the logits: z <- exp(z - rowmax)
        zmax = z.amax(dim=1, keepdim=True)
        if shard is not None:
            shard.max_(zmax)
        z.sub_(zmax).exp_()
        total = z.sum(dim=1)
        if shard is not None:
            shard.sum_([x for x in (total, z_target, z_sum) if x is not None])
        zmax = zmax.squeeze(1)
        # logsumexp as torch.logsumexp gives it (a +-inf row max is the answer) ...
        lse_out = torch.where(zmax.isinf(), zmax, zmax + total.log())
        # ... but log_softmax, hence the loss and its gradient, is NaN across such a row
        lse = torch.where(lse_out.isfinite(), lse_out, torch.nan)
        loss = lse - z_target
        if eps:
            loss = (1.0 - eps) * loss + eps * (lse - z_sum / vocab)
        if zl:
            loss = loss + zl * lse.square()
        loss_rows[sel] = torch.where(valid, loss, 0.0)
        lse_rows[sel] = lse_out
        if upstream is None:
            return None
        coef = engine.row_coef(upstream, sel, valid)
        # d loss / d z = coef * [softmax * (1 + 2 zl lse) - eps / V - (1 - eps) onehot(target)]
        row = coef / total
        if zl:
            row = row * (1.0 + 2.0 * zl * lse)
        z.mul_(row.unsqueeze(1))
        if eps:
            z.sub_((coef * (eps / vocab)).unsqueeze(1))
        hit = coef * (eps - 1.0)
        return z.scatter_add_(1, safe, (hit if shard is None else torch.where(mine, hit, 0.0)).unsqueeze(1))

    # with a shard, the head sees whole chunks: its statistics are reduced across the group once per chunk
    gx, gw, gb = engine.run(
        x2d,
        weight,
        bias,
        head,
        logit_scale=logit_scale,
        softcap=softcap,
        chunk_size=chunk_size,
        grad_input=need[0],
        grad_weight=need[1],
        grad_bias=need[2] and bias is not None,
        rows=rows,
        sub_block_bytes=None if shard is None else engine.WHOLE_CHUNK,
    )
    return loss_rows, lse_rows, gx, gw, gb


@torch.library.custom_op("memops::linear_ce", mutates_args=())
def linear_ce(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None,
    num_items: Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    logit_scale: float,
    chunk_size: int,
    all_lse: bool,
    grad_mask: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(loss, lse, grad_input, grad_weight, grad_bias)``; ``lse`` of ignored tokens may be 0 unless ``all_lse``."""
    V.check_linear_ce(
        input, weight, target, bias, num_items, reduction, label_smoothing, z_loss, softcap, logit_scale, chunk_size
    )
    V.check_target_range(target, weight.shape[0], ignore_index)
    x2d, t1d, _ = engine.flatten(input, target)
    cdt = engine.compute_dtype(input.dtype)
    valid = t1d != ignore_index
    up, need = None, (False, False, False)
    if reduction != "none" and any(grad_mask):
        need, up = tuple(grad_mask), engine.upstream(None, reduction, valid, num_items, cdt)
    loss_rows, lse_rows, gx, gw, gb = _ce_chunks(
        x2d,
        weight,
        t1d,
        bias,
        up,
        need,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        logit_scale=logit_scale,
        chunk_size=chunk_size,
        all_lse=all_lse,
    )
    loss = engine.reduce_rows(loss_rows, reduction, valid, num_items, target.shape)
    return (loss, lse_rows.view(target.shape)) + engine.grads_out(gx, gw, gb, input, weight, bias)


@torch.library.custom_op("memops::linear_ce_backward", mutates_args=())
def linear_ce_backward(
    grad_loss: Tensor,
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None,
    num_items: Tensor | None,
    saved_grad_input: Tensor,
    saved_grad_weight: Tensor,
    saved_grad_bias: Tensor,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    logit_scale: float,
    chunk_size: int,
    all_lse: bool,
    need: list[bool],
    have: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``linear_ce``'s loss: scale what the forward computed, recompute the rest
    (``all_lse`` is the forward's option; gradients never need the ignored tokens' lse)."""
    V.check_linear_ce(
        input, weight, target, bias, num_items, reduction, label_smoothing, z_loss, softcap, logit_scale, chunk_size
    )
    cdt = engine.compute_dtype(input.dtype)
    out, missing = engine.scale_saved(
        grad_loss, (saved_grad_input, saved_grad_weight, saved_grad_bias), need, have, cdt
    )
    if any(missing):
        x2d, t1d, _ = engine.flatten(input, target)
        up = engine.upstream(grad_loss, reduction, t1d != ignore_index, num_items, cdt)
        _, _, gx, gw, gb = _ce_chunks(
            x2d,
            weight,
            t1d,
            bias,
            up,
            missing,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            softcap=softcap,
            logit_scale=logit_scale,
            chunk_size=chunk_size,
            all_lse=False,
        )
        fresh = engine.grads_out(gx, gw, gb, input, weight, bias)
        out = [f if m else o for o, f, m in zip(out, fresh, missing)]
    return tuple(engine.placeholder(input) if o is None else o for o in out)


def register_ce_autograd(op_name: str, backward_op, reduction_at: int) -> None:
    """Autograd for a CE-family op with inputs ``(input, weight, target, bias, num_items, *options,
    grad_mask)`` (``inputs[reduction_at]`` the reduction) and outputs ``(loss, lse, *grads)``; its
    backward op takes ``(grad_loss, input, weight, target, bias, num_items, *saved, *options, need, have)``."""

    def setup_context(ctx, inputs, output):
        input, weight, target, bias, num_items = inputs[:5]
        _, lse, gx, gw, gb = output
        ctx.save_for_backward(input, weight, target, bias, num_items)
        ctx.options = tuple(inputs[5:-1])
        scalar = inputs[reduction_at] != "none"
        _autograd.setup(ctx, (gx, gw, gb), [scalar and bool(m) for m in inputs[-1]], (lse,))

    def backward(ctx, grad_loss, _grad_lse, _ggx, _ggw, _ggb):
        input, weight, target, bias, num_items = ctx.saved_tensors
        n_inputs = 6 + len(ctx.options)
        need = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[3]]
        if grad_loss is None or not any(need):
            return (None,) * n_inputs
        dx, dw, db = _autograd.backward_grads(
            ctx, grad_loss, need, backward_op, (input, weight, target, bias, num_items)
        )
        return (dx, dw, None, db) + (None,) * (n_inputs - 4)

    torch.library.register_autograd(op_name, backward, setup_context=setup_context)


register_ce_autograd("memops::linear_ce", torch.ops.memops.linear_ce_backward, reduction_at=6)


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
) -> Tensor | tuple[Tensor, Tensor]:
    """Cross-entropy of ``logit_scale * (input @ weight.T + bias)`` without materializing the logits.

    Equals ``F.cross_entropy(logits.float(), target, ignore_index=..., reduction=...,
    label_smoothing=...)`` plus ``z_loss * logsumexp(logits)**2`` per non-ignored token,
    where ``logits`` are soft-capped to ``softcap * tanh(logits / softcap)`` when ``softcap``
    is set.  ``num_items`` replaces the token count as the divisor of ``reduction="mean"``.
    With ``return_lse=True`` also returns the per-token logsumexp (shaped like
    ``target``, detached) from the same pass.  Otherwise tokens whose target is
    ``ignore_index`` are not computed at all (when that is exact: see
    ``engine.live_rows``), so padding and prompt tokens cost no matmul work.
    """
    num_items, chunk_size = V.as_num_items(num_items), V.as_chunk_size(chunk_size)
    V.check_linear_ce(
        input, weight, target, bias, num_items, reduction, label_smoothing, z_loss, softcap, logit_scale, chunk_size
    )
    mask = _autograd.grad_mask(input, weight, bias)
    loss, lse, _, _, _ = torch.ops.memops.linear_ce(
        input,
        weight,
        target,
        bias,
        num_items,
        int(ignore_index),
        reduction,
        float(label_smoothing),
        float(z_loss),
        None if softcap is None else float(softcap),
        float(logit_scale),
        chunk_size,
        bool(return_lse),
        mask,
    )
    _autograd.donate(loss)
    return (loss, lse) if return_lse else loss
