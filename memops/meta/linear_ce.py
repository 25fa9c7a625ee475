"""Shape, dtype and stride rules for ``memops::linear_ce`` and ``memops::linear_ce_backward``.

* ``loss``: compute dtype (fp64 for fp64 inputs, else fp32); ``target``'s shape
  for ``reduction="none"``, else 0-dim.  ``lse``: compute dtype, ``target``'s shape
  (``all_lse`` changes values only).
* gradients: contiguous, shaped and typed like input / weight / bias when
  produced, else an empty ``[0]`` tensor of input's dtype.
"""

from __future__ import annotations

import torch

from .. import validation as V
from ..rules import compute_dtype
from ._common import grads_like


def _grads(input, weight, bias, mask):
    return tuple(grads_like(input, (input, weight, bias), mask))


@torch.library.register_fake("memops::linear_ce")
def linear_ce_fake(
    input,
    weight,
    target,
    bias,
    num_items,
    ignore_index,
    reduction,
    label_smoothing,
    z_loss,
    softcap,
    logit_scale,
    chunk_size,
    all_lse,
    grad_mask,
):
    V.check_linear_ce(
        input, weight, target, bias, num_items, reduction, label_smoothing, z_loss, softcap, logit_scale, chunk_size
    )
    cdt = compute_dtype(input.dtype)
    loss = input.new_empty(target.shape if reduction == "none" else (), dtype=cdt)
    lse = input.new_empty(target.shape, dtype=cdt)
    mask = grad_mask if reduction != "none" else (False, False, False)
    return (loss, lse) + _grads(input, weight, bias, mask)


@torch.library.register_fake("memops::linear_ce_backward")
def linear_ce_backward_fake(
    grad_loss,
    input,
    weight,
    target,
    bias,
    num_items,
    saved_grad_input,
    saved_grad_weight,
    saved_grad_bias,
    ignore_index,
    reduction,
    label_smoothing,
    z_loss,
    softcap,
    logit_scale,
    chunk_size,
    all_lse,
    need,
    have,
):
    V.check_linear_ce(
        input, weight, target, bias, num_items, reduction, label_smoothing, z_loss, softcap, logit_scale, chunk_size
    )
    return _grads(input, weight, bias, need)
