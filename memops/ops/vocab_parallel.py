"""``memops::vocab_parallel_ce``: cross-entropy with the output projection split along the vocabulary.

Each rank of a process group holds rows ``[vocab_start, vocab_start + V_local)`` of the ``[V, D]`` weight
(and bias); the input and target are replicated.  The chunk engine runs on the local shard; per chunk
the row max is all-reduced (max), then the sum of exponentials, the target logit and, for label
smoothing, the logit sum (one sum all-reduce), so every rank gets the full loss and logsumexp without
gathering logits or weights.  Each rank's weight/bias gradient is its shard's; the input gradient's
partial sums are all-reduced once per call.  Collectives are ``torch.distributed``'s functional ones on
the group named in the op's arguments.

The CE head itself is ``linear_ce``'s (``ops/linear_ce.py``): it takes a :class:`GroupReducer`, which
does these reductions (``ops/reducer.py``), where one process passes one that does nothing.
"""

from __future__ import annotations

from .. import validation
from ..contract import Args
from ..meta.vocab_parallel import SPEC
from . import engine, family, linear_ce
from .reducer import group_reducer, sequence_parallel


def _prepare(a: Args):
    """``(x2d, t1d, valid, reducer, class weights)`` of a call (every row on every rank: the ranks' rows must
    match for the collectives)."""
    x2d, t1d, _ = engine.flatten(a.input, a.target)
    valid = t1d != a.ignore_index
    reducer = group_reducer(a)
    return x2d, t1d, valid, reducer, linear_ce.target_weights(a, t1d, valid, reducer)


def chunks(a: Args, up, need, parts):
    x2d, t1d, valid, reducer, weights = parts
    loss_rows, lse_rows, gx, gw, gb, _ = linear_ce.chunks(
        x2d, a.weight, t1d, a.bias, up, need, a, None, reducer, valid=valid, weights=weights
    )
    return loss_rows, lse_rows, gx, gw, gb


def forward(a: Args, need: list) -> tuple:
    validation.check_target_range(a.target, a.vocab_size, a.ignore_index)
    cdt = engine.compute_dtype(a.input.dtype)
    parts = _prepare(a)
    valid, weights = parts[2], parts[4]
    den = linear_ce.mean_divisor(a, valid, weights[1], cdt) if a.reduction == "mean" else None
    up = engine.upstream(None, a.reduction, valid, a.num_items, cdt, den=den) if any(need) else None
    loss_rows, lse_rows, gx, gw, gb = chunks(a, up, need, parts)
    loss = engine.reduce_rows(loss_rows, a.reduction, valid, a.num_items, a.target.shape, den=den)
    gx, gw, gb = engine.grads_out(gx, gw, gb, a.input, a.weight, a.bias)
    return (loss, lse_rows.view(a.target.shape)), [gx, gw, None, gb]  # class-index targets: no gradient


def gradients(a: Args, grad_outputs: list, need: list) -> list:
    cdt = engine.compute_dtype(a.input.dtype)
    parts = _prepare(a)
    valid, weights = parts[2], parts[4]
    den = linear_ce.mean_divisor(a, valid, weights[1], cdt) if a.reduction == "mean" else None
    up = engine.upstream(grad_outputs[0], a.reduction, valid, a.num_items, cdt, den=den)
    *_, gx, gw, gb = chunks(a, up, need, parts)
    gx, gw, gb = engine.grads_out(gx, gw, gb, a.input, a.weight, a.bias)
    return [gx, gw, None, gb]


def _implement() -> None:
    from ..meta import vocab_parallel as VP
    from . import distill, grpo, logprobs, mtp

    family.implement(SPEC, *sequence_parallel(SPEC, forward, gradients))
    family.implement(VP.LOGPROBS, *sequence_parallel(VP.LOGPROBS, logprobs.forward, logprobs.gradients))
    family.implement(VP.GRPO, *sequence_parallel(VP.GRPO, grpo.forward, grpo.gradients))
    family.implement(VP.DISTILL, *sequence_parallel(VP.DISTILL, distill.forward, distill.gradients))
    family.implement(VP.MTP, mtp.forward, mtp.gradients)  # no sequence parallelism (meta/mtp.py refuses it)


_implement()
