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


def check(a) -> None:
    """``memops::linear_logprobs``: projection and target."""
    V.check_projection(a.input, a.weight, a.bias)
    V.check_target(a.input, a.target)


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
        inputs=LM_INPUTS,
        options=(
            TEMPERATURE,
            Option("logit_scale", "float", 1.0),
            Option("softcap", "float?", None, V.positive),
            *(Option("return_" + name, "bool", False) for name in EXTRAS),
            CHUNK_SIZE,
            PRECISION,
        ),
        outputs=("logprobs", *EXTRAS),
        differentiable=("logprobs", "entropy"),
        shapes=_logprobs,
        check=check,
        forward_grads=False,
        scalar=lambda a: False,
    )
)
