"""memops in torchtitan: the causal-LM loss computed from the hidden states and the ``lm_head``, chunk by chunk,
by memops (no logits of the whole batch, nor of a sequence chunk, are kept for the backward).

From torchtitan's command line (any model whose loss is torchtitan's cross-entropy, or DeepSeek-V3's
multi-token-prediction ``MTPLoss``: :class:`MemopsMTPLoss`)::

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


class _MemopsLoss(ChunkedLossWrapper):
    """What memops' torchtitan losses share: a ``ChunkedLossWrapper`` (the trainer sets the ``lm_head`` and the
    model returns hidden states) with memops' options from its config."""

    def __init__(self, config: Any, *, compile_config: CompileConfig | None = None):
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


class MemopsCrossEntropy(_MemopsLoss):
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


class MemopsMTPLoss(_MemopsLoss):
    """torchtitan's DeepSeek-V3 multi-token-prediction loss (``MTPLoss``: the main depth's summed
    cross-entropy plus ``mtp_scale`` times the MTP depths' mean, over ``global_valid_tokens``; labels rolled per
    depth within packed documents) computed by memops in one call from the depths' hidden states
    (``memops.linear_mtp_cross_entropy``: one pass over the head for every depth, no logits).  The model's
    ``MTPDecoder`` returns its depths' hidden states when the trainer skips its ``lm_head`` (see
    :func:`_mtp_hidden_states`)."""

    @dataclass(kw_only=True, slots=True)
    class Config(MemopsCrossEntropy.Config):
        mtp_scale: float = 0.3
        """The MTP depths' weight: ``loss = main + mtp_scale * mean(MTP depths)`` (torchtitan's ``MTPLoss``)."""

    def __init__(self, config: Config, *, compile_config: CompileConfig | None = None):
        super().__init__(config, compile_config=compile_config)
        _install_mtp_hidden_states()

    def __call__(
        self,
        pred: list[torch.Tensor],
        labels: torch.Tensor,
        global_valid_tokens: torch.Tensor | None = None,
        **loss_inputs: Any,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        positions = loss_inputs.get("positions")
        if not isinstance(pred, (list, tuple)) or len(pred) < 2:
            raise ValueError(
                "MemopsMTPLoss expects the main depth's hidden states followed by one per MTP layer (a list of at "
                f"least 2), got {type(pred).__name__}"
            )
        if self.lm_head is None:
            raise RuntimeError("MemopsMTPLoss: set_lm_head(model.lm_head) must be called before the loss")
        loss = call_as_forward(self.lm_head, self._summed, list(pred), labels, positions)
        if global_valid_tokens is not None:
            loss = loss / global_valid_tokens
        return loss, {}

    def _summed(self, depths: list, labels: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        head = self.lm_head
        weight, bias = head.weight, getattr(head, "bias", None)
        mtp = len(depths) - 1
        length = labels.shape[1]
        hiddens = torch.stack([h[:, :length] for h in depths])
        options = dict(
            self.options,
            ignore_index=IGNORE_INDEX,
            reduction="sum",
            # labels are shifted by one already: the main depth reads them as they are, MTP depth k rolled by k
            shifts=tuple(range(mtp + 1)),
            depth_weights=[1.0] + [self.config.mtp_scale / mtp] * mtp,
            position_ids=None if positions is None else positions[:, :length],
        )
        if isinstance(weight, DTensor) or isinstance(hiddens, DTensor):
            raise ValueError(
                "MemopsMTPLoss: tensor parallelism of the lm_head is not supported with multi-token prediction "
                "(torchtitan's MTP layers under TP are untested here); use FSDP / data parallelism"
            )
        _check_whole_head(weight, self.config.global_vocab_size)
        loss, _ = memops.linear_mtp_cross_entropy(hiddens, weight, labels, bias, **options)
        return cast(torch.Tensor, loss)


def _mtp_hidden_states(forward):
    """``MTPDecoder.forward`` that, when the trainer skips the ``lm_head`` (a ``ChunkedLossWrapper`` loss: memops'),
    returns the depths' hidden states: the forward runs with no head, which torchtitan's ``MTPDecoder`` answers
    with the states themselves (with the head skipped it raises).  Any other call is unchanged."""
    import functools

    @functools.wraps(forward)
    def patched(self, *args, **kwargs):
        if not (getattr(self, "_skip_lm_head", False) and getattr(self, "mtp_layers", None) is not None):
            return forward(self, *args, **kwargs)
        head = self.lm_head
        self._skip_lm_head, self.lm_head = False, None
        try:
            return forward(self, *args, **kwargs)
        finally:
            self._skip_lm_head, self.lm_head = True, head

    patched.memops = True  # type: ignore[attr-defined]
    return patched


def _install_mtp_hidden_states() -> None:
    from torchtitan.models.deepseek_v3.mtp import MTPDecoder

    if not getattr(MTPDecoder.forward, "memops", False):
        MTPDecoder.forward = _mtp_hidden_states(MTPDecoder.forward)  # type: ignore[method-assign]


@override(
    target=BaseLoss.Config,
    fqns=["loss"],
    description="memops: the cross-entropy from hidden states and lm_head, chunked, no logits kept",
)
def memops_cross_entropy(cfg: BaseLoss.Config, **options: Any) -> MemopsCrossEntropy.Config:
    """The trainer's loss config replaced by memops' (``options``: fields of ``MemopsCrossEntropy.Config``):
    torchtitan's cross-entropy (or a ``ChunkedLossWrapper`` of it) by :class:`MemopsCrossEntropy`, its
    DeepSeek-V3 ``MTPLoss`` by :class:`MemopsMTPLoss`."""
    if isinstance(cfg, MemopsCrossEntropy.Config):
        return cfg
    from torchtitan.models.deepseek_v3.mtp import MTPLoss

    if type(cfg) is MTPLoss.Config:  # DeepSeek-V3's multi-token prediction: every depth in one memops call
        return MemopsMTPLoss.Config(global_vocab_size=cfg.global_vocab_size, mtp_scale=cfg.mtp_scale, **options)
    inner = cfg.loss_fn if type(cfg) is ChunkedLossWrapper.Config else cfg
    if type(inner) is not CrossEntropyLoss.Config:
        raise ValueError(
            f"memops_cross_entropy replaces torchtitan's cross-entropy loss, not {type(inner).__qualname__}: "
            "remove the override for this loss"
        )
    return MemopsCrossEntropy.Config(global_vocab_size=inner.global_vocab_size, **options)
