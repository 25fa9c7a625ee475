"""``nn.Module`` front ends for code that prefers modules."""

from __future__ import annotations

from torch import Tensor, nn

from . import validation as V
from .ops.linear_ce import linear_cross_entropy


class LinearCrossEntropy(nn.Module):
    """Options of :func:`memops.linear_cross_entropy` fixed at construction.

    ``forward(input, weight, target, bias=None, num_items=None)``; it holds no
    parameters, so it works with any ``lm_head`` (tied, wrapped or sharded).
    """

    def __init__(
        self,
        *,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        logit_scale: float = 1.0,
        chunk_size: int | None = None,
        return_lse: bool = False,
    ) -> None:
        super().__init__()
        V.check_ce_options(reduction, label_smoothing, z_loss, softcap, logit_scale, V.as_chunk_size(chunk_size))
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.logit_scale = logit_scale
        self.chunk_size = chunk_size
        self.return_lse = return_lse

    def forward(
        self,
        input: Tensor,
        weight: Tensor,
        target: Tensor,
        bias: Tensor | None = None,
        num_items: int | float | Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        return linear_cross_entropy(
            input,
            weight,
            target,
            bias,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            logit_scale=self.logit_scale,
            num_items=num_items,
            chunk_size=self.chunk_size,
            return_lse=self.return_lse,
        )

    def extra_repr(self) -> str:
        return (
            f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
            f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, softcap={self.softcap}, "
            f"logit_scale={self.logit_scale}, chunk_size={self.chunk_size}"
        )
