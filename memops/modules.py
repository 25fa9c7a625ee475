"""``nn.Module`` front ends for code that prefers modules."""

from __future__ import annotations

import inspect
from typing import Any

from torch import Tensor, nn

from .meta.linear_ce import SPEC
from .ops.linear_ce import linear_cross_entropy

_PER_CALL = ("input", "weight", "target", "bias", "num_items")


class LinearCrossEntropy(nn.Module):
    """Options of :func:`memops.linear_cross_entropy` (any of its keyword arguments but ``num_items``)
    fixed and checked at construction.

    ``forward(input, weight, target, bias=None, num_items=None)``; it holds no
    parameters, so it works with any ``lm_head`` (tied, wrapped or sharded).
    """

    def __init__(self, **options: Any) -> None:
        super().__init__()
        known = set(inspect.signature(linear_cross_entropy).parameters) - set(_PER_CALL)
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"LinearCrossEntropy got unknown options {unknown}; known: {sorted(known)}")
        checked = dict(options)
        checked["all_lse"] = bool(checked.pop("return_lse", False))
        SPEC.check_options(checked)
        self.options = options

    def forward(
        self,
        input: Tensor,
        weight: Tensor,
        target: Tensor,
        bias: Tensor | None = None,
        num_items: int | float | Tensor | None = None,
    ) -> Tensor | tuple[Tensor, ...]:
        return linear_cross_entropy(input, weight, target, bias, num_items=num_items, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in sorted(self.options.items()))
