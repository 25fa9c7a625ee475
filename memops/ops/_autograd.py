"""Autograd plumbing shared by the op families whose forward can also return gradients.

A forward op returns ``(outputs..., *grads)``: when a scalar loss is trained, the
gradients of the loss with respect to every input that needs one, computed in
the same chunk pass.  Backward multiplies them by the incoming gradient.  When a
Python front end (``memops.linear_cross_entropy`` and the like) made the call, it
*donates* those tensors (:func:`donate`): in plain eager mode backward hands them
to autograd directly, scaled in place, so no second gradient-sized buffer exists.
Everywhere else (a direct ``torch.ops.memops.*`` call, tracing, a second backward
through the same graph) the family's backward op scales them into new tensors: an
op's outputs never change after it returned.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import Tensor

from ..rules import placeholder


def plain_eager(t: Tensor) -> bool:
    """True outside torch.compile / export / make_fx tracing and any dispatch mode."""
    return type(t) is torch.Tensor and not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0


def grad_mask(*tensors) -> list[bool]:
    """Which op inputs will need a gradient: grad mode on and the tensor requires grad."""
    on = torch.is_grad_enabled()
    return [on and t is not None and t.requires_grad for t in tensors]


def setup(ctx, grads: Sequence[Tensor], have: Sequence[bool], non_differentiable: Sequence[Tensor]) -> None:
    """Record the forward's gradients (``have[i]``: grads[i] holds a real gradient)."""
    ctx.mark_non_differentiable(*non_differentiable, *grads)
    ctx.set_materialize_grads(False)  # no zero-filled "gradients" for the gradient outputs
    # An attribute, not saved: eager backward hands these tensors over (see take_precomputed).
    ctx.grads = tuple(grads)
    ctx.have = list(have)
    ctx.consumed = False
    ctx.donated = False


def donate(output: Tensor) -> None:
    """For the Python front ends only, right after the op call: the caller never sees the op's gradient
    outputs, so backward may hand them to autograd scaled in place (:func:`take_precomputed`)."""
    if plain_eager(output) and output.grad_fn is not None:
        output.grad_fn.donated = True  # the autograd node is the op's ``ctx``


def take_precomputed(ctx, grad_loss: Tensor, need: Sequence[bool]) -> tuple | None:
    """Eager fast path for donated gradients (:func:`donate`): the forward's, scaled by ``grad_loss`` in
    place, or None.

    The context's reference is dropped so autograd can take the tensors as
    ``.grad`` without a copy; a later backward through the same graph
    (``retain_graph=True``) gets None and recomputes.
    """
    if not (
        ctx.donated and not ctx.consumed and plain_eager(grad_loss) and all(h for h, n in zip(ctx.have, need) if n)
    ):
        return None
    ctx.consumed = True
    grads, ctx.grads = ctx.grads, None
    if not bool(grad_loss == 1):
        for g, n in zip(grads, need):
            if n:
                g.mul_(grad_loss)
    return tuple(g if n else None for g, n in zip(grads, need))


def for_backward_op(ctx, empty: Tensor) -> tuple[list[bool], tuple]:
    """``(have, saved grads)`` to pass to the backward op (nothing usable once consumed)."""
    if ctx.consumed:
        return [False] * len(ctx.have), tuple(placeholder(empty) for _ in ctx.have)
    return list(ctx.have), ctx.grads


def backward_grads(ctx, grad_loss: Tensor, need: Sequence[bool], backward_op, tensors: Sequence) -> list:
    """The gradients ``need`` asks for (None elsewhere): the forward's, scaled (eager fast path), or from
    ``backward_op(grad_loss, *tensors, *saved_grads, *ctx.options, need, have)``."""
    grads = take_precomputed(ctx, grad_loss, need)
    if grads is None:
        have, saved = for_backward_op(ctx, tensors[0])
        grads = backward_op(grad_loss, *tensors, *saved, *ctx.options, need, have)
    return [g if n else None for g, n in zip(grads, need)]


_AUTOGRAD_KEYS = ("AutogradCPU", "AutogradCUDA", "AutogradOther", "ADInplaceOrView")


@contextlib.contextmanager
def autograd_inside_kernel():
    """Grad mode with autograd dispatch turned back on inside a custom op's kernel.

    A custom op's real kernel runs below the autograd dispatch keys, so tensors
    made there do not record a graph.  Chunk heads that derive their gradient
    with ``torch.autograd.grad`` run under this context instead.
    """
    keys = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for name in _AUTOGRAD_KEYS:
        exclude = exclude.remove(getattr(keys, name))
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        yield
