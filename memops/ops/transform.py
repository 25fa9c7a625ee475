"""``memops::linear_transform``: any per-token loss written in plain PyTorch, through the chunk engine.

A *transform* is a function ``fn(logits, target, *extras, **options) -> [n]``:
``logits`` is one fp32 (fp64 for fp64 inputs) chunk ``[n, V]`` of the final
logits, ``target`` the chunk's ``[n]`` int64 targets, each extra the chunk's rows
of a per-token tensor.  Rows whose target is ``ignore_index`` are normally not
passed at all (``engine.live_rows``); where they must be, they carry target 0
and their result is discarded.
It is registered by name with :func:`transform`; the op takes the name and
the options (encoded as a string) so it traces and exports like any op.
Gradients come from ``torch.autograd.grad`` applied to ``fn`` one sub-block at a
time; nobody writes a derivative.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .. import validation as V
from ..registry import Transform, decode_options, encode_options, get_transform
from . import _autograd, engine
from .linear_ce import linear_cross_entropy

# Autograd through a transform keeps several chunk-sized intermediates alive: bound each step.
_SUB_BLOCK_BYTES = {"cpu": 4 << 20, "other": 256 << 20}


def _check_rows(name: str, out, n: int) -> Tensor:
    if not isinstance(out, Tensor) or out.shape != (n,):
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"transform {name!r} must return a per-row loss of shape [{n}] for a chunk of {n} rows, got {shape}"
        )
    if not out.is_floating_point():
        raise ValueError(f"transform {name!r} must return a floating tensor, got {out.dtype}")
    return out


def _transform_chunks(
    x2d,
    weight,
    t1d,
    bias,
    extras2d,
    upstream: Tensor | None,
    need,
    *,
    tf: Transform,
    options: dict,
    ignore_index,
    softcap,
    logit_scale,
    chunk_size,
):
    """Per-row losses; with ``upstream``, gradients for input/weight/bias/extras as ``need`` says."""
    n = x2d.shape[0]
    cdt = engine.compute_dtype(x2d.dtype)
    loss_rows = torch.zeros(n, dtype=cdt, device=x2d.device)
    need_extra = list(need[3:])
    gextras = [
        torch.zeros(e.shape, dtype=e.dtype, device=e.device) if ne else None for e, ne in zip(extras2d, need_extra)
    ]
    diff = [i for i, ne in enumerate(need_extra) if ne]

    def head(z: Tensor, sel):
        t = t1d[sel].long()
        valid = t != ignore_index
        safe = torch.where(valid, t, 0)
        rows = [e[sel] for e in extras2d]
        n_rows = z.shape[0]
        if upstream is None:
            out = _check_rows(tf.name, tf.fn(z, safe, *rows, **options), n_rows)
            loss_rows[sel] = torch.where(valid, out, 0.0)
            return None

        coef = engine.row_coef(upstream, sel, valid)
        with _autograd.autograd_inside_kernel():
            leaves = [z.detach().requires_grad_(True)] + [rows[i].detach().requires_grad_(True) for i in diff]
            args = list(rows)
            for i, leaf in zip(diff, leaves[1:]):
                args[i] = leaf
            out = _check_rows(tf.name, tf.fn(leaves[0], safe, *args, **options), n_rows)
            grads = (
                torch.autograd.grad(out, leaves, coef.to(out.dtype), allow_unused=True)
                if out.requires_grad
                else [None] * len(leaves)
            )  # a transform constant in its inputs
        grads = [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves)]
        out = out.detach()
        loss_rows[sel] = torch.where(valid, out, 0.0)
        for i, g in zip(diff, grads[1:]):
            gextras[i][sel] = g
        return grads[0]

    sub = _SUB_BLOCK_BYTES["cpu" if x2d.device.type == "cpu" else "other"]
    live = None  # a NaN/inf extra on an ignored row reaches the reference's gradient (0 * inf): compute it
    if all(bool(e.isfinite().all()) for e in extras2d if e.is_floating_point()):
        live = engine.live_rows(x2d, weight, bias, t1d != ignore_index, logit_scale)
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
        sub_block_bytes=sub,
        rows=live,
    )
    return loss_rows, gx, gw, gb, gextras


def _outputs(gx, gw, gb, gextras, input, weight, bias, extras):
    return (
        *engine.grads_out(gx, gw, gb, input, weight, bias),
        [engine.placeholder(input) if g is None else g.view(e.shape) for g, e in zip(gextras, extras)],
    )


def _check_all(
    input,
    weight,
    target,
    bias,
    extras,
    num_items,
    transform,
    options,
    reduction,
    softcap,
    logit_scale,
    chunk_size,
    grad_mask,
):
    V.check_linear_transform(
        input, weight, target, bias, extras, num_items, reduction, softcap, logit_scale, chunk_size
    )
    get_transform(transform)
    if len(grad_mask) != 3 + len(extras):
        raise ValueError(f"grad_mask must have 3 + len(extras) = {3 + len(extras)} entries, got {len(grad_mask)}")


@torch.library.custom_op("memops::linear_transform", mutates_args=())
def linear_transform(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None,
    extras: list[Tensor],
    num_items: Tensor | None,
    transform: str,
    options: str,
    ignore_index: int,
    reduction: str,
    softcap: float | None,
    logit_scale: float,
    chunk_size: int,
    grad_mask: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, list[Tensor]]:
    _check_all(
        input,
        weight,
        target,
        bias,
        extras,
        num_items,
        transform,
        options,
        reduction,
        softcap,
        logit_scale,
        chunk_size,
        grad_mask,
    )
    V.check_target_range(target, weight.shape[0], ignore_index)
    x2d, t1d, e2d = engine.flatten(input, target, extras)
    cdt = engine.compute_dtype(input.dtype)
    valid = t1d != ignore_index
    up, need = None, [False] * len(grad_mask)
    if reduction != "none" and any(grad_mask):
        need, up = list(grad_mask), engine.upstream(None, reduction, valid, num_items, cdt)
    loss_rows, gx, gw, gb, gex = _transform_chunks(
        x2d,
        weight,
        t1d,
        bias,
        e2d,
        up,
        need,
        tf=get_transform(transform),
        options=decode_options(options),
        ignore_index=ignore_index,
        softcap=softcap,
        logit_scale=logit_scale,
        chunk_size=chunk_size,
    )
    loss = engine.reduce_rows(loss_rows, reduction, valid, num_items, target.shape)
    return (loss, *_outputs(gx, gw, gb, gex, input, weight, bias, extras))


@torch.library.custom_op("memops::linear_transform_backward", mutates_args=())
def linear_transform_backward(
    grad_loss: Tensor,
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None,
    extras: list[Tensor],
    num_items: Tensor | None,
    saved_grad_input: Tensor,
    saved_grad_weight: Tensor,
    saved_grad_bias: Tensor,
    saved_grad_extras: list[Tensor],
    transform: str,
    options: str,
    ignore_index: int,
    reduction: str,
    softcap: float | None,
    logit_scale: float,
    chunk_size: int,
    need: list[bool],
    have: list[bool],
) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """Gradients of ``linear_transform``'s loss: scale what the forward computed, recompute the rest."""
    _check_all(
        input,
        weight,
        target,
        bias,
        extras,
        num_items,
        transform,
        options,
        reduction,
        softcap,
        logit_scale,
        chunk_size,
        need,
    )
    cdt = engine.compute_dtype(input.dtype)
    saved = [saved_grad_input, saved_grad_weight, saved_grad_bias, *saved_grad_extras]
    out, missing = engine.scale_saved(grad_loss, saved, need, have, cdt)
    if any(missing):
        x2d, t1d, e2d = engine.flatten(input, target, extras)
        up = engine.upstream(grad_loss, reduction, t1d != ignore_index, num_items, cdt)
        _, gx, gw, gb, gex = _transform_chunks(
            x2d,
            weight,
            t1d,
            bias,
            e2d,
            up,
            missing,
            tf=get_transform(transform),
            options=decode_options(options),
            ignore_index=ignore_index,
            softcap=softcap,
            logit_scale=logit_scale,
            chunk_size=chunk_size,
        )
        fresh = _outputs(gx, gw, gb, gex, input, weight, bias, extras)
        out = [f if m else o for o, f, m in zip(out, [*fresh[:3], *fresh[3]], missing)]
    out = [engine.placeholder(input) if o is None else o for o in out]
    return out[0], out[1], out[2], out[3:]


