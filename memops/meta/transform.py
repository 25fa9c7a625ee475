"""``memops::linear_transform`` declared (any per-token loss registered with ``memops.transform``).

* ``loss``: compute dtype (fp64 for fp64 inputs, else fp32); ``target``'s shape for ``reduction="none"``,
  else 0-dim.
* gradients: input, weight, bias, then one per extra; contiguous, shaped and typed like each when
  produced, else an empty ``[0]`` tensor of input's dtype.
"""

from __future__ import annotations

from .. import validation as V
from ..contract import Input, Option, Spec, register
from .linear_ce import CHUNK_SIZE, NUM_ITEMS, PRECISION, PROJECTION, REDUCTION, loss_only

SPEC = register(
    Spec(
        name="linear_transform",
        inputs=(
            *PROJECTION,
            Input("target"),
            Input("bias", "Tensor?", grad=True),
            Input("extras", "Tensor[]", grad=True),
            NUM_ITEMS,
        ),
        options=(
            Option("transform", "str", None),
            Option("options", "str", "[]"),
            Option("ignore_index", "int", -100),
            REDUCTION,
            Option("softcap", "float?", None, V.positive),
            Option("logit_scale", "float", 1.0),
            CHUNK_SIZE,
            PRECISION,
        ),
        outputs=("loss",),
        shapes=loss_only,
        check=V.check_linear_transform,
    )
)
