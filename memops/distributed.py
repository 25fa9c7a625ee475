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
from .meta.vocab_parallel import Layout
from .ops import family
from .ops.distill import linear_distillation_loss
from .ops.grpo import linear_grpo_loss
from .ops.linear_ce import linear_cross_entropy
from .ops.logprobs import linear_logprobs
from .ops.mtp import linear_mtp_cross_entropy


class LinearCrossEntropyHead(nn.Linear):
    """An ``nn.Linear`` lm_head whose forward also takes the targets and then returns the memops loss.

    ``head(hidden)`` gives logits as ``nn.Linear`` does; ``head(hidden, target, **options)`` gives
    ``memops.linear_cross_entropy(hidden, head.weight, target, head.bias, **options)`` computed inside the
    module's forward, where FSDP2 has unsharded the weight.
    """

    def forward(self, input: Tensor, target: Tensor | None = None, **options) -> Tensor | tuple[Tensor, ...]:  # type: ignore[override]  # noqa: E501
        if target is None:
            return super().forward(input)
        return linear_cross_entropy(input, self.weight, target, self.bias, **options)


class _Placed:
    """A call's DTensor arguments made local: the weight's tensor-parallel mesh dimension gives the group and
    the layout; a DTensor input's placements say whether the tokens are split (sequence parallelism) and
    how to wrap the outputs (:meth:`wrap`).  Any other placement is refused by name."""

    def __init__(self, weight, bias):
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        self.mesh, placements = weight.device_mesh, tuple(weight.placements)
        tp = [d for d, p in enumerate(placements) if p == Shard(0)]
        if len(tp) != 1 or any(p != Replicate() for d, p in enumerate(placements) if d != tp[0]):
            raise ValueError(
                f"a DTensor weight must be sharded Shard(0) over the vocabulary on one mesh dimension and "
                f"Replicate() on the others, got placements {placements} on a {self.mesh.ndim}-D mesh"
            )
        self.tp, self.placements = tp[0], placements
        self.group = self.mesh.get_group(self.tp)
        _, offset = compute_local_shape_and_global_offset(weight.shape, self.mesh, placements)
        self.vocab_start, self.vocab_size = int(offset[0]), int(weight.shape[0])
        self.weight = weight.to_local()
        self.bias = self.sharded("bias", bias)
        self.input_placements = None  # set by input(): the outputs are DTensors then
        self.split_dims = None  # the leading token dimensions a DTensor may be sharded along (None: all)

    def sharded(self, name: str, t, whole_too: bool = False):
        """A tensor sharded like the weight (bias, class weights, a sharded teacher): its local rows; with
        ``whole_too`` a replicated DTensor is accepted as well (a whole teacher on every rank)."""
        from torch.distributed.tensor import DTensor, Replicate

        if t is None:
            return None
        whole = isinstance(t, DTensor) and all(p == Replicate() for p in t.placements) and t.device_mesh == self.mesh
        if whole_too and (whole or not isinstance(t, DTensor)):
            return t.to_local() if whole else t
        if not isinstance(t, DTensor) or tuple(t.placements) != self.placements or t.device_mesh != self.mesh:
            raise ValueError(f"with a DTensor weight, {name} must be a DTensor placed like it ({self.placements})")
        return t.to_local()

    def input(self, name: str, t, tokens_dims: int | None = None) -> tuple:
        """``(local tensor, sequence_parallel)`` of a per-token argument (``tokens_dims``: its leading token
        dimensions; the input's are all but the last)."""
        from torch.distributed.tensor import DTensor, Replicate, Shard

        if not isinstance(t, DTensor):
            return t, False
        if t.device_mesh != self.mesh:
            raise ValueError(f"a DTensor {name} must be on the weight's device mesh")
        dims = t.dim() - 1 if tokens_dims is None else tokens_dims
        if self.split_dims is not None:  # GRPO: each rank holds whole completions (Shard(0) of [B, T])
            dims = min(dims, self.split_dims)
        placements = tuple(t.placements)
        for d, p in enumerate(placements):
            if d == self.tp:
                if p != Replicate() and not (isinstance(p, Shard) and 0 <= p.dim < dims):
                    raise ValueError(
                        f"a DTensor {name} must be Replicate() or Shard(k) along a token dimension (k < {dims}) on "
                        f"the tensor-parallel mesh dimension, got {p!r}"
                    )
            elif p != Replicate():
                raise ValueError(
                    f"a DTensor {name} must be Replicate() on the mesh dimensions other than the tensor-parallel one "
                    f"(got {p!r} on dimension {d}); for data-parallel batches pass its local tensor ({name}.to_local())"
                )
        if self.input_placements is None:
            self.input_placements = placements
            self.token_shape = tuple(t.shape[:dims])  # the group's (global) token shape
        elif placements != self.input_placements:
            raise ValueError(f"a DTensor {name} must be placed like input ({self.input_placements}), got {placements}")
        return t.to_local(), placements[self.tp] != Replicate()

    def wrap(self, out):
        """The outputs as DTensors when the input was one: scalars replicated, per-token outputs placed like the
        input's tokens."""
        from torch.distributed.tensor import DTensor, Replicate

        if self.input_placements is None:
            return out
        if isinstance(out, dict):
            return {k: self.wrap(v) for k, v in out.items()}
        if isinstance(out, tuple):
            return tuple(self.wrap(v) for v in out)
        if not isinstance(out, Tensor):
            return out
        if out.dim() == 0:
            return DTensor.from_local(out, self.mesh, [Replicate()] * self.mesh.ndim, run_check=False)
        # uneven token shards: the global shape is the input's tokens', not the local one times the ranks
        shape = torch.Size(self.token_shape)
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(
            out, self.mesh, list(self.input_placements), run_check=False, shape=shape, stride=stride
        )


