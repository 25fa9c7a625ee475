"""``memops::vocab_parallel_ce`` declared: ``memops::linear_ce``'s inputs, options and shape rules, with
``weight`` and ``bias`` this rank's rows ``[vocab_start, vocab_start + V_local)`` of a ``vocab_size``-row
projection (their gradients are the shard's) and ``group_name`` the process group."""

from __future__ import annotations

from .. import validation as V
from ..contract import Option, Spec, register
from .linear_ce import CE_INPUTS, CE_OPTIONS, loss_and_rows

SPEC = register(
    Spec(
        name="vocab_parallel_ce",
        inputs=CE_INPUTS,
        options=(
            Option("vocab_start", "int", None),
            Option("vocab_size", "int", None),
            Option("group_name", "str", None),
            *CE_OPTIONS,
        ),
        outputs=("loss", "lse"),
        shapes=loss_and_rows,
        check=V.check_vocab_parallel_ce,
    )
)
