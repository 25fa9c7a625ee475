"""``memops.nn.functional.linear_cross_entropy``: a drop-in for ``torch.nn.functional.linear_cross_entropy``
(torch >= 2.13), chunked by memops on every path.

Same signature and defaults as torch 2.13's (``tests/test_drop_in.py`` compares them with the installed
torch's), same semantics: class-index or probability targets, per-class ``weight``, ``ignore_index``
(``None`` means -100 for class indices; not allowed with probabilities), ``label_smoothing``, unbatched
``input [in_features]``, K-dimensional losses (``linear_weight [C, d_1, ..., d_K, in_features]``), and
torch's error messages for the inputs it refuses.  ``options`` (``torch.nn.LinearCrossEntropyOptions``):
``batch_chunk_size`` becomes memops' ``chunk_size``; ``acc_policy="accurate"`` becomes memops'
``precision="accurate"`` (the logits kept in fp32 from the GEMM; any other policy: the global precision,
``memops.set_precision``); ``chunking_method``, ``acc_dtype`` and ``allow_retain_graph`` are accepted and
ignored (memops always accumulates in fp32, sizes chunks itself, and a second backward recomputes).
``options=None`` is chunked too (memops is exact, so there is no reference path to fall back to).  The
loss has ``input``'s dtype, as torch's.  Gradients: input, linear weight and bias, and a probability
target; none to ``weight`` (class weights): one that requires grad is refused.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, cast

import torch
from torch import Tensor

from ..ops.linear_ce import linear_cross_entropy as _memops_ce

__all__ = ["linear_cross_entropy"]


class DropInError(ValueError, RuntimeError):
    """Bad input to the drop-in: a ``RuntimeError`` as torch raises, and memops' ``ValueError``."""


def _fail(msg: str):
    raise DropInError(msg)


def _check(input, linear_weight, target, linear_bias, weight, ignore_index):
    for name, t in (("input", input), ("linear_weight", linear_weight), ("target", target)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if input.dim() not in (1, 2):
        _fail(f"expected input with dimensionality 1 or 2, got {input.dim()}")
    if linear_weight.dim() < 2:
        _fail(f"expected linear_weight with dimensionality at least 2, got {linear_weight.dim()}")
    if input.shape[-1] != linear_weight.shape[-1]:
        _fail(
            "expected equal input and linear_weight last dimensions (in_features), got "
            f"{input.shape[-1]} and {linear_weight.shape[-1]}, respectively"
        )
    if target.is_floating_point() and ignore_index is not None:
        _fail("ignore_index cannot be specified when target contains probabilities")
    if linear_weight.dim() > 2 and input.dim() != 2:
        _fail(
            f"K-dimensional loss defined by linear_weight shape {tuple(linear_weight.shape)} requires batched "
            f"input, (N, {input.shape[-1]}), got unbatched input with shape {tuple(input.shape)}"
        )
    if linear_bias is not None and tuple(linear_bias.shape) != tuple(linear_weight.shape[:-1]):
        _fail(f"expected linear_bias shape {tuple(linear_weight.shape[:-1])}, got {tuple(linear_bias.shape)}")
    if weight is not None and tuple(weight.shape) != (linear_weight.shape[0],):
        _fail(f"expected weight shape to be {(linear_weight.shape[0],)}, got {tuple(weight.shape)}")
    # F.cross_entropy's two target rules, in its order: a target shaped like the logits holds probabilities (a
    # float dtype), any other is class indices whose batch size is the input's
    logits_shape = (*input.shape[:-1], *linear_weight.shape[:-1])
    if tuple(target.shape) == logits_shape:
        if not target.is_floating_point():
            name = _SCALAR_NAMES.get(target.dtype, str(target.dtype))
            _fail(f"Expected floating point type for target with class probabilities, got {name}")
    elif input.dim() == 2 and target.dim() >= 1 and target.shape[0] != input.shape[0]:
        _fail(f"Expected input batch_size ({input.shape[0]}) to match target batch_size ({target.shape[0]}).")


# torch's names of the integer dtypes in its messages (c10::ScalarType)
_SCALAR_NAMES = {
    torch.int64: "Long",
    torch.int32: "Int",
    torch.int16: "Short",
    torch.int8: "Char",
    torch.uint8: "Byte",
    torch.bool: "Bool",
}


def _chunk_size(options) -> int | None:
    return None if options is None else getattr(options, "batch_chunk_size", None)


def _precision(options) -> str | None:
    return "accurate" if getattr(options, "acc_policy", None) == "accurate" else None


def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    weight: Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    options=None,
) -> Tensor:
    """``F.cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...)`` without the logits; see
    the module docstring for what ``options`` means here."""
    _check(input, linear_weight, target, linear_bias, weight, ignore_index)
    probs = target.is_floating_point()
    ignore = -100 if ignore_index is None else ignore_index
    common: dict[str, Any] = dict(
        class_weight=weight,
        ignore_index=ignore,
        label_smoothing=label_smoothing,
        chunk_size=_chunk_size(options),
        precision=_precision(options),
    )
    if linear_weight.dim() == 2:
        unbatched = input.dim() == 1
        x = input.unsqueeze(0) if unbatched else input
        t = target.unsqueeze(0) if unbatched else target
        loss = cast(Tensor, _memops_ce(x, linear_weight, t, linear_bias, reduction=reduction, **common))
        if unbatched and reduction == "none":
            loss = loss.squeeze(0)
        return loss.to(input.dtype)
    return _k_dimensional(input, linear_weight, target, linear_bias, reduction, probs, common).to(input.dtype)