def _setup_context(ctx, inputs, output):
    (
        input,
        weight,
        target,
        bias,
        extras,
        num_items,
        transform,
        options,
        ignore_index,
        reduction,
        softcap,
        logit_scale,
        chunk_size,
        grad_mask,
    ) = inputs
    _, gx, gw, gb, gex = output
    ctx.save_for_backward(input, weight, target, bias, num_items, *extras)
    ctx.n_extras = len(extras)
    ctx.options = (transform, options, ignore_index, reduction, softcap, logit_scale, chunk_size)
    _autograd.setup(ctx, (gx, gw, gb, *gex), [reduction != "none" and bool(m) for m in grad_mask], ())


def _backward(ctx, grad_loss, _ggx, _ggw, _ggb, _ggex):
    input, weight, target, bias, num_items, *extras = ctx.saved_tensors
    needs = ctx.needs_input_grad
    extra_needs = list(needs[4]) if isinstance(needs[4], (list, tuple)) else [bool(needs[4])] * ctx.n_extras
    need = [needs[0], needs[1], bias is not None and needs[3], *extra_needs]
    nones = (None,) * 9
    if grad_loss is None or not any(need):
        return (None, None, None, None, [None] * ctx.n_extras) + nones
    grads = _autograd.take_precomputed(ctx, grad_loss, need)
    if grads is None:
        have, saved = _autograd.for_backward_op(ctx, input)
        dx, dw, db, dex = torch.ops.memops.linear_transform_backward(
            grad_loss,
            input,
            weight,
            target,
            bias,
            extras,
            num_items,
            saved[0],
            saved[1],
            saved[2],
            list(saved[3:]),
            *ctx.options,
            need,
            have,
        )
        grads = (dx, dw, db, *dex)
    grads = [g if n else None for g, n in zip(grads, need)]
    return (grads[0], grads[1], None, grads[2], grads[3:]) + nones


