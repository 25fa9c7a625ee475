"""``memops::linear_grpo`` declared: TRL's GRPO loss from the policy's projection.

Loss: compute dtype, 0-dim (``all_logprobs`` changes values only); log-probs like ``linear_logprobs``'; the
entropy (no gradient output of its own: its weight in the loss is the ``entropy_weight`` input) ``target``'s
shape when ``return_entropy``, else an empty ``[0]`` tensor; its gradients (input, weight, bias) like those of
``memops::linear_ce``.
"""

from __future__ import annotations

import torch

from .. import validation as V
from ..contract import Input, Option, Spec, register
from ..rules import compute_dtype
from .linear_ce import CHUNK_SIZE, PRECISION
from .logprobs import (
    ENTROPY_OVER,
    LM_INPUTS,
    SAMPLING_MASK,
    TEMPERATURE,
    TOKEN_TEMPERATURE,
    check_sampling_mask,
    check_token_temperature,
)


def _grpo(a):
    cdt = compute_dtype(a.input.dtype)
    entropy = a.input.new_empty(a.target.shape if a.return_entropy else (0,), dtype=cdt)
    return a.input.new_empty((), dtype=cdt), a.input.new_empty(a.target.shape, dtype=cdt), entropy


# the per-token formulas of TRL 1.16's GRPOTrainer (its loss_type, vespo aside); the normalization is the
# token weights'
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo")


def check_per_token_float(
    name: str, t: torch.Tensor, target: torch.Tensor, target_name: str = "completion_ids"
) -> None:
    V.check_like(name, t, target, target_name)
    if t.dtype not in V.FLOATS:
        V.fail(f"{name} must be a float tensor, got {t.dtype}")


def check(a) -> None:
    """``memops::linear_grpo`` (``token_weight`` and ``advantages`` are per token here, shaped like the
    completion ids)."""
    V.check_projection(a.input, a.weight, a.bias)
    V.check_target(a.input, a.target, "completion_ids")
    check_sampling_mask(a, "completion_ids")
    check_token_temperature(a, "completion_ids")
    check_per_token_float("token_weight", a.token_weight, a.target)
    check_per_token_float("advantages", a.advantages, a.target)
    for name in ("old_logprobs", "ref_logprobs", "entropy_weight"):
        if getattr(a, name) is not None:
            check_per_token_float(name, getattr(a, name), a.target)
    if a.importance_sampling_level == "sequence" and a.target.dim() != 2:
        V.fail(f"importance_sampling_level='sequence' needs [B, T] completion_ids, got {tuple(a.target.shape)}")
    if a.beta != 0 and a.ref_logprobs is None:
        V.fail("beta != 0 needs ref_logprobs (the reference model's per-token log-probabilities)")


def check_front(input, completion_ids, completion_mask, advantages, loss_type, max_completion_length) -> None:
    """The shapes ``memops.linear_grpo_loss`` takes: ``input [B, T, D]``, ids/mask ``[B, T]``, advantages ``[B]``."""
    if not isinstance(input, torch.Tensor) or input.dim() != 3:
        V.fail(
            f"input must be the completion hidden states [B, T, D], got shape "
            f"{tuple(input.shape) if isinstance(input, torch.Tensor) else type(input).__name__}"
        )
    V.check_target(input, completion_ids, "completion_ids")
    V.check_like("completion_mask", completion_mask, completion_ids, "completion_ids")
    if not isinstance(advantages, torch.Tensor) or advantages.shape != completion_ids.shape[:1]:
        got = tuple(advantages.shape) if isinstance(advantages, torch.Tensor) else type(advantages).__name__
        V.fail(f"advantages must have shape [B]=[{completion_ids.shape[0]}] (one per completion), got {got}")
    if advantages.device != input.device:
        V.fail(f"advantages is on {advantages.device} but input is on {input.device}")
    if loss_type not in LOSS_TYPES:
        V.fail(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if max_completion_length is not None and (
        not isinstance(max_completion_length, int)
        or isinstance(max_completion_length, bool)
        or max_completion_length < 1
    ):
        V.fail(f"max_completion_length must be a positive int or None, got {max_completion_length!r}")


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
            SAMPLING_MASK,
            TOKEN_TEMPERATURE,
        ),
        options=(
            Option("loss_type", "str", "grpo", V.one_of(*LOSS_TYPES)),
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
            ENTROPY_OVER,
        ),
        outputs=("loss", "logprobs", "entropy"),
        shapes=_grpo,
        check=check,
        scalar=lambda a: True,
    )
)
