"""memops on ``torch.distributed``: vocab-parallel cross-entropy, and the head module FSDP2 needs.

* DDP and FSDP2 need nothing special for ``memops.linear_cross_entropy`` (and the transform / log-prob
  ops): gradients reach the parameters through autograd as usual.  FSDP2 has one rule: a module's
  parameters are unsharded only inside that module's forward.  So compute the loss *inside* the head's
  forward: use ``LinearCrossEntropyHead`` as the ``lm_head`` (``forward(hidden, target)`` returns the
  loss) and ``fully_shard`` it, or use ``memops.integrations.transformers.apply`` for HF models.
* ``vocab_parallel_cross_entropy``: the lm_head split along the vocabulary over a process group
  (Megatron-style column parallelism); no logits or weights are gathered.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from torch import Tensor

if TYPE_CHECKING:
    import torch.distributed as dist

from . import config
from .meta.vocab_parallel import SPEC as VOCAB_PARALLEL
from .ops import family
from .ops.linear_ce import linear_cross_entropy


class LinearCrossEntropyHead(nn.Linear):
    """An ``nn.Linear`` lm_head whose forward also takes the targets and then returns the memops loss.

    ``head(hidden)`` gives logits as ``nn.Linear`` does; ``head(hidden, target, **options)`` gives
    ``memops.linear_cross_entropy(hidden, head.weight, target, head.bias, **options)`` computed inside the
    module's forward, where FSDP2 has unsharded the weight.
    """

    def forward(self, input: Tensor, target: Tensor | None = None, **options) -> Tensor:
        if target is None:
            return super().forward(input)
        return linear_cross_entropy(input, self.weight, target, self.bias, **options)


def _dtensor_parts(weight, bias, input):
    """``(local weight, local bias, input, group, vocab_start, vocab_size)`` for a ``Shard(0)`` DTensor weight."""
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh = weight.device_mesh
    if mesh.ndim != 1 or tuple(weight.placements) != (Shard(0),):
        raise ValueError(
            f"a DTensor weight must be sharded as (Shard(0),) on a 1-D mesh, got {weight.placements} "
            f"on a {mesh.ndim}-D mesh"
        )
    _, offset = compute_local_shape_and_global_offset(weight.shape, mesh, weight.placements)
    if bias is not None:
        if not isinstance(bias, DTensor) or tuple(bias.placements) != (Shard(0),):
            raise ValueError("with a DTensor weight, bias must be a DTensor sharded as (Shard(0),) too")
        bias = bias.to_local()
    if isinstance(input, DTensor):
        if any(p != Replicate() for p in input.placements):
            raise ValueError(f"a DTensor input must be replicated, got {input.placements}")
        input = input.to_local()
    return weight.to_local(), bias, input, mesh.get_group(), int(offset[0]), int(weight.shape[0])


def _shard_layout(weight: Tensor, group) -> tuple[int, int]:
    """``(vocab_start, vocab_size)`` from every rank's shard row count, in rank order (one all-gather, read on
    the host: not in sync-free calls, which must be given the layout)."""
    from .ops.vocab_parallel import all_gather

    if config.is_sync_free(weight):
        raise ValueError(
            "vocab_parallel_cross_entropy: a sync-free call (memops.set_sync_free, CUDA-graph capture) cannot read "
            "the shard layout from the group; pass vocab_start and vocab_size"
        )
    rows = torch.tensor([weight.shape[0]], dtype=torch.int64, device=weight.device)
    sizes = all_gather(rows, group).tolist()
    rank = torch.distributed.get_rank(group)
    return int(sum(sizes[:rank])), int(sum(sizes))


def vocab_parallel_cross_entropy(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    *,
    group: dist.ProcessGroup | None = None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    num_items: int | float | Tensor | None = None,
    chunk_size: int | None = None,
    return_lse: bool = False,
    class_weight: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """``memops.linear_cross_entropy`` with ``weight`` (and ``bias``) split by rows over ``group``.

    Each rank passes the same ``input`` and ``target`` and its own ``[V_local, D]`` shard holding rows
    ``[vocab_start, vocab_start + V_local)`` of the full ``[vocab_size, D]`` weight (shards may be uneven).
    ``vocab_start``/``vocab_size`` default to the ranks' shards in rank order (one small all-gather read on
    the host; pass them explicitly inside ``torch.compile``d code and in sync-free calls).  ``weight`` may
    also be a DTensor sharded ``(Shard(0),)`` on a 1-D mesh (then ``group`` and the layout come from it).
    Every rank gets the full loss; the input gradient is the full one; the weight/bias gradients are the
    rank's shard's.  ``class_weight`` (F.cross_entropy's ``weight``) is sharded like the weight: this rank's
    ``[V_local]`` classes (a ``Shard(0)`` DTensor with a DTensor weight).
    """
    from torch.distributed.tensor import DTensor, Shard

    if isinstance(weight, DTensor):
        if group is not None or vocab_start is not None or vocab_size is not None:
            raise ValueError("with a DTensor weight, group / vocab_start / vocab_size come from its mesh")
        weight, bias, input, group, vocab_start, vocab_size = _dtensor_parts(weight, bias, input)
        if class_weight is not None:
            if not isinstance(class_weight, DTensor) or tuple(class_weight.placements) != (Shard(0),):
                raise ValueError("with a DTensor weight, class_weight must be a DTensor sharded as (Shard(0),) too")
            class_weight = class_weight.to_local()
    group = group if group is not None else torch.distributed.group.WORLD
    if (vocab_start is None) != (vocab_size is None):
        raise ValueError("pass both vocab_start and vocab_size, or neither")
    if vocab_start is None:
        vocab_start, vocab_size = _shard_layout(weight, group)
    loss, lse, _ = VOCAB_PARALLEL.call(
        input=input,
        weight=weight,
        target=target,
        bias=bias,
        num_items=num_items,
        class_weight=class_weight,
        vocab_start=vocab_start,
        vocab_size=vocab_size,
        group_name=group.group_name,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        logit_scale=logit_scale,
        chunk_size=chunk_size,
    )
    family.donate(loss)
    return (loss, lse) if return_lse else loss
