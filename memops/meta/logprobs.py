"""``memops::linear_logprobs`` and ``memops::linear_grpo`` declared.

* log-probabilities and entropy: compute dtype (fp64 for fp64 inputs, else fp32), ``target``'s shape;
  the entropy is an empty ``[0]`` tensor unless asked for.  Both take an incoming gradient; the op
  computes no gradient in its forward pass.  ``log_sum_sq_probs`` and ``mean_logits`` (compute dtype) and
  ``is_top1`` (bool), ``target``'s shape when asked for, else empty ``[0]`` tensors of the compute dtype; no
  gradient.
* GRPO loss: compute dtype, 0-dim (``all_logprobs`` changes values only); log-probs like
  ``linear_logprobs``'; the entropy (no gradient output of its own: its weight in the loss is the
  ``entropy_weight`` input) ``target``'s shape when ``return_entropy``, else an empty ``[0]`` tensor; its
  gradients (input, weight, bias) like those of ``memops::linear_ce``.
"""

from __future__ import annotations

import torch

from .. import validation as V
from ..contract import Input, Option, Spec, register
from ..rules import compute_dtype
from .linear_ce import CHUNK_SIZE, PRECISION, PROJECTION

TEMPERATURE = Option("temperature", "float", 1.0, V.positive)
LM_INPUTS = (*PROJECTION, Input("target"), Input("bias", "Tensor?", grad=True))


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
        check=V.check_linear_logprobs,
        forward_grads=False,
        scalar=lambda a: False,
    )
)


def _grpo(a):
    cdt = compute_dtype(a.input.dtype)
    entropy = a.input.new_empty(a.target.shape if a.return_entropy else (0,), dtype=cdt)
    return a.input.new_empty((), dtype=cdt), a.input.new_empty(a.target.shape, dtype=cdt), entropy


GRPO = register(
    Spec(
        name="linear_grpo",
        inputs=(
            *LM_INPUTS,
            Input("token_weight"),
            Input("advantages"),
            Input("old_logprobs", "Tensor?"),
            Input("ref_logprobs", "Tensor?"),
            Input("entropy_weight", "Tensor?"),
        ),
        options=(
            Option("loss_type", "str", "grpo", V.one_of(*V.GRPO_LOSS_TYPES)),
            Option("importance_sampling_level", "str", "token", V.one_of("token", "sequence")),
            Option("beta", "float", 0.0),
            Option("epsilon_low", "float", 0.2, V.epsilon_low),
            Option("epsilon_high", "float", 0.2, V.non_negative),
            Option("delta", "float?", None, V.positive),
            Option("use_bias_correction_kl", "bool", False),
            Option("sapo_temperature_pos", "float", 1.0, V.positive),
            Option("sapo_temperature_neg", "float", 1.05, V.positive),
            TEMPERATURE,
            Option("logit_scale", "float", 1.0),
            Option("softcap", "float?", None, V.positive),
            Option("return_entropy", "bool", False),
            CHUNK_SIZE,
            Option("all_logprobs", "bool", True),
            PRECISION,
        ),
        outputs=("loss", "logprobs", "entropy"),
        shapes=_grpo,
        check=V.check_linear_grpo,
        scalar=lambda a: True,
    )
)
