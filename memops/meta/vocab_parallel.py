"""Shape, dtype and stride rules for ``memops::vocab_parallel_ce`` and its backward op: those of
``memops::linear_ce``, with ``weight`` and ``bias`` this rank's shard (their gradients are the shard's)."""

from __future__ import annotations

import torch

from .. import validation as V
from ..rules import compute_dtype
from ._common import grads_like


@torch.library.register_fake("memops::vocab_parallel_ce")
def vocab_parallel_ce_fake(
    input,
    weight,
    target,
    bias,
    num_items,
    vocab_start,
    vocab_size,
    group_name,
    ignore_index,
    reduction,
    label_smoothing,
    z_loss,
    softcap,
    logit_scale,
    chunk_size,
    grad_mask,
):
    V.check_vocab_parallel_ce(
        input,
        weight,
        target,
        bias,
        num_items,
        vocab_start,
        vocab_size,
        reduction,
        label_smoothing,
        z_loss,
        softcap,
        logit_scale,
        chunk_size,
    )
    cdt = compute_dtype(input.dtype)
    loss = input.new_empty(target.shape if reduction == "none" else (), dtype=cdt)
    mask = grad_mask if reduction != "none" else (False, False, False)
    return (loss, input.new_empty(target.shape, dtype=cdt), *grads_like(input, (input, weight, bias), mask))


@torch.library.register_fake("memops::vocab_parallel_ce_backward")
def vocab_parallel_ce_backward_fake(
    grad_loss,
    input,
    weight,
    target,
    bias,
    num_items,
    saved_grad_input,
    saved_grad_weight,
    saved_grad_bias,
    vocab_start,
    vocab_size,
    group_name,
    ignore_index,
    reduction,
    label_smoothing,
    z_loss,
    softcap,
    logit_scale,
    chunk_size,
    need,
    have,
):
    V.check_vocab_parallel_ce(
        input,
        weight,
        target,
        bias,
        num_items,
        vocab_start,
        vocab_size,
        reduction,
        label_smoothing,
        z_loss,
        softcap,
        logit_scale,
        chunk_size,
    )
    return tuple(grads_like(input, (input, weight, bias), need))
