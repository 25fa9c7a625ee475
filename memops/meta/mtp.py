"""``memops::linear_mtp_ce`` declared: multi-token prediction's cross-entropies, every depth against one head.

* ``input``: ``[D, *tokens, H]``: depth ``k``'s hidden states at ``input[k]``.  ``target``: ``[*tokens]``
  class indices, unshifted (the token at each position: the input ids, or labels with ``ignore_index`` at the
  positions not to predict).  Depth ``k``'s target at position ``t`` is ``target[..., t + shifts[k]]`` when
  that position exists and, with ``position_ids``, lies in the same document (a position whose id is not its
  predecessor's plus one starts a document); otherwise the position is ignored at that depth.
* ``depth_weight``: ``[D]`` floats (no gradient), each depth's weight in the total.
* ``loss``: compute dtype (fp64 for fp64 inputs, else fp32); 0-dim, or ``[*tokens]`` for ``reduction="none"``
  (the depths' weighted sum at each position).  ``per_depth``: each depth's loss as ``reduction`` says, ``[D]``
  (``[D, *tokens]`` for ``"none"``), returned detached.
* gradients (input, weight, target, bias): as ``memops::linear_ce``'s (the target never has one).
"""

from __future__ import annotations

import torch

from .. import validation as V
from ..contract import Input, Option, Spec, register
from ..rules import compute_dtype
from .linear_ce import CE_OPTIONS, NUM_ITEMS, PRECISION, PROJECTION


def check_shifts(name: str, value) -> None:
    if len(value) < 1 or any(s < 0 for s in value):
        V.fail(f"{name} must hold one int >= 0 per depth, got {tuple(value)}")


def check(a) -> None:
    """Projection, depths, targets, ``position_ids``, ``depth_weight``, class weights, ``num_items``."""
    V.check_projection(a.input, a.weight, a.bias)
    x = a.input
    if x.dim() < 3:
        V.fail(f"input must have shape [D, *tokens, H] (D depths, at least one token dimension), got {tuple(x.shape)}")
    depths = x.shape[0]
    if len(a.shifts) != depths:
        V.fail(f"shifts has {len(a.shifts)} entries but input holds {depths} depths (input.shape[0])")
    t = a.target
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"target must be a Tensor, got {type(t).__name__}")
    if t.dtype not in V.INDEX:
        V.fail(f"target must hold int64 or int32 class indices, got {t.dtype}")
    if tuple(t.shape) != tuple(x.shape[1:-1]):
        V.fail(
            f"target shape {tuple(t.shape)} must equal input's token shape {tuple(x.shape[1:-1])} "
            f"(input [D, *tokens, H] = {tuple(x.shape)})"
        )
    if t.device != x.device:
        V.fail(f"target is on {t.device} but input is on {x.device}")
    if a.position_ids is not None:
        V.check_like("position_ids", a.position_ids, t, "target")
        if a.position_ids.is_floating_point() or a.position_ids.dtype == torch.bool:
            V.fail(f"position_ids must hold integers, got {a.position_ids.dtype}")
    w = a.depth_weight
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() or tuple(w.shape) != (depths,):
        V.fail(
            f"depth_weight must be a float tensor of shape [D]=[{depths}], got "
            + (f"{w.dtype} {tuple(w.shape)}" if isinstance(w, torch.Tensor) else type(w).__name__)
        )
    if w.device != x.device:
        V.fail(f"depth_weight is on {w.device} but input is on {x.device}")
    V.check_class_weight(a.class_weight, a.weight)
    V.check_num_items(a.num_items, a.reduction)
    if getattr(a, "sequence_parallel", False):
        V.fail(
            "sequence_parallel=True is not offered for multi-token prediction: a depth's targets are shifted "
            "along the sequence, across the ranks' token shards; pass every rank the whole sequence "
            "(sequence_parallel=False)"
        )


def _outputs(a):
    cdt = compute_dtype(a.input.dtype)
    tokens = tuple(a.target.shape)
    per_token = a.reduction == "none"
    loss = a.input.new_empty(tokens if per_token else (), dtype=cdt)
    per_depth = a.input.new_empty((a.input.shape[0], *tokens) if per_token else (a.input.shape[0],), dtype=cdt)
    return loss, per_depth


MTP_INPUTS = (
    *PROJECTION,
    Input("target", grad=True),  # class indices: a slot, never a gradient (as linear_ce's)
    Input("bias", "Tensor?", grad=True),
    NUM_ITEMS,
    Input("class_weight", "Tensor?", refuse_grad=True),
    Input("depth_weight", refuse_grad=True),
    Input("position_ids", "Tensor?"),
)

SPEC = register(
    Spec(
        name="linear_mtp_ce",
        inputs=MTP_INPUTS,
        options=(Option("shifts", "int[]", None, check_shifts), *CE_OPTIONS, PRECISION),
        outputs=("loss", "per_depth"),
        shapes=_outputs,
        check=check,
    )
)