def _shard_layout(weight: Tensor, group) -> tuple[int, int]:
    """``(vocab_start, vocab_size)`` from every rank's shard row count, in rank order (one all-gather, read on
    the host: not in sync-free calls, which must be given the layout)."""
    from .ops.reducer import all_gather

    if config.is_sync_free(weight):
        raise ValueError(
            "vocab_parallel_*: a sync-free call (memops.set_sync_free, CUDA-graph capture) cannot read the shard "
            "layout from the group; pass vocab_start and vocab_size"
        )
    if torch.compiler.is_compiling():  # the host read of a collective's result cannot be traced (it hung)
        raise ValueError(
            "vocab_parallel_*: under torch.compile / torch.export the shard layout cannot be read from the group "
            "(a host read of an all-gather); pass vocab_start and vocab_size, or a DTensor weight"
        )
    rows = torch.tensor([weight.shape[0]], dtype=torch.int64, device=weight.device)
    sizes = all_gather(rows, group).tolist()
    rank = torch.distributed.get_rank(group)
    return int(sum(sizes[:rank])), int(sum(sizes))


def _layout(weight, group, vocab_start, vocab_size, sequence_parallel, input_grad) -> Layout:
    group = group if group is not None else torch.distributed.group.WORLD
    if (vocab_start is None) != (vocab_size is None):
        raise ValueError("pass both vocab_start and vocab_size, or neither")
    if vocab_start is None:
        vocab_start, vocab_size = _shard_layout(weight, group)
    return Layout(group.group_name, int(vocab_start), int(vocab_size), bool(sequence_parallel), input_grad)


def _parallel_call(
    weight,
    bias,
    group,
    vocab_start,
    vocab_size,
    sequence_parallel,
    input_grad,
    per_token: dict,
    sharded=(),
    split_dims=None,
):
    """``(placed or None, weight, bias, per-token tensors, sharded tensors, layout)`` of a vocabulary-parallel
    call: DTensors made local (group and layout from the weight's mesh), else the arguments as given."""
    from torch.distributed.tensor import DTensor

    if not isinstance(weight, DTensor):
        if any(isinstance(t, DTensor) for t in per_token.values()):
            raise ValueError("DTensor inputs need a DTensor weight (Shard(0) over the vocabulary)")
        layout = _layout(weight, group, vocab_start, vocab_size, sequence_parallel, input_grad)
        return None, weight, bias, per_token, dict(sharded), layout
    if group is not None or vocab_start is not None or vocab_size is not None:
        raise ValueError("with a DTensor weight, group / vocab_start / vocab_size come from its mesh")
    if input_grad != "reduced" and any(isinstance(t, DTensor) for t in per_token.values()):
        raise ValueError(
            "input_grad='partial' is for local hidden states whose caller sums the gradient parts; a DTensor "
            "input's gradient is placed like the input (input_grad='reduced')"
        )
    placed = _Placed(weight, bias)
    placed.split_dims = split_dims
    local, split = {}, set()
    first = next(iter(per_token), None)  # the projection's input (the front ends pass it first)
    for name, t in per_token.items():
        local[name], s = placed.input(name, t, None if name == first else _token_dims(per_token[first]))
        if t is not None and isinstance(t, DTensor):
            split.add(s)
    if len(split) > 1:
        raise ValueError("DTensor per-token arguments must all be replicated or all be sharded along the tokens")
    sp = bool(sequence_parallel) or split == {True}
    layout = Layout(placed.group.group_name, placed.vocab_start, placed.vocab_size, sp, input_grad)
    extra = {k: placed.sharded(k, v, whole_too=k.startswith("teacher")) for k, v in sharded}
    return placed, placed.weight, placed.bias, local, extra, layout


