"""The kernel side of the op-family contract (``memops/contract.py``): real kernels, autograd and the one
shared backward, for every family, from its :class:`~memops.contract.Spec` and two functions.

A forward op returns ``(outputs..., grads)``: when a scalar loss is trained, the
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

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .. import config
from ..contract import LIB, Args, Spec
from ..rules import compute_dtype, placeholder
from . import torch_private
from .torch_private import plain_eager


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
        output.grad_fn.donated = True  # type: ignore[attr-defined]  # the autograd node is the op's ``ctx``


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
    # multiplying by 1 is exact; sync-free, the check (a device-to-host read) is skipped
    if config.is_sync_free(grad_loss) or grad_loss.item() != 1:
        for g, n in zip(grads, need):
            if n:
                g.mul_(grad_loss)
    return tuple(g if n else None for g, n in zip(grads, need))


def for_backward_op(ctx, empty: Tensor) -> tuple[list[bool], tuple]:
    """``(have, saved grads)`` to pass to the backward op (nothing usable once consumed)."""
    if ctx.consumed:
        return [False] * len(ctx.have), tuple(placeholder(empty) for _ in ctx.have)
    return list(ctx.have), ctx.grads


# forward(a, need) -> (outputs, grads): the family's outputs and, where ``need`` says, the gradients of its
# scalar loss (None elsewhere).  gradients(a, grad_outputs, need) -> grads: recomputed for the incoming
# gradients of the differentiable outputs (None where not needed).
Forward = Callable[[Args, list], tuple]
Gradients = Callable[[Args, list, list], list]


def _flat(tensors: Sequence) -> tuple[list, list]:
    """Tensors to save (``Tensor[]`` inputs spread out) and, per input, its list length or None."""
    flat: list = []
    layout: list[int | None] = []
    for t in tensors:
        if isinstance(t, (list, tuple)):
            flat.extend(t)
            layout.append(len(t))
        else:
            flat.append(t)
            layout.append(None)
    return flat, layout


def _unflat(flat: Sequence, layout: Sequence) -> list:
    out, k = [], 0
    for n in layout:
        out.append(flat[k] if n is None else list(flat[k : k + n]))
        k += 1 if n is None else n
    return out


# op name -> (forward, gradients), for tests that run a family's kernel code directly (``tests/test_plan.py``)
KERNELS: dict[str, tuple[Forward, Gradients]] = {}
# op name (forward and backward op) -> its real kernel, as registered: a test's dispatch mode that watches
# every tensor op a call makes (``tests/helpers.py: Syncs``) runs it in place of the op
IMPLS: dict[str, Callable] = {}


def implement(spec: Spec, forward: Forward, gradients: Gradients) -> None:
    """Register ``spec``'s real kernels (forward and backward op, any device) and its autograd."""
    KERNELS[spec.name] = (forward, gradients)

    def kernel(*args):
        a = spec.bind(args)
        spec.validate(a)
        if torch_private.PATH == "public":
            torch_private.refuse_transforms(spec.qualname)
        need = spec.forward_mask(a) if spec.forward_grads else []
        outs, grads = forward(a, need)
        if not spec.forward_grads:
            return tuple(outs)
        return (*outs, [placeholder(a.input) if g is None else g for g in grads])

    def backward_kernel(grad_outputs, *args):
        """Scale what the forward computed by the incoming gradient, recompute what it did not."""
        a = spec.bind(args, backward=True)
        spec.validate(a)
        need = [bool(n) for n in a.need]
        have = [bool(h) for h in a.have] or [False] * len(need)
        cdt = compute_dtype(a.input.dtype)
        out = [
            (s * grad_outputs[0].to(cdt)).to(s.dtype) if (n and h) else None
            for s, n, h in zip(a.saved or [None] * len(need), need, have)
        ]
        missing = [n and not h for n, h in zip(need, have)]
        if any(missing):
            fresh = gradients(a, list(grad_outputs), missing)
            out = [f if m else o for o, f, m in zip(out, fresh, missing)]
        return [placeholder(a.input) if o is None else o for o in out]

    IMPLS[spec.name], IMPLS[spec.backward_name] = kernel, backward_kernel
    for name in (spec.name, spec.backward_name):
        torch.library.register_vmap(f"memops::{name}", _vmap_rule(getattr(torch.ops.memops, name)), lib=LIB)
        LIB.impl(name, _legacy_vmap_refusal(f"memops::{name}"), "Batched")
    torch.library.impl(spec.qualname, "CompositeExplicitAutograd", kernel, lib=LIB)
    torch.library.impl(f"memops::{spec.backward_name}", "CompositeExplicitAutograd", backward_kernel, lib=LIB)

    n_inputs, n_options, n_outputs = len(spec.inputs), len(spec.options), len(spec.outputs)
    diff = [k for k, name in enumerate(spec.outputs) if name in spec.differentiable]

    def setup_context(ctx, inputs, output, flat, layout):
        """``flat`` / ``layout``: the inputs' tensors spread out, as :func:`_flat` gives them."""
        a = spec.bind(inputs)
        ctx.sync_free = config.is_sync_free(a.input)  # its backward too
        ctx.layout = layout
        ctx.save_for_backward(*flat)
        if torch_private.dual_level_open():  # a dual level is open: forward-mode AD may ask (forward_tangents)
            ctx.save_for_forward(*flat)
        ctx.options = list(inputs[n_inputs : n_inputs + n_options])
        live = spec.live(a)
        fixed = [o for k, o in enumerate(output[:n_outputs]) if k not in live]
        if spec.forward_grads:
            setup(ctx, output[n_outputs], spec.forward_mask(a), fixed)
        else:
            setup(ctx, (), (), fixed)

    def backward(ctx, *grad_outputs):
        tensors = _unflat(ctx.saved_tensors, ctx.layout)
        need, where = [], []  # per gradient slot: wanted?  and its input's position
        for k, (i, t) in enumerate(zip(spec.inputs, tensors)):
            if not i.grad:
                continue
            wants = ctx.needs_input_grad[k]
            if i.kind == "Tensor[]":
                wants = list(wants) if isinstance(wants, (list, tuple)) else [bool(wants)] * len(t)
                need += [bool(w) for w in wants]
                where += [k] * len(t)
            else:
                need.append(bool(wants) and t is not None)
                where.append(k)
        result = [[None] * len(t) if isinstance(t, list) else None for t in tensors]
        result += [None] * (len(ctx.options) + (1 if spec.forward_grads else 0))
        incoming = [grad_outputs[k] for k in diff]
        if all(g is None for g in incoming) or not any(need):
            return tuple(result)
        grads = take_precomputed(ctx, incoming[0], need) if spec.forward_grads else None
        if grads is None:
            have, saved = for_backward_op(ctx, tensors[0])
            grads = spec.backward_op()(incoming, *tensors, list(saved), *ctx.options, need, have)
        slot_of = {}
        for g, n, k in zip(grads, need, where):
            g = g if n else None
            if isinstance(result[k], list):
                j = slot_of.get(k, 0)
                result[k][j] = g
                slot_of[k] = j + 1
            else:
                result[k] = g
        return tuple(result)

    no_grad = [k for k, i in enumerate(spec.inputs) if i.refuse_grad]

    def refuse_requires_grad(args):
        for k in no_grad:
            if args[k] is not None and args[k].requires_grad and torch.is_grad_enabled():
                raise ValueError(
                    f"{spec.qualname}: {spec.inputs[k].name} requires grad, but memops computes no gradient "
                    f"for it; pass {spec.inputs[k].name}.detach()"
                )

    def checked_backward(ctx, *grad_outputs):
        refuse_higher_order(spec, ctx, grad_outputs)
        with config.backward_like(ctx.sync_free):
            return backward(ctx, *grad_outputs)

    torch_private.register_autograd(
        spec,
        kernel,
        setup_context,
        checked_backward,
        lambda ctx, tangents: forward_tangents(spec, ctx, tangents),
        refuse_requires_grad,
        _flat,
        _unflat,
    )


