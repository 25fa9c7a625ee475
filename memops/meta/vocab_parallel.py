"""The vocabulary-parallel ops declared: each single-process family's inputs, outputs and shape rules, with
``weight`` and ``bias`` this rank's rows ``[vocab_start, vocab_start + V_local)`` of a ``vocab_size``-row
projection (their gradients are the shard's), ``group_name`` the process group, ``sequence_parallel``
whether ``input`` (and every per-token tensor) holds this rank's tokens only (outputs then this rank's
tokens' too; a reduced loss is the whole group's) and ``input_grad`` whether the input gradient is summed over
the group (``"reduced"``) or left as this rank's part (``"partial"``: for a caller whose own autograd sums it,
as Megatron's gather of sequence-parallel hidden states does in its backward).

* ``memops::vocab_parallel_ce``: ``memops::linear_ce``'s class-index form (no ``all_lse``/``is_top1``);
* ``memops::vocab_parallel_logprobs``, ``memops::vocab_parallel_grpo``, ``memops::vocab_parallel_distill``,
  ``memops::vocab_parallel_mtp_ce``: ``linear_logprobs``', ``linear_grpo``'s, ``linear_distill``'s and
  ``linear_mtp_ce``'s, every option (multi-token prediction without ``sequence_parallel``).
"""

from __future__ import annotations

import dataclasses

import torch

from .. import validation as V
from ..contract import Option, Spec, register
from . import distill, grpo, linear_ce, logprobs, mtp
from .linear_ce import CE_INPUTS, CE_OPTIONS, PRECISION, loss_and_rows


def check_shard(a) -> None:
    """This rank's weight rows ``[vocab_start, vocab_start + V_local)`` lie in ``[0, vocab_size)``."""
    if not (0 <= a.vocab_start and a.vocab_start + a.weight.shape[0] <= a.vocab_size):
        V.fail(
            f"this rank's weight shard rows [{a.vocab_start}, {a.vocab_start + a.weight.shape[0]}) must lie in "
            f"[0, vocab_size={a.vocab_size})"
        )


def check_ce(a) -> None:
    """``memops::vocab_parallel_ce``: the CE checks, with ``weight`` (and ``class_weight``) holding rows
    ``[vocab_start, vocab_start + V_local)`` of a ``vocab_size``-row weight; class-index targets."""
    if isinstance(a.target, torch.Tensor) and a.target.is_floating_point():
        V.fail("vocab_parallel_cross_entropy takes class-index targets (int64/int32), not probabilities")
    linear_ce.check(a)


def parallel_check(base):
    """A single-process family's checks for its vocabulary-parallel op: ``weight`` (and ``bias``) this rank's
    rows of a ``vocab_size``-row projection; an online distillation teacher sharded the same way or whole
    (replicated: every rank passes all ``vocab_size`` rows)."""

    def check(a) -> None:
        tw = getattr(a, "teacher_weight", None)
        local = a.weight.shape[0] if isinstance(a.weight, torch.Tensor) and a.weight.dim() == 2 else None
        if isinstance(tw, torch.Tensor) and tw.dim() == 2 and local is not None and tw.shape[0] == a.vocab_size:
            tb = a.teacher_bias
            a = a.replace(teacher_weight=tw[:local], teacher_bias=None if tb is None else tb[:local])
        base(a)
        check_shard(a)
        if a.input_grad not in INPUT_GRADS:
            V.fail(f"input_grad must be one of {INPUT_GRADS}, got {a.input_grad!r}")
        if a.sequence_parallel and a.input_grad == "partial":
            V.fail(
                "input_grad='partial' is for replicated hidden states; with sequence_parallel=True each rank's "
                "input gradient is its own tokens' (input_grad='reduced')"
            )
        if a.sequence_parallel and getattr(a, "importance_sampling_level", "token") == "sequence":
            V.fail(
                "importance_sampling_level='sequence' (GSPO) is not offered with sequence_parallel=True: a "
                "sequence's importance weight needs all of its log-probabilities in one chunk pass; use "
                "sequence_parallel=False (hidden states replicated over the group)"
            )

    return check


# "reduced": each rank's input gradient is the group's sum (the gradient of its replicated input);
# "partial": this rank's shard's part only, the sum left to the caller's autograd (one all-reduce fewer)
INPUT_GRADS = ("reduced", "partial")

PARALLEL = (
    Option("vocab_start", "int", None),
    Option("vocab_size", "int", None),
    Option("group_name", "str", None),
    Option("sequence_parallel", "bool", False),
    Option("input_grad", "str", "reduced"),
)

SPEC = register(
    Spec(
        name="vocab_parallel_ce",
        inputs=CE_INPUTS,
        options=(*PARALLEL, *CE_OPTIONS, PRECISION),
        outputs=("loss", "lse"),
        shapes=loss_and_rows,
        check=parallel_check(check_ce),
    )
)


def _parallel(spec: Spec) -> Spec:
    return register(
        dataclasses.replace(
            spec,
            name="vocab_parallel_" + spec.name.removeprefix("linear_"),
            options=(*PARALLEL, *spec.options),
            check=parallel_check(spec.check),
        )
    )


LOGPROBS = _parallel(logprobs.LOGPROBS)
GRPO = _parallel(grpo.GRPO)
DISTILL = _parallel(distill.SPEC)
MTP = _parallel(mtp.SPEC)

_PARALLEL_OF = {
    "linear_ce": SPEC,
    "linear_logprobs": LOGPROBS,
    "linear_grpo": GRPO,
    "linear_distill": DISTILL,
    "linear_mtp_ce": MTP,
}


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a vocabulary-parallel call's rows live: this rank's weight rows ``[vocab_start, vocab_start +
    V_local)`` of ``vocab_size``, the group, whether the tokens are split over it too, and whether the input
    gradient is summed over the group or left as this rank's part."""

    group_name: str
    vocab_start: int
    vocab_size: int
    sequence_parallel: bool = False
    input_grad: str = "reduced"

    def options(self) -> dict:
        # by hand: dynamo of torch 2.9-2.11 cannot trace dataclasses.asdict (its deepcopy)
        return {
            "group_name": self.group_name,
            "vocab_start": self.vocab_start,
            "vocab_size": self.vocab_size,
            "sequence_parallel": self.sequence_parallel,
            "input_grad": self.input_grad,
        }


def resolve(spec: Spec, layout: Layout | None) -> tuple[Spec, dict]:
    """The op a front end calls, and the options it adds: ``spec`` itself in one process, else its
    vocabulary-parallel op with ``layout``'s options."""
    if layout is None:
        return spec, {}
    return _PARALLEL_OF[spec.name], layout.options()
