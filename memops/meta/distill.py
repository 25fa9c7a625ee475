"""``memops::linear_distill`` declared: teacher-student divergence (forward KL, reverse KL, generalized JSD)
plus an optional hard-label cross-entropy, from the student's projection and an online teacher projection
or an offline top-k teacher.

* ``loss``: compute dtype (fp64 for fp64 inputs, else fp32); ``target``'s shape for ``reduction="none"``,
  else 0-dim.
* gradients: the student's input, weight and bias only (the teacher is frozen), like ``memops::linear_ce``'s.
"""

from __future__ import annotations

from .. import validation as V
from ..contract import Input, Option, Spec, register
from .linear_ce import CHUNK_SIZE, NUM_ITEMS, PROJECTION
from .transform import loss_only

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
            CHUNK_SIZE,
        ),
        outputs=("loss",),
        shapes=loss_only,
        check=V.check_linear_distill,
    )
)