torch.library.register_autograd("memops::linear_transform", _backward, setup_context=_setup_context)


def linear_loss(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    transform: str,
    bias: Tensor | None = None,
    *,
    extras: Sequence[Tensor] = (),
    reduction: str = "mean",
    ignore_index: int = -100,
    num_items: int | float | Tensor | None = None,
    chunk_size: int | None = None,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    **options,
) -> Tensor:
    """Loss ``transform`` of the logits ``logit_scale * (input @ weight.T + bias)``, chunk by chunk.

    Equals, up to rounding, ``fn(logits, target, *extras, **options)`` on the full
    fp32 logits (soft-capped when ``softcap`` is set) with rows whose target is
    ``ignore_index`` zeroed, then reduced: ``"mean"`` over the non-ignored rows
    (or divided by ``num_items``), ``"sum"``, or ``"none"`` (shaped like ``target``).
    Gradients flow to input, weight, bias and every extra that requires grad.
    """
    extras = tuple(extras)
    if transform == "cross_entropy" and not extras and set(options) <= {"label_smoothing"}:
        # the hand-written fused head computes the same thing with less elementwise work
        return linear_cross_entropy(
            input,
            weight,
            target,
            bias,
            ignore_index=ignore_index,
            reduction=reduction,
            num_items=num_items,
            chunk_size=chunk_size,
            softcap=softcap,
            logit_scale=logit_scale,
            **options,
        )
    num_items, chunk_size = V.as_num_items(num_items), V.as_chunk_size(chunk_size)
    V.check_options(transform, options)
    V.check_linear_transform(
        input, weight, target, bias, extras, num_items, reduction, softcap, logit_scale, chunk_size
    )
    get_transform(transform)
    mask = _autograd.grad_mask(input, weight, bias, *extras)
    loss, *_ = torch.ops.memops.linear_transform(
        input,
        weight,
        target,
        bias,
        list(extras),
        num_items,
        transform,
        encode_options(options),
        int(ignore_index),
        reduction,
        None if softcap is None else float(softcap),
        float(logit_scale),
        chunk_size,
        mask,
    )
    _autograd.donate(loss)
    return loss