class ForwardADError(NotImplementedError):
    """Forward-mode AD through a memops op that has no forward derivative for this call."""


def forward_tangents(spec: Spec, ctx, tangents: Sequence) -> tuple:
    """Forward-mode AD of a memops op (``autograd.Function.jvp``): the tangent of each output.

    A scalar loss's tangent is ``sum_k <d loss / d p_k, dp_k>`` over the inputs ``p_k`` with a tangent,
    exactly: the gradients come from the family's backward op (one more chunk pass, the forward's three
    matmuls, with an incoming gradient of 1), so every family has it.  A per-token output
    (``reduction="none"``, log-probs, ...) would need each chunk's tangent logits, which memops does not
    compute: refused, as is a tangent on an input that has no derivative (targets, advantages, class
    weights, ...) -- never a silent zero tangent.
    """
    layout = ctx.layout
    tensors = _unflat(ctx.saved_tensors, layout)
    per_input = _unflat(tangents, layout)
    a = spec.bind([*tensors, *ctx.rest])
    for i, tan in zip(spec.inputs, per_input):
        given = any(x is not None for x in tan) if isinstance(tan, list) else tan is not None
        if given and not i.grad:
            raise ForwardADError(
                f"{spec.qualname}: forward-mode AD: {i.name!r} has a tangent, but memops computes no derivative "
                "with respect to it; pass it without one (detach it from the dual level)"
            )
    diff = [k for k, name in enumerate(spec.outputs) if name in spec.differentiable]
    live = spec.live(a)
    if not (spec.forward_grads and spec.scalar(a) and len(live) == 1):
        raise ForwardADError(
            f"{spec.qualname}: forward-mode AD (torch.func.jvp / jacfwd, torch.autograd.forward_ad) is implemented "
            "for scalar losses only (reduction='mean' / 'sum' / 'batchmean'); this call's "
            f"{', '.join(spec.outputs[k] for k in live)} output is per token: use reverse mode "
            "(torch.autograd.grad, torch.func.vjp / grad / jacrev)"
        )
    slots, tans = spec.grad_slots(a), []
    for i, tan in zip(spec.inputs, per_input):
        if i.grad:
            tans.extend(tan if isinstance(tan, list) else [tan])
    need = [t is not None and s is not None for s, t in zip(slots, tans)]
    cdt = compute_dtype(a.input.dtype)
    one = torch.ones((), dtype=cdt, device=a.input.device)
    incoming = [one if k == live[0] else None for k in diff]
    grads = spec.backward_op()(
        incoming, *tensors, [placeholder(a.input)] * len(slots), *ctx.options, need, [False] * len(slots)
    )
    total = torch.zeros((), dtype=cdt, device=a.input.device)
    for g, t, n in zip(grads, tans, need):
        if n:
            total = total + (g.to(cdt) * t.to(cdt)).sum()
    out: list[Tensor | None] = [None] * (len(spec.outputs) + (len(slots) if spec.forward_grads else 0))
    out[live[0]] = total
    return tuple(out)


