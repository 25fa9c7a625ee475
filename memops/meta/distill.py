"""``memops::linear_distill`` declared: teacher-student divergence (forward KL, reverse KL, generalized JSD)
plus an optional hard-label cross-entropy, from the student's projection and an online teacher projection
or an offline top-k teacher.

* ``loss``: compute dtype (fp64 for fp64 inputs, else fp32); ``target``'s shape for ``reduction="none"``,
  else 0-dim.  ``entropy`` (no gradient): the student's tempered entropy per token, compute dtype,
  ``target``'s shape, or an empty ``[0]`` tensor unless ``return_entropy``.
* gradients: the student's input, weight and bias only (the teacher is frozen), like ``memops::linear_ce``'s.
"""

from __future__ import annotations

from .. import validation as V
from ..contract import Input, Option, Spec, register
from ..rules import compute_dtype
from .linear_ce import CHUNK_SIZE, NUM_ITEMS, PRECISION, PROJECTION, loss_only


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
            Option("reduction", "str", "batchmean", V.one_of(*V.DISTILL_REDUCTIONS)),
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
        check=V.check_linear_distill,
    )
)