def _token_dims(x) -> int:
    """The token dimensions of a per-token argument: those of the input ``x`` but its last."""
    return x.dim() - 1


def vocab_parallel_cross_entropy(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    *,
    group: dist.ProcessGroup | None = None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    sequence_parallel: bool = False,
    input_grad: str = "reduced",
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    num_items: int | float | Tensor | None = None,
    chunk_size: int | None = None,
    precision: str | None = None,
    return_lse: bool = False,
    class_weight: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """``memops.linear_cross_entropy`` with ``weight`` (and ``bias``) split by rows over ``group``.

    Each rank passes its own ``[V_local, D]`` shard holding rows ``[vocab_start, vocab_start + V_local)`` of
    the full ``[vocab_size, D]`` weight (shards may be uneven) and the same ``input`` and ``target``; with
    ``sequence_parallel=True`` its own tokens' ``input`` and ``target`` instead (Megatron's sequence
    parallelism: the group's tokens are rank 0's, then rank 1's, ...; per-token outputs and the input
    gradient come back as this rank's tokens', a reduced loss is the group's).
    ``vocab_start``/``vocab_size`` default to the ranks' shards in rank order (one small all-gather read on
    the host; pass them explicitly inside ``torch.compile``d code and in sync-free calls).  ``input_grad``:
    ``"reduced"`` (default) gives each rank the group's input gradient (the gradient of its replicated input);
    ``"partial"`` leaves this rank's shard's part, for a caller whose autograd sums the parts itself (Megatron's
    ``gather_from_sequence_parallel_region`` reduce-scatters in its backward: the parts summed once there, and one
    all-reduce fewer here); refused with ``sequence_parallel=True``.  ``weight`` may
    also be a DTensor sharded ``Shard(0)`` on one mesh dimension (then ``group`` and the layout come from
    it; ``input`` may be a DTensor too, replicated or sharded along its tokens, and the outputs are then
    DTensors).  Every rank gets the full loss; the weight/bias gradients are the rank's shard's.
    ``class_weight`` (F.cross_entropy's ``weight``) is sharded like the weight: this rank's ``[V_local]``
    classes (placed like the weight with a DTensor weight).
    """
    placed, weight, bias, tokens, sharded, layout = _parallel_call(
        weight,
        bias,
        group,
        vocab_start,
        vocab_size,
        sequence_parallel,
        input_grad,
        {"input": input, "target": target},
        {"class_weight": class_weight}.items(),
    )
    loss, lse, _ = VOCAB_PARALLEL.call(
        **layout.options(),
        input=tokens["input"],
        weight=weight,
        target=tokens["target"],
        bias=bias,
        num_items=num_items,
        class_weight=sharded["class_weight"],
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        logit_scale=logit_scale,
        chunk_size=chunk_size,
        precision=config.precision_of(precision),
    )
    family.donate(loss)
    out = (loss, lse) if return_lse else loss
    return out if placed is None else placed.wrap(out)


_PARALLEL_KEYWORDS = ("group", "vocab_start", "vocab_size", "sequence_parallel", "input_grad")


def _parallel_front(
    single, name: str, projection: tuple[str, str, str], per_token: tuple[str, ...], sharded=(), split_dims=None
):
    """``memops.distributed.<name>``: ``single`` (a single-process front end) with the vocabulary split over a
    group.  Its keywords are ``single``'s plus ``group`` / ``vocab_start`` / ``vocab_size`` /
    ``sequence_parallel`` / ``input_grad``; ``projection`` names ``single``'s input, weight and bias arguments,
    ``per_token`` its per-token tensors (made local from DTensors), ``sharded`` the tensors sharded like the weight."""
    import functools
    import inspect

    sig = inspect.signature(single)
    names = list(sig.parameters)
    x_name, w_name, b_name = projection

    @functools.wraps(single)
    def front(
        *args, group=None, vocab_start=None, vocab_size=None, sequence_parallel=False, input_grad="reduced", **kwargs
    ):
        bound = sig.bind_partial(*args, **kwargs)
        values = dict(bound.arguments)
        tokens = {k: values.get(k) for k in (x_name, *per_token)}
        extra = {k: values.get(k) for k in sharded}
        placed, weight, bias, tokens, extra, layout = _parallel_call(
            values[w_name],
            values.get(b_name),
            group,
            vocab_start,
            vocab_size,
            sequence_parallel,
            input_grad,
            tokens,
            extra.items(),
            split_dims,
        )
        values.update({w_name: weight, b_name: bias, **{k: v for k, v in tokens.items() if k in values}})
        values.update({k: v for k, v in extra.items() if k in values})
        out = single(**values, _parallel=layout)
        return out if placed is None else placed.wrap(out)

    params = [p for p in sig.parameters.values() if p.name != "_parallel"]
    keyword = inspect.Parameter.KEYWORD_ONLY
    added = [
        inspect.Parameter("group", keyword, default=None, annotation="dist.ProcessGroup | None"),
        inspect.Parameter("vocab_start", keyword, default=None, annotation="int | None"),
        inspect.Parameter("vocab_size", keyword, default=None, annotation="int | None"),
        inspect.Parameter("sequence_parallel", keyword, default=False, annotation="bool"),
        inspect.Parameter("input_grad", keyword, default="reduced", annotation="str"),
    ]
    front.__signature__ = sig.replace(parameters=params + added)  # type: ignore[attr-defined]
    front.__name__ = front.__qualname__ = name
    front.__doc__ = (
        f"``memops.{single.__name__}`` with the vocabulary split over ``group`` (see "
        "``vocab_parallel_cross_entropy`` for the layout, ``sequence_parallel``, ``input_grad`` and DTensor "
        "arguments): every "
        f"keyword of ``{single.__name__}``, plus ``{'`` / ``'.join(_PARALLEL_KEYWORDS)}``.\n\n" + (single.__doc__ or "")
    )
    assert names[:2] == [x_name, w_name], names  # the projection comes first
    return front


vocab_parallel_logprobs = _parallel_front(
    linear_logprobs, "vocab_parallel_logprobs", ("input", "weight", "bias"), ("target",)
)
vocab_parallel_grpo_loss = _parallel_front(
    linear_grpo_loss,
    "vocab_parallel_grpo_loss",
    ("input", "weight", "bias"),
    ("completion_ids", "completion_mask", "advantages", "old_logprobs", "ref_logprobs"),
    split_dims=1,
)
vocab_parallel_distillation_loss = _parallel_front(
    linear_distillation_loss,
    "vocab_parallel_distillation_loss",
    ("student_input", "student_weight", "student_bias"),
    ("target", "teacher_input", "teacher_topk_ids", "teacher_topk_logprobs"),
    ("teacher_weight", "teacher_bias"),
)


def _local_tokens(front):
    """``front`` refusing DTensor hidden states and targets (a DTensor weight is fine): its per-depth outputs
    have no token layout to place as DTensors."""
    import functools

    @functools.wraps(front)
    def call(hiddens, weight, target, *args, **kwargs):
        from torch.distributed.tensor import DTensor

        for name, t in (("hiddens", hiddens), ("target", target), ("position_ids", kwargs.get("position_ids"))):
            if isinstance(t, DTensor) or (isinstance(t, (list, tuple)) and any(isinstance(h, DTensor) for h in t)):
                raise ValueError(
                    f"vocab_parallel_mtp_cross_entropy takes local {name} (every rank the same tokens), not a "
                    f"DTensor: pass {name}.to_local() of a replicated one (the weight may be a DTensor)"
                )
        return front(hiddens, weight, target, *args, **kwargs)

    return call


vocab_parallel_mtp_cross_entropy = _local_tokens(
    _parallel_front(linear_mtp_cross_entropy, "vocab_parallel_mtp_cross_entropy", ("hiddens", "weight", "bias"), ())
)
