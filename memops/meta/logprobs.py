"""``memops::linear_logprobs`` declared (``memops::linear_grpo`` reuses its inputs: ``meta/grpo.py``).

* log-probabilities and entropy: compute dtype (fp64 for fp64 inputs, else fp32), ``target``'s shape;
  the entropy is an empty ``[0]`` tensor unless asked for.  Both take an incoming gradient; the op
  computes no gradient in its forward pass.  ``log_sum_sq_probs`` and ``mean_logits`` (compute dtype) and
  ``is_top1`` (bool), ``target``'s shape when asked for, else empty ``[0]`` tensors of the compute dtype; no
  gradient.
"""

from __future__ import annotations

import torch

from .. import validation as V
from ..contract import Input, Option, Spec, register
from ..rules import compute_dtype
from .linear_ce import CHUNK_SIZE, PRECISION, PROJECTION

TEMPERATURE = Option("temperature", "float", 1.0, V.positive)

LM_INPUTS = (*PROJECTION, Input("target"), Input("bias", "Tensor?", grad=True))
# the token ids the sampler kept per token ([..., K], -1 padding): the log-probability is renormalized over
# them (and the target); no gradient.  Last among the inputs (and entropy_over last among the options), so
# that the ops' earlier positional arguments keep their places
SAMPLING_MASK = Input("sampling_mask", "Tensor?")
# one temperature per token (the front ends' tensor ``temperature``, expanded to the target's shape; the option
# ``temperature`` is then 1): no gradient
TOKEN_TEMPERATURE = Input("token_temperature", "Tensor?", refuse_grad=True)
# the entropy output (and its gradient) over the whole vocabulary, or over the kept set of sampling_mask
ENTROPY_OVER = Option("entropy_over", "str", "full", V.one_of("full", "kept"))


def check_sampling_mask(a, target_name: str = "target") -> None:
    """``sampling_mask``: integer ids shaped ``target.shape + (K,)`` (K >= 1) on its device; ``entropy_over=
    "kept"`` needs one."""
    mask = a.sampling_mask
    if mask is None:
        if a.entropy_over == "kept":
            V.fail("entropy_over='kept' needs sampling_mask (the kept token ids per token)")
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"sampling_mask must be a Tensor or None, got {type(mask).__name__}")
    if mask.dtype not in V.INDEX:
        V.fail(f"sampling_mask must hold int64 or int32 token ids (-1 padding), got {mask.dtype}")
    shape = tuple(a.target.shape)
    if mask.dim() != len(shape) + 1 or tuple(mask.shape[:-1]) != shape or mask.shape[-1] < 1:
        V.fail(
            f"sampling_mask must have shape {target_name}.shape + (K,) = {shape} + (K,) with K >= 1, "
            f"got {tuple(mask.shape)}"
        )
    if mask.device != a.target.device:
        V.fail(f"sampling_mask is on {mask.device} but {target_name} is on {a.target.device}")


def check_token_temperature(a, target_name: str = "target") -> None:
    """``token_temperature``: floats shaped like the target, on its device."""
    temp = a.token_temperature
    if temp is None:
        return
    if not isinstance(temp, torch.Tensor) or not temp.is_floating_point():
        V.fail(f"a temperature tensor must hold floats, got {getattr(temp, 'dtype', type(temp).__name__)}")
    if tuple(temp.shape) != tuple(a.target.shape):
        V.fail(f"temperature shape {tuple(temp.shape)} must broadcast to {target_name}'s shape {tuple(a.target.shape)}")
    if temp.device != a.target.device:
        V.fail(f"temperature is on {temp.device} but {target_name} is on {a.target.device}")


def check(a) -> None:
    """``memops::linear_logprobs``: projection, target, sampling mask and per-token temperatures."""
    V.check_projection(a.input, a.weight, a.bias)
    V.check_target(a.input, a.target)
    check_sampling_mask(a)
    check_token_temperature(a)


# the per-token outputs besides the log-probabilities, each computed only when asked for (its option)
EXTRAS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _logprobs(a):
    cdt = compute_dtype(a.input.dtype)
    out = [a.input.new_empty(a.target.shape, dtype=cdt)]
    for name in EXTRAS:
        if getattr(a, "return_" + name):
            out.append(a.input.new_empty(a.target.shape, dtype=torch.bool if name == "is_top1" else cdt))
        else:
            out.append(a.input.new_empty((0,), dtype=cdt))
    return tuple(out)


LOGPROBS = register(
    Spec(
        name="linear_logprobs",
        inputs=(*LM_INPUTS, SAMPLING_MASK, TOKEN_TEMPERATURE),
        options=(
            TEMPERATURE,
            Option("logit_scale", "float", 1.0),
            Option("softcap", "float?", None, V.positive),
            *(Option("return_" + name, "bool", False) for name in EXTRAS),
            CHUNK_SIZE,
            PRECISION,
            ENTROPY_OVER,
        ),
        outputs=("logprobs", *EXTRAS),
        differentiable=("logprobs", "entropy"),
        shapes=_logprobs,
        check=check,
        forward_grads=False,
        scalar=lambda a: False,
    )
)
