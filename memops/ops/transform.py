"""``memops::linear_transform``: any per-token loss written in plain PyTorch, through the chunk engine.

A *transform* is a function ``fn(logits, target, *extras, **options) -> [n]``:
``logits`` is one fp32 (fp64 for fp64 inputs) chunk ``[n, V]`` of the final
logits, ``target`` the chunk's ``[n]`` int64 targets, each extra the chunk's rows
of a per-token tensor.  Rows whose target is ``ignore_index`` are normally not
passed at all (``ops/plan.py``); where they must be, they carry target 0
and their result is discarded.
It is registered by name with :func:`transform`; the op takes the name and
the options (encoded as a string) so it traces and exports like any op.
Gradients come from ``torch.autograd.grad`` applied to ``fn`` one sub-block at a
time; nobody writes a derivative.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor

from .. import config, validation
from ..contract import Args
from ..meta.transform import SPEC, check_transform_options
from ..registry import decode_options, encode_options, get_transform
from . import engine, family, plan
from .linear_ce import linear_cross_entropy
from .torch_private import autograd_inside_kernel

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


def chunks(x2d, t1d, e2d, upstream: Tensor | None, need, a: Args):
    """Per-row losses; with ``upstream``, gradients for input/weight/bias/extras as ``need`` says."""
    tf, options, ignore = get_transform(a.transform), decode_options(a.options), a.ignore_index
    n = x2d.shape[0]
    cdt = engine.compute_dtype(x2d.dtype)
    outs = engine.RowOutputs(n, cdt, x2d.device, zeroed=("loss",))
    need_extra = list(need[3:])
    gextras: list[Any] = [
        torch.zeros(e.shape, dtype=e.dtype, device=e.device) if ne else None for e, ne in zip(e2d, need_extra)
    ]
    diff = [i for i, ne in enumerate(need_extra) if ne]

    def head(z: Tensor, sel):
        t = t1d[sel].long()
        valid = t != ignore
        safe = torch.where(valid, t, 0)
        rows = [e[sel] for e in e2d]
        n_rows = z.shape[0]
        if upstream is None:
            out = _check_rows(tf.name, tf.fn(z, safe, *rows, **options), n_rows)
            outs.put("loss", sel, torch.where(valid, out, 0.0))
            return None

        coef = engine.row_coef(upstream, sel, valid)
        with autograd_inside_kernel():
            leaves = [z.detach().requires_grad_(True)] + [rows[i].detach().requires_grad_(True) for i in diff]
            args = list(rows)
            for i, leaf in zip(diff, leaves[1:]):
                args[i] = leaf
            out = _check_rows(tf.name, tf.fn(leaves[0], safe, *args, **options), n_rows)
            raw = (
                torch.autograd.grad(out, leaves, coef.to(out.dtype), allow_unused=True)
                if out.requires_grad
                else [None] * len(leaves)
            )  # a transform constant in its inputs
        grads = [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(raw, leaves)]
        out = out.detach()
        outs.put("loss", sel, torch.where(valid, out, 0.0))
        for i, g in zip(diff, grads[1:]):
            gextras[i][sel] = g
        return grads[0]

    # ignored rows reach nothing; a NaN/inf extra on one reaches the reference's gradient (0 * inf)
    rows = plan.plan(x2d, a.weight, a.bias, a.logit_scale, needed=t1d != ignore, finite=tuple(e2d)).full
    gx, gw, gb = engine.run(
        x2d,
        a.weight,
        a.bias,
        head,
        logit_scale=a.logit_scale,
        softcap=a.softcap,
        chunk_size=a.chunk_size,
        grad_input=need[0],
        grad_weight=need[1],
        grad_bias=need[2] and a.bias is not None,
        sub_block_bytes=_SUB_BLOCK_BYTES["cpu" if x2d.device.type == "cpu" else "other"],
        rows=rows,
        accurate=a.precision == "accurate",
    )
    return outs["loss"], [*engine.grads_out(gx, gw, gb, a.input, a.weight, a.bias), *gextras]


def forward(a: Args, need: list) -> tuple:
    validation.check_target_range(a.target, a.weight.shape[0], a.ignore_index)
    x2d, t1d, e2d = engine.flatten(a.input, a.target, a.extras)
    valid = t1d != a.ignore_index
    cdt = engine.compute_dtype(a.input.dtype)
    up = engine.upstream(None, a.reduction, valid, a.num_items, cdt) if any(need) else None
    loss_rows, grads = chunks(x2d, t1d, e2d, up, need, a)
    loss = engine.reduce_rows(loss_rows, a.reduction, valid, a.num_items, a.target.shape)
    return (loss,), _extras_shaped(grads, a)


def gradients(a: Args, grad_outputs: list, need: list) -> list:
    x2d, t1d, e2d = engine.flatten(a.input, a.target, a.extras)
    cdt = engine.compute_dtype(a.input.dtype)
    up = engine.upstream(grad_outputs[0], a.reduction, t1d != a.ignore_index, a.num_items, cdt)
    _, grads = chunks(x2d, t1d, e2d, up, need, a)
    return _extras_shaped(grads, a)


def _extras_shaped(grads: list, a: Args) -> list:
    return grads[:3] + [None if g is None else g.view(e.shape) for g, e in zip(grads[3:], a.extras)]


family.implement(SPEC, forward, gradients)


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
    precision: str | None = None,
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
        return cast(
            Tensor,
            linear_cross_entropy(
                input,
                weight,
                target,
                bias,
                ignore_index=ignore_index,
                reduction=reduction,
                num_items=num_items,
                chunk_size=chunk_size,
                precision=precision,
                softcap=softcap,
                logit_scale=logit_scale,
                **options,
            ),
        )
    check_transform_options(transform, options)
    loss, _ = SPEC.call(
        input=input,
        weight=weight,
        target=target,
        bias=bias,
        extras=list(extras),
        num_items=num_items,
        transform=transform,
        options=encode_options(options),
        ignore_index=ignore_index,
        reduction=reduction,
        softcap=softcap,
        logit_scale=logit_scale,
        chunk_size=chunk_size,
        precision=config.precision_of(precision),
    )
    family.donate(loss)
    return loss
