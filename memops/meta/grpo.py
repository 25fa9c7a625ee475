"""``memops::linear_grpo`` declared: TRL's GRPO loss from the policy's projection.

Loss: compute dtype, 0-dim (``all_logprobs`` changes values only); log-probs like ``linear_logprobs``'; the
entropy (no gradient output of its own: its weight in the loss is the ``entropy_weight`` input) ``target``'s
shape when ``return_entropy``, else an empty ``[0]`` tensor; its gradients (input, weight, bias) like those of
``memops::linear_ce``.
"""

from __future__ import annotations

from .. import validation as V
from ..contract import Input, Option, Spec, register
from ..rules import compute_dtype
from .linear_ce import CHUNK_SIZE, PRECISION
from .logprobs import LM_INPUTS, TEMPERATURE


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