class HigherOrderError(NotImplementedError):
    """A derivative of a memops op's gradient (``create_graph=True``, ``torch.func.hessian``, nested
    ``torch.func.grad`` / ``jacrev``)."""


def refuse_higher_order(spec: Spec, ctx, grad_outputs: Sequence) -> None:
    """Raise where the backward being run would itself be differentiated: memops' gradients carry no
    graph, and a silent zero second derivative is a wrong answer.  Eager: grad mode on in backward
    (``create_graph=True``) with an input that requires grad.  Under ``torch.func``:
    what backward reads is tracked by an enclosing grad level, or has a tangent (an enclosing jvp)."""
    functorch = torch_private.functorch_active()
    if not (functorch or torch.is_grad_enabled() or torch_private.dual_level_open()):
        return  # a plain backward (create_graph=False): nothing will differentiate it
    saved = ctx.saved_tensors
    nested = any(torch_private.grad_tracked(t) for t in (*saved, *grad_outputs)) or (
        torch.is_grad_enabled()
        and not functorch
        and any(isinstance(t, Tensor) and t.requires_grad and not torch_private.functorch_wrapped(t) for t in saved)
    )
    if nested or torch_private.has_tangent((*saved, *grad_outputs)):
        raise HigherOrderError(
            f"{spec.qualname}: higher-order derivatives (create_graph=True, torch.func.hessian, nested "
            "torch.func.grad / jacrev / jacfwd) are not implemented: memops' gradients carry no graph of their "
            "own; differentiate memops once, or use the unfused reference for second derivatives"
        )


def _legacy_vmap_refusal(qualname: str):
    """The kernel at the legacy ``Batched`` key (``torch.autograd.grad(..., is_grads_batched=True)``'s
    vmap, which has no Python batching rules): a clear error, not torch's generic one."""

    def refuse(*args):
        raise NotImplementedError(
            f"{qualname}: torch.autograd.grad(..., is_grads_batched=True) runs the legacy vmap, which takes no "
            "batching rule from Python; use torch.func.vmap over torch.func.vjp (memops ops have a batching rule "
            "there) or one backward per gradient"
        )

    return refuse


def _vmap_rule(op):
    """A batching rule for ``op`` (a memops forward or backward op): one call per batch element, the
    results stacked on dimension 0 -- the loop torch's own rules fall back to, so ``torch.func.vmap`` over
    the op and over its gradient (``vmap(grad(...))``, ``vmap`` of a ``vjp``) works, exactly."""

    def pick(value, dim, b):
        if isinstance(value, (list, tuple)) and isinstance(dim, (list, tuple)):
            return [pick(v, d, b) for v, d in zip(value, dim)]
        return value if dim is None else value.select(dim, b)

    def rule(info, in_dims, *args):
        results = [op(*(pick(v, d, b) for v, d in zip(args, in_dims))) for b in range(info.batch_size)]

        def stack(parts):
            if isinstance(parts[0], (list, tuple)):
                pairs = [stack([p[k] for p in parts]) for k in range(len(parts[0]))]
                return type(parts[0])(p[0] for p in pairs), type(parts[0])(p[1] for p in pairs)
            return torch.stack(parts), 0

        return stack(results)

    return rule