class _Fanout(torch.autograd.Function):
    """``k`` uses of ``x`` whose gradients are summed in fp32 and rounded to ``x``'s dtype once: autograd would
    add the uses' low-precision gradients in that dtype, one rounding per use (the K-dimensional drop-in makes
    one call per position)."""

    @staticmethod
    def forward(ctx, x, k):
        ctx.dtype = x.dtype
        return tuple(x.view_as(x) for _ in range(k))

    @staticmethod
    def backward(ctx, *grads):
        total = None
        for g in grads:
            if g is not None:
                total = g.float() if total is None else total.add_(g)
        return (None if total is None else total.to(ctx.dtype)), None


def _k_dimensional(input, linear_weight, target, linear_bias, reduction, probs, common):
    """``linear_weight [C, d_1..d_K, D]``: one memops call per position ``j`` of ``d_1..d_K`` (its weight the
    ``[C, D]`` slice ``linear_weight[:, j]``, a view), reduced together: ``"mean"`` divides every call by
    the one divisor of the whole loss (torch's: the targets' class-weight sum, the non-ignored count, or
    for probabilities ``N * d_1 * ... * d_K``)."""
    out = tuple(linear_weight.shape[1:-1])
    n = input.shape[0]
    positions = list(itertools.product(*(range(k) for k in out)))

    def at(j):
        t = target[(slice(None), slice(None), *j)] if probs else target[(slice(None), *j)]
        b = None if linear_bias is None else linear_bias[(slice(None), *j)]
        return linear_weight[(slice(None), *j)], t, b

    kw = dict(common)
    if reduction == "mean":
        if probs:
            den = torch.tensor(float(n * math.prod(out)), dtype=torch.float64)
        else:
            valid = target != kw["ignore_index"]
            cw = kw["class_weight"]
            if cw is None:
                den = valid.sum()
            else:
                den = torch.where(valid, cw[torch.where(valid, target, 0)], 0).sum(dtype=torch.float64)
        kw["num_items"] = den
    parts = []
    uses = [input] * len(positions)
    if input.dtype in (torch.float16, torch.bfloat16) and input.requires_grad and torch.is_grad_enabled():
        uses = list(_Fanout.apply(input, len(positions)))  # the positions' input gradients summed in fp32
    for j, x in zip(positions, uses):
        w, t, b = at(j)
        parts.append(_memops_ce(x, w, t, b, reduction=reduction, **kw))
    if reduction == "none":
        return torch.stack(parts, dim=-1).reshape(n, *out)
    return torch.stack(parts).sum(dtype=torch.float64).to(parts[0].dtype)
