"""memops in torchtitan: the causal-LM loss computed from the hidden states and the ``lm_head``, chunk by chunk,
by memops (no logits of the whole batch, nor of a sequence chunk, are kept for the backward).

From torchtitan's command line (any model whose loss is torchtitan's cross-entropy)::

    --override.imports memops.integrations.torchtitan.memops_cross_entropy

or in a config function: ``config.loss = MemopsCrossEntropy.Config()``.  The override replaces the trainer's
``loss`` (``CrossEntropyLoss`` or a ``ChunkedLossWrapper`` of it; anything else is refused by name).

torchtitan's contract: :class:`MemopsCrossEntropy` is a ``ChunkedLossWrapper``, so the trainer hands it the
model's ``lm_head`` (``set_lm_head``) and the model returns its final hidden states; a call
``loss_fn(hidden, labels, global_valid_tokens)`` returns ``(this rank's summed loss / global_valid_tokens, {})``
as torchtitan's own losses do, with ``ignore_index`` -100.  The loss is computed inside a call of the
``lm_head`` module, so FSDP2's hooks gather its weight for the forward and again for the backward, and
reduce-scatter its gradient; torchtitan's own tensor-parallel wrapper of the head (which would turn the output
into vocabulary-sharded logits) is bypassed for that call.  Under tensor parallelism the gathered weight is the
TP mesh's ``Shard(0)`` DTensor and the hidden states a ``Replicate()`` DTensor: the loss is then
``memops.distributed.vocab_parallel_cross_entropy`` (no logits or weights gathered across ranks).
Refused: ``parallelism.spmd_backend="spmd_types"`` with tensor parallelism (its head weight is a plain local
shard, indistinguishable from a whole head; untested here since that backend does not run with torch 2.13 on
CPU), and a plain weight whose rows are not the model's vocabulary.

This module imports torchtitan: users load it through torchtitan's override mechanism, never ``import memops``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from torchtitan.components.loss import IGNORE_INDEX, BaseLoss, ChunkedLossWrapper, CrossEntropyLoss
from torchtitan.config import CompileConfig
from torchtitan.config.override import override

import memops
import memops.distributed

from ._module_call import call_as_forward


class MemopsCrossEntropy(ChunkedLossWrapper):
    """torchtitan's cross-entropy (sum over the valid tokens / ``global_valid_tokens``) computed by memops from
    the hidden states and the ``lm_head`` the trainer sets."""

    @dataclass(kw_only=True, slots=True)
    class Config(BaseLoss.Config):
        global_vocab_size: int | None = None
        """The model's vocabulary (a plain head weight must have this many rows); None: not checked."""
        z_loss: float = 0.0
        """Weight of the squared log-normalizer added per token (0: torchtitan's loss)."""
        softcap: float | None = None
        """``softcap * tanh(logits / softcap)`` before the softmax, for models that cap their logits."""
        label_smoothing: float = 0.0
        chunk_size: int | None = None
        """Token rows per chunk; None: sized by memops from the memory each chunk needs."""
        precision: Literal["reference", "accurate"] | None = None
        """memops' precision mode; None: the process-wide setting."""

    def __init__(self, config: Config, *, compile_config: CompileConfig | None = None):
        # memops sizes its own chunks; torchtitan's per-chunk inner loss does not exist here
        del compile_config
        self.config = config
        self.num_chunks = None
        self.loss_fn = None
        self.lm_head: Any = None  # the model's, set by the trainer before the loss runs
        self.options = {
            "z_loss": config.z_loss,
            "softcap": config.softcap,
            "label_smoothing": config.label_smoothing,
            "chunk_size": config.chunk_size,
            "precision": config.precision,
        }

    def __call__(
        self,
        pred: torch.Tensor,
        labels: torch.Tensor,
        global_valid_tokens: torch.Tensor | None = None,
        **loss_inputs: Any,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        del loss_inputs  # positions etc.: the cross-entropy reads none of them (as torchtitan's own)
        if self.lm_head is None:
            raise RuntimeError("MemopsCrossEntropy: set_lm_head(model.lm_head) must be called before the loss")
        loss = call_as_forward(self.lm_head, self._summed, pred, labels)
        if global_valid_tokens is not None:
            loss = loss / global_valid_tokens
        return loss, {}

    def _summed(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """This rank's summed loss, run as the ``lm_head``'s forward (its weight gathered by FSDP2)."""
        from torch.distributed.tensor import DTensor

        head = self.lm_head
        weight, bias = head.weight, getattr(head, "bias", None)
        options = dict(self.options, ignore_index=IGNORE_INDEX, reduction="sum")
        if isinstance(weight, DTensor):
            loss = memops.distributed.vocab_parallel_cross_entropy(hidden, weight, labels, bias, **options)
            return cast(torch.Tensor, loss.to_local() if isinstance(loss, DTensor) else loss)
        _check_whole_head(weight, self.config.global_vocab_size)
        if isinstance(hidden, DTensor):
            raise ValueError(
                f"MemopsCrossEntropy: the hidden states are a DTensor ({hidden.placements}) but the lm_head weight "
                "is a plain tensor; give both as DTensors (tensor parallelism) or neither"
            )
        return cast(torch.Tensor, memops.linear_cross_entropy(hidden, weight, labels, bias, **options))


def _check_whole_head(weight: torch.Tensor, vocab_size: int | None) -> None:
    from torchtitan.distributed.spmd_types import spmd_mesh_size
    from torchtitan.distributed.utils import get_spmd_backend

    if get_spmd_backend() == "spmd_types" and spmd_mesh_size("tp") > 1:
        raise ValueError(
            "MemopsCrossEntropy: parallelism.spmd_backend='spmd_types' with tensor parallelism is not supported "
            "(the lm_head weight is a plain local shard there); use --parallelism.spmd_backend partial_dtensor"
        )
    if vocab_size is not None and weight.shape[0] != vocab_size:
        raise ValueError(
            f"MemopsCrossEntropy: the lm_head weight has {weight.shape[0]} rows but global_vocab_size is "
            f"{vocab_size}: a plain weight must be the whole head"
        )


@override(
    target=BaseLoss.Config,
    fqns=["loss"],
    description="memops: the cross-entropy from hidden states and lm_head, chunked, no logits kept",
)
def memops_cross_entropy(cfg: BaseLoss.Config, **options: Any) -> MemopsCrossEntropy.Config:
    """The trainer's loss config replaced by memops' (``options``: fields of ``MemopsCrossEntropy.Config``)."""
    if isinstance(cfg, MemopsCrossEntropy.Config):
        return cfg
    inner = cfg.loss_fn if type(cfg) is ChunkedLossWrapper.Config else cfg
    if type(inner) is not CrossEntropyLoss.Config:
        raise ValueError(
            f"memops_cross_entropy replaces torchtitan's cross-entropy loss, not {type(inner).__qualname__}: "
            "remove the override for this loss"
        )
    return MemopsCrossEntropy.Config(global_vocab_size=inner.global_vocab_size, **options)
