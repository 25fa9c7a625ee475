"""Shape, dtype and stride rules for ``memops::linear_logprobs`` and ``memops::linear_grpo`` (+ backward ops).

* log-probabilities and entropy: compute dtype (fp64 for fp64 inputs, else fp32), ``target``'s shape;
  the entropy is an empty ``[0]`` tensor unless asked for.
* GRPO loss: compute dtype, 0-dim (``all_logprobs`` changes values only).
* gradients: contiguous, shaped and typed like input / weight / bias when produced, else an empty ``[0]``
  tensor of input's dtype.
"""

from __future__ import annotations

import torch

from .. import validation as V
from ..rules import compute_dtype
from ._common import grads_like


@torch.library.register_fake("memops::linear_logprobs")
def linear_logprobs_fake(input, weight, target, bias, temperature, return_entropy, chunk_size):
    V.check_linear_logprobs(input, weight, target, bias, temperature, chunk_size)
    cdt = compute_dtype(input.dtype)
    logp = input.new_empty(target.shape, dtype=cdt)
    return logp, input.new_empty(target.shape if return_entropy else (0,), dtype=cdt)


@torch.library.register_fake("memops::linear_logprobs_backward")
def linear_logprobs_backward_fake(
    grad_logprobs, grad_entropy, input, weight, target, bias, temperature, chunk_size, need
):
    V.check_linear_logprobs(input, weight, target, bias, temperature, chunk_size)
    return tuple(grads_like(input, (input, weight, bias), need))


@torch.library.register_fake("memops::linear_grpo")
def linear_grpo_fake(
    input,
    weight,
    target,
    bias,
    token_weight,
    advantages,
    old_logprobs,
    ref_logprobs,
    beta,
    epsilon_low,
    epsilon_high,
    temperature,
    chunk_size,
    all_logprobs,
    grad_mask,
):
    V.check_linear_grpo(
        input,
        weight,
        target,
        bias,
        token_weight,
        advantages,
        old_logprobs,
        ref_logprobs,
        beta,
        epsilon_low,
        epsilon_high,
        temperature,
        chunk_size,
    )
    cdt = compute_dtype(input.dtype)
    return (
        input.new_empty((), dtype=cdt),
        input.new_empty(target.shape, dtype=cdt),
        *grads_like(input, (input, weight, bias), grad_mask),
    )


@torch.library.register_fake("memops::linear_grpo_backward")
def linear_grpo_backward_fake(
    grad_loss,
    input,
    weight,
    target,
    bias,
    token_weight,
    advantages,
    old_logprobs,
    ref_logprobs,
    saved_grad_input,
    saved_grad_weight,
    saved_grad_bias,
    beta,
    epsilon_low,
    epsilon_high,
    temperature,
    chunk_size,
    need,
    have,
):
    V.check_linear_grpo(
        input,
        weight,
        target,
        bias,
        token_weight,
        advantages,
        old_logprobs,
        ref_logprobs,
        beta,
        epsilon_low,
        epsilon_high,
        temperature,
        chunk_size,
    )
    return tuple(grads_like(input, (input, weight, bias), need))
