"""``memops::linear_logprobs`` and ``memops::linear_grpo`` declared.

* log-probabilities and entropy: compute dtype (fp64 for fp64 inputs, else fp32), ``target``'s shape;
  the entropy is an empty ``[0]`` tensor unless asked for.  Both take an incoming gradient; the op
  computes no gradient in its forward pass.
* GRPO loss: compute dtype, 0-dim (``all_logprobs`` changes values only); its gradients (input, weight,
  bias) like those of ``memops::linear_ce``.
"""

from __future__ import annotations

from .. import validation as V
from ..contract import Input, Option, Spec, register
from ..rules import compute_dtype
from .linear_ce import CHUNK_SIZE, PROJECTION

TEMPERATURE = Option("temperature", "float", 1.0, V.positive)
LM_INPUTS = (*PROJECTION, Input("target"), Input("bias", "Tensor?", grad=True))


def _logprobs(a):
    cdt = compute_dtype(a.input.dtype)
    shape = a.target.shape if a.return_entropy else (0,)
    return a.input.new_empty(a.target.shape, dtype=cdt), a.input.new_empty(shape, dtype=cdt)


LOGPROBS = register(
    Spec(
        name="linear_logprobs",
        inputs=LM_INPUTS,
        options=(TEMPERATURE, Option("return_entropy", "bool", False), CHUNK_SIZE),
        outputs=("logprobs", "entropy"),
        differentiable=("logprobs", "entropy"),
        shapes=_logprobs,
        check=V.check_linear_logprobs,
        forward_grads=False,
        scalar=lambda a: False,
    )
)


def _grpo(a):
    cdt = compute_dtype(a.input.dtype)
    return a.input.new_empty((), dtype=cdt), a.input.new_empty(a.target.shape, dtype=cdt)


GRPO = register(
    Spec(
        name="linear_grpo",
        inputs=(
            *LM_INPUTS,
            Input("token_weight"),
            Input("advantages"),
            Input("old_logprobs", "Tensor?"),
            Input("ref_logprobs", "Tensor?"),
        ),
        options=(
            Option("beta", "float", 0.0),
            Option("epsilon_low", "float", 0.2, V.epsilon_low),
            Option("epsilon_high", "float", 0.2, V.non_negative),
            TEMPERATURE,
            CHUNK_SIZE,
            Option("all_logprobs", "bool", True),
        ),
        outputs=("loss", "logprobs"),
        shapes=_grpo,
        check=V.check_linear_grpo,
        scalar=lambda a: True,
    )
)
