"""``memops::vocab_parallel_ce``: cross-entropy with the output projection split along the vocabulary.

Each rank of a process group holds rows ``[vocab_start, vocab_start + V_local)`` of the ``[V, D]`` weight
(and bias); the input and target are replicated.  The chunk engine runs on the local shard; per chunk
the row max is all-reduced (max), then the sum of exponentials, the target logit and, for label
smoothing, the logit sum (one sum all-reduce), so every rank gets the full loss and logsumexp without
gathering logits or weights.  Each rank's weight/bias gradient is its shard's; the input gradient's
partial sums are all-reduced once per call.  Collectives are ``torch.distributed``'s functional ones on
the group named in the op's arguments.

The CE head itself is ``linear_ce``'s (``ops/linear_ce.py``): it takes a :class:`GroupReducer`, which
does these reductions, where one process passes one that does nothing.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import config, validation
from ..contract import Args
from ..meta.vocab_parallel import SPEC
from . import engine, family
from .linear_ce import Reducer, _den, ce_chunks, target_weights


def _group(name: str):
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


def _all_reduce(t: Tensor, op: str, group) -> Tensor:
    import torch.distributed._functional_collectives as funcol

    out = funcol.all_reduce(t, op, group)
    return out.wait() if hasattr(out, "wait") else out


def all_gather(t: Tensor, group) -> Tensor:
    """Functional all-gather along dim 0 (``all_gather_single`` where the build has it)."""
    import torch.distributed._functional_collectives as funcol

    gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
    out = gather(t, 0, group)
    return out.wait() if hasattr(out, "wait") else out


# (group name, vocab_size) -> this rank's (vocab_start, rows) once every rank's slice was checked to tile the
# vocabulary: later calls with the same slice skip the all-gather.  A rank whose slice changes checks again;
# every rank must then change together (a lone change leaves the others waiting in their next collective
# until the process group's timeout).
_TILED: dict[tuple[str, int], tuple[int, int]] = {}


class GroupReducer(Reducer):
    """The CE head's statistics reduced across ``group``: once per chunk (the head sees whole chunks)."""

    whole_chunk = True

    def __init__(self, group, start: int, vocab: int):
        self.group, self.start, self.vocab = group, start, vocab

    def max_(self, t: Tensor) -> None:
        t.copy_(_all_reduce(t, "max", self.group))

    def sum_(self, *ts: Tensor | None) -> None:
        ts = [t for t in ts if t is not None]
        for t, r in zip(ts, _all_reduce(torch.stack(ts), "sum", self.group)):
            t.copy_(r)


def _reducer(a: Args) -> GroupReducer:
    """The group's reducer, after checking (once per group, vocabulary size and slice) that the ranks'
    ``[start, start + rows)`` tile ``[0, vocab_size)``."""
    group, local = _group(a.group_name), a.weight.shape[0]
    if _TILED.get((a.group_name, a.vocab_size)) != (a.vocab_start, local):
        _check_tiling(group, a.vocab_start, a.vocab_size, local, a.input.device)
        _TILED[a.group_name, a.vocab_size] = (a.vocab_start, local)
    return GroupReducer(group, a.vocab_start, a.vocab_size)


def _check_tiling(group, vocab_start: int, vocab_size: int, local: int, device) -> None:
    # filled on the device, not copied from the host: capturable
    mine = torch.stack([torch.full((), v, dtype=torch.int64, device=device) for v in (vocab_start, local, vocab_size)])
    gathered = all_gather(mine, group).view(-1, 3)
    if config.is_sync_free(mine):  # the same rule as a device-side assert
        start, rows, size = gathered.unbind(1)
        order = start.argsort()
        lo, hi = start[order], (start + rows)[order]
        tiled = (lo[0] == 0) & (hi[:-1] == lo[1:]).all() & (hi[-1] == size).all()
        torch._assert_async(
            tiled,
            "memops: vocab shards do not tile the vocabulary: each rank must hold a distinct contiguous slice and "
            "all must agree on vocab_size = the total rows",
        )
        return
    everyone = gathered.tolist()
    spans = sorted((s, s + n) for s, n, _ in everyone)
    sizes = {v for _, _, v in everyone}
    tiled = spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:])) and spans[-1][1] in sizes
    if len(sizes) != 1 or not tiled:
        raise ValueError(
            f"vocab shards do not tile the vocabulary: (vocab_start, rows, vocab_size) per rank = "
            f"{everyone}; each rank must hold a distinct contiguous slice and all must agree on "
            "vocab_size = the total rows"
        )


def _prepare(a: Args):
    """``(x2d, t1d, valid, reducer, class weights)`` of a call (every row on every rank: the ranks' rows must
    match for the collectives)."""
    x2d, t1d, _ = engine.flatten(a.input, a.target)
    valid = t1d != a.ignore_index
    reducer = _reducer(a)
    return x2d, t1d, valid, reducer, target_weights(a, t1d, valid, reducer)


def _chunks(a: Args, up, need, parts):
    x2d, t1d, valid, reducer, weights = parts
    loss_rows, lse_rows, gx, gw, gb, _ = ce_chunks(
        x2d, a.weight, t1d, a.bias, up, need, a, None, reducer, valid=valid, weights=weights
    )
    if gx is not None:
        gx = _all_reduce(gx, "sum", reducer.group)
    return loss_rows, lse_rows, gx, gw, gb


def _forward(a: Args, need: list) -> tuple:
    validation.check_target_range(a.target, a.vocab_size, a.ignore_index)
    cdt = engine.compute_dtype(a.input.dtype)
    parts = _prepare(a)
    valid, weights = parts[2], parts[4]
    den = _den(a, valid, weights[1], cdt) if a.reduction == "mean" else None
    up = engine.upstream(None, a.reduction, valid, a.num_items, cdt, den=den) if any(need) else None
    loss_rows, lse_rows, gx, gw, gb = _chunks(a, up, need, parts)
    loss = engine.reduce_rows(loss_rows, a.reduction, valid, a.num_items, a.target.shape, den=den)
    gx, gw, gb = engine.grads_out(gx, gw, gb, a.input, a.weight, a.bias)
    return (loss, lse_rows.view(a.target.shape)), [gx, gw, None, gb]  # class-index targets: no gradient


def _gradients(a: Args, grad_outputs: list, need: list) -> list:
    cdt = engine.compute_dtype(a.input.dtype)
    parts = _prepare(a)
    valid, weights = parts[2], parts[4]
    den = _den(a, valid, weights[1], cdt) if a.reduction == "mean" else None
    up = engine.upstream(grad_outputs[0], a.reduction, valid, a.num_items, cdt, den=den)
    *_, gx, gw, gb = _chunks(a, up, need, parts)
    gx, gw, gb = engine.grads_out(gx, gw, gb, a.input, a.weight, a.bias)
    return [gx, gw, None, gb]


family.implement(SPEC, _forward, _gradients)
