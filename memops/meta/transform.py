"""Shape, dtype and stride rules for ``memops::linear_transform`` and its backward.

* ``loss``: compute dtype (fp64 for fp64 inputs, else fp32); ``target``'s shape
  for ``reduction="none"``, else 0-dim.
* gradients: contiguous, shaped and typed like input / weight / bias / each
  extra when produced, else an empty ``[0]`` tensor of input's dtype.
"""

from __future__ import annotations

import torch

from .. import validation as V
from ..registry import get_transform
from ..rules import compute_dtype
from ._common import grads_like


def _grads(input, weight, bias, extras, mask):
    g = grads_like(input, (input, weight, bias, *extras), mask)
    return g[0], g[1], g[2], g[3:]


@torch.library.register_fake("memops::linear_transform")
def linear_transform_fake(
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
):
    V.check_linear_transform(
        input, weight, target, bias, extras, num_items, reduction, softcap, logit_scale, chunk_size
    )
    get_transform(transform)
    loss = input.new_empty(target.shape if reduction == "none" else (), dtype=compute_dtype(input.dtype))
    mask = grad_mask if reduction != "none" else [False] * len(grad_mask)
    return (loss, *_grads(input, weight, bias, extras, mask))


@torch.library.register_fake("memops::linear_transform_backward")
def linear_transform_backward_fake(
    grad_loss,
    input,
    weight,
    target,
    bias,
    extras,
    num_items,
    saved_grad_input,
    saved_grad_weight,
    saved_grad_bias,
    saved_grad_extras,
    transform,
    options,
    ignore_index,
    reduction,
    softcap,
    logit_scale,
    chunk_size,
    need,
    have,
):
    V.check_linear_transform(
        input, weight, target, bias, extras, num_items, reduction, softcap, logit_scale, chunk_size
    )
    return _grads(input, weight, bias, extras, need)
