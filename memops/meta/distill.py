"""``memops::linear_distill`` declared: teacher-student divergence (forward KL, reverse KL, generalized JSD)
plus an optional hard-label cross-entropy, from the student's projection and an online teacher projection
or an offline top-k teacher.

* ``loss``: compute dtype (fp64 for fp64 inputs, else fp32); ``target``'s shape for ``reduction="none"``,
  else 0-dim.  ``entropy`` (no gradient): the student's tempered entropy per token, compute dtype,
  ``target``'s shape, or an empty ``[0]`` tensor unless ``return_entropy``.
* gradients: the student's input, weight and bias only (the teacher is frozen), like ``memops::linear_ce``'s.
"""

from __future__ import annotations

import torch

from .. import validation as V
from ..contract import Input, Option, Spec, register
from ..rules import compute_dtype
from .linear_ce import CHUNK_SIZE, NUM_ITEMS, PRECISION, PROJECTION, loss_only

REDUCTIONS = ("batchmean", "sum", "none")


def check(a) -> None:
    """``memops::linear_distill``: the student projection and target; exactly one teacher (online: its own
    projection of the same tokens over the same vocabulary; offline: top-k ids and log-probs per token)."""
    V.check_projection(a.input, a.weight, a.bias, "student_")
    V.check_target(a.input, a.target)
    online = [x is not None for x in (a.teacher_input, a.teacher_weight, a.teacher_bias)]
    offline = [x is not None for x in (a.teacher_topk_ids, a.teacher_topk_logprobs)]
    if any(online) and any(offline):
        V.fail(
            "give one teacher: teacher_input/teacher_weight (online) or teacher_topk_ids/teacher_topk_logprobs "
            "(offline), not both"
        )
    if not any(online) and not all(offline):
        if any(offline):
            V.fail("an offline teacher needs both teacher_topk_ids and teacher_topk_logprobs")
        V.fail(
            "give a teacher: teacher_input and teacher_weight (online), or teacher_topk_ids and "
            "teacher_topk_logprobs (offline)"
        )
    if any(online):
        if a.teacher_input is None or a.teacher_weight is None:
            V.fail("an online teacher needs both teacher_input and teacher_weight")
        V.check_projection(a.teacher_input, a.teacher_weight, a.teacher_bias, "teacher_")
        if a.teacher_weight.shape[0] != a.weight.shape[0]:
            V.fail(
                f"teacher_weight has {a.teacher_weight.shape[0]} vocabulary rows but weight has "
                f"{a.weight.shape[0]}: student and teacher must share the vocabulary"
            )
        if a.teacher_input.shape[:-1] != a.target.shape:
            V.fail(
                f"teacher_input's leading shape {tuple(a.teacher_input.shape[:-1])} must equal target's shape "
                f"{tuple(a.target.shape)}"
            )
        if a.teacher_input.device != a.input.device:
            V.fail(f"teacher_input is on {a.teacher_input.device} but input is on {a.input.device}")
    else:
        ids, lp = a.teacher_topk_ids, a.teacher_topk_logprobs
        if ids.dtype not in V.INDEX:
            V.fail(f"teacher_topk_ids must hold int64 or int32 token ids, got {ids.dtype}")
        if ids.dim() != a.target.dim() + 1 or ids.shape[:-1] != a.target.shape or ids.shape[-1] < 1:
            V.fail(
                f"teacher_topk_ids must have shape [..., k] with [...] = target's shape {tuple(a.target.shape)} "
                f"and k >= 1, got {tuple(ids.shape)}"
            )
        vocab = getattr(a, "vocab_size", None) or a.weight.shape[0]  # a vocabulary-parallel op: the whole one
        if ids.shape[-1] > vocab:
            V.fail(f"teacher_topk_ids has k={ids.shape[-1]} ids per token, more than the vocabulary ({vocab})")
        V.check_like("teacher_topk_logprobs", lp, ids, "teacher_topk_ids")
        if lp.dtype not in V.FLOATS:
            V.fail(f"teacher_topk_logprobs must be a float tensor, got {lp.dtype}")
        if ids.device != a.input.device:
            V.fail(f"teacher_topk_ids is on {ids.device} but input is on {a.input.device}")
        if a.beta != 0:
            V.fail(f"an offline (top-k) teacher supports the forward KL only (beta=0), got beta={a.beta}")
    if a.num_items is not None:
        if a.reduction != "batchmean":
            V.fail(f"num_items only applies to reduction='batchmean', got reduction={a.reduction!r}")
        V.check_num_items(a.num_items, "mean")


def check_frozen_teacher(**tensors) -> None:
    """The teacher gets no gradient: a teacher tensor that requires one (with grad mode on) is an error."""
    if torch.is_grad_enabled():
        for name, t in tensors.items():
            if isinstance(t, torch.Tensor) and t.requires_grad:
                V.fail(f"{name} requires grad, but the teacher is frozen here: pass {name}.detach()")


def _shapes(a):
    entropy = a.input.new_empty(a.target.shape if a.return_entropy else (0,), dtype=compute_dtype(a.input.dtype))
    return (*loss_only(a), entropy)


SPEC = register(
    Spec(
        name="linear_distill",
        inputs=(
            *PROJECTION,
            Input("target"),
            Input("bias", "Tensor?", grad=True),
            Input("teacher_input", "Tensor?"),
            Input("teacher_weight", "Tensor?"),
            Input("teacher_bias", "Tensor?"),
            Input("teacher_topk_ids", "Tensor?"),
            Input("teacher_topk_logprobs", "Tensor?"),
            NUM_ITEMS,
        ),
        options=(
            Option("beta", "float", 0.5, V.unit_interval),
            Option("temperature", "float", 1.0, V.positive),
            Option("hard_label_weight", "float", 0.0, V.unit_interval),
            Option("ignore_index", "int", -100),
            Option("reduction", "str", "batchmean", V.one_of(*REDUCTIONS)),
            Option("logit_scale", "float", 1.0),
            Option("softcap", "float?", None, V.positive),
            Option("teacher_logit_scale", "float", 1.0),
            Option("teacher_softcap", "float?", None, V.positive),
            Option("return_entropy", "bool", False),
            CHUNK_SIZE,
            PRECISION,
        ),
        outputs=("loss", "entropy"),
        shapes=_shapes,
        check=check,
    )
)
