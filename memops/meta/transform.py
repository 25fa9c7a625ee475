"""``memops::linear_transform`` declared (any per-token loss registered with ``memops.transform``).

* ``loss``: compute dtype (fp64 for fp64 inputs, else fp32); ``target``'s shape for ``reduction="none"``,
  else 0-dim.
* gradients: input, weight, bias, then one per extra; contiguous, shaped and typed like each when
  produced, else an empty ``[0]`` tensor of input's dtype.
"""

from __future__ import annotations

import torch

from .. import validation as V
from ..contract import Input, Option, Spec, register
from ..registry import get_transform
from .linear_ce import CHUNK_SIZE, NUM_ITEMS, PRECISION, PROJECTION, REDUCTION, loss_only

_OPTION_TYPES = (bool, int, float, str, type(None))


def check_extras(target: torch.Tensor, extras) -> None:
    """Per-token tensors: leading shape equal to ``target``'s, on its device."""
    for i, e in enumerate(extras):
        if not isinstance(e, torch.Tensor):
            raise TypeError(f"extras[{i}] must be a Tensor, got {type(e).__name__}")
        if e.shape[: target.dim()] != target.shape:
            V.fail(f"extras[{i}] shape {tuple(e.shape)} must start with target's shape {tuple(target.shape)}")
        if e.device != target.device:
            V.fail(f"extras[{i}] is on {e.device} but target is on {target.device}")


def check_transform_options(name: str, options: dict) -> None:
    """Transform options: Python scalars and strings only; floats finite."""
    for key, value in options.items():
        if not isinstance(value, _OPTION_TYPES):
            raise TypeError(
                f"option {key}={value!r} of transform {name!r} must be a bool, int, float, str "
                f"or None, got {type(value).__name__}"
            )
        if isinstance(value, float):
            V.check_finite(f"option {key} of transform {name!r}", value)


def check(a) -> None:
    """``memops::linear_transform``: projection, target, extras, ``num_items``, the transform's name, and
    one ``grad_mask`` entry per input, weight, bias and extra."""
    V.check_projection(a.input, a.weight, a.bias)
    V.check_target(a.input, a.target)
    check_extras(a.target, a.extras)
    V.check_num_items(a.num_items, a.reduction)
    get_transform(a.transform)
    mask = getattr(a, "grad_mask", None)
    if mask is None:
        mask = getattr(a, "need", None)
    if mask is not None and len(mask) != 3 + len(a.extras):
        V.fail(f"grad_mask must have 3 + len(extras) = {3 + len(a.extras)} entries, got {len(mask)}")


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
        check=check,
    )
)
