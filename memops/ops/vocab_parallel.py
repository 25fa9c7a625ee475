"""``memops::vocab_parallel_ce``: cross-entropy with the output projection split along the vocabulary.

Each rank of a process group holds rows ``[vocab_start, vocab_start + V_local)`` of the ``[V, D]`` weight
(and bias); the input and target are replicated.  The chunk engine runs on the local shard; per chunk
the row max is all-reduced (max), then the sum of exponentials, the target logit and, for label
smoothing, the logit sum (one sum all-reduce), so every rank gets the full loss and logsumexp without
gathering logits or weights.  Each rank's weight/bias gradient is its shard's; the input gradient's
partial sums are all-reduced once per call.  Collectives are ``torch.distributed``'s functional ones on
the group named in the op's arguments.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import validation as V
from . import engine
from .linear_ce import Shard, _ce_chunks, register_ce_autograd


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


def _shard(group_name: str, vocab_start: int, vocab_size: int, local: int, device) -> Shard:
    """Check (once per group, vocabulary size and slice) that the ranks' ``[start, start + rows)`` tile
    ``[0, vocab_size)``; the group's reducers."""
    group = _group(group_name)
    if _TILED.get((group_name, vocab_size)) != (vocab_start, local):
        _check_tiling(group, vocab_start, vocab_size, local, device)
        _TILED[group_name, vocab_size] = (vocab_start, local)

    def max_(t):
        t.copy_(_all_reduce(t, "max", group))

    def sum_(ts):
        flat = _all_reduce(torch.stack(ts), "sum", group)
        for t, r in zip(ts, flat):
            t.copy_(r)

    return Shard(vocab_start, vocab_size, max_, sum_)


def _check_tiling(group, vocab_start: int, vocab_size: int, local: int, device) -> None:
    mine = torch.tensor([vocab_start, local, vocab_size], dtype=torch.int64, device=device)
    everyone = all_gather(mine, group).view(-1, 3).tolist()
    spans = sorted((s, s + n) for s, n, _ in everyone)
    sizes = {v for _, _, v in everyone}
    tiled = spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:])) and spans[-1][1] in sizes
    if len(sizes) != 1 or not tiled:
        raise ValueError(
            f"vocab shards do not tile the vocabulary: (vocab_start, rows, vocab_size) per rank = "
            f"{everyone}; each rank must hold a distinct contiguous slice and all must agree on "
            "vocab_size = the total rows"
        )


def _chunks(input, weight, target, bias, up, need, group_name, vocab_start, vocab_size, opts):
    x2d, t1d, _ = engine.flatten(input, target)
    shard = _shard(group_name, vocab_start, vocab_size, weight.shape[0], input.device)
    loss_rows, lse_rows, gx, gw, gb = _ce_chunks(x2d, weight, t1d, bias, up, need, shard=shard, **opts)
    if gx is not None:
        gx = _all_reduce(gx, "sum", _group(group_name))
    return loss_rows, lse_rows, gx, gw, gb


def _opts(ignore_index, label_smoothing, z_loss, softcap, logit_scale, chunk_size):
    return dict(
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        logit_scale=logit_scale,
        chunk_size=chunk_size,
    )


@torch.library.custom_op("memops::vocab_parallel_ce", mutates_args=())
def vocab_parallel_ce(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None,
    num_items: Tensor | None,
    vocab_start: int,
    vocab_size: int,
    group_name: str,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    logit_scale: float,
    chunk_size: int,
    grad_mask: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    V.check_vocab_parallel_ce(
        input,
        weight,
        target,
        bias,
        num_items,
        vocab_start,
        vocab_size,
        reduction,
        label_smoothing,
        z_loss,
        softcap,
        logit_scale,
        chunk_size,
    )
    V.check_target_range(target, vocab_size, ignore_index)
    cdt = engine.compute_dtype(input.dtype)
    t1d = target.reshape(-1)
    valid = t1d != ignore_index
    up, need = None, (False, False, False)
    if reduction != "none" and any(grad_mask):
        need, up = tuple(grad_mask), engine.upstream(None, reduction, valid, num_items, cdt)
    loss_rows, lse_rows, gx, gw, gb = _chunks(
        input,
        weight,
        target,
        bias,
        up,
        need,
        group_name,
        vocab_start,
        vocab_size,
        _opts(ignore_index, label_smoothing, z_loss, softcap, logit_scale, chunk_size),
    )
    loss = engine.reduce_rows(loss_rows, reduction, valid, num_items, target.shape)
    return (loss, lse_rows.view(target.shape)) + engine.grads_out(gx, gw, gb, input, weight, bias)


@torch.library.custom_op("memops::vocab_parallel_ce_backward", mutates_args=())
def vocab_parallel_ce_backward(
    grad_loss: Tensor,
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None,
    num_items: Tensor | None,
    saved_grad_input: Tensor,
    saved_grad_weight: Tensor,
    saved_grad_bias: Tensor,
    vocab_start: int,
    vocab_size: int,
    group_name: str,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    logit_scale: float,
    chunk_size: int,
    need: list[bool],
    have: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    V.check_vocab_parallel_ce(
        input,
        weight,
        target,
        bias,
        num_items,
        vocab_start,
        vocab_size,
        reduction,
        label_smoothing,
        z_loss,
        softcap,
        logit_scale,
        chunk_size,
    )
    cdt = engine.compute_dtype(input.dtype)
    out, missing = engine.scale_saved(
        grad_loss, (saved_grad_input, saved_grad_weight, saved_grad_bias), need, have, cdt
    )
    if any(missing):
        up = engine.upstream(grad_loss, reduction, target.reshape(-1) != ignore_index, num_items, cdt)
        _, _, gx, gw, gb = _chunks(
            input,
            weight,
            target,
            bias,
            up,
            missing,
            group_name,
            vocab_start,
            vocab_size,
            _opts(ignore_index, label_smoothing, z_loss, softcap, logit_scale, chunk_size),
        )
        fresh = engine.grads_out(gx, gw, gb, input, weight, bias)
        out = [f if m else o for o, f, m in zip(out, fresh, missing)]
    return tuple(engine.placeholder(input) if o is None else o for o in out)


register_ce_autograd("memops::vocab_parallel_ce", torch.ops.memops.vocab_parallel_ce_backward, reduction_at=9)
