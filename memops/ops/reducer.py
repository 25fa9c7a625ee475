"""What a vocabulary-parallel call shares, whatever its family: the reducers, the collectives, the check that the
ranks' weight shards tile the vocabulary, and sequence-parallel gathering of the tokens.

:class:`Reducer` reduces a head's per-row statistics: :data:`LOCAL` for one process (nothing to reduce), a
:class:`GroupReducer` across a process group, once per chunk.  The chunk engine (``ops/engine.py``) and every
family's head take one (:func:`reducer_of`); the vocabulary-parallel ops (``ops/vocab_parallel.py``) pass a
group's.  :func:`sequence_parallel` wraps a family's forward and gradients for tokens split over the group
(:class:`Gathered` rows).  This module imports nothing from the families or the engine.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import config
from ..contract import Args
from ..rules import compute_dtype


class Reducer:
    """Per-row statistics of a head whose vocabulary is split over processes (``ops/vocab_parallel.py``).

    This one is for a single process: the head's weight is the whole vocabulary and there is nothing to
    reduce.  A group reducer all-reduces in place, once per chunk (``whole_chunk``: the head sees whole
    chunks): the row max (``max_``), the sums (``sum_``), and finds the first most likely token across
    the group (``first_argmax``)."""

    start = 0  # the first vocabulary row of this process's weight
    vocab: int | None = None  # the whole vocabulary's size (None: the weight's rows)
    rows_max: int | None = None  # the largest shard's rows, which every rank sizes its chunks for
    whole_chunk = False
    partial_input = False  # the input gradient left as this rank's part (``input_grad="partial"``), not summed

    def max_(self, *ts: torch.Tensor | None) -> None:
        pass

    def sum_(self, *ts: torch.Tensor | None) -> None:
        pass

    def first_argmax(self, z: torch.Tensor) -> torch.Tensor:
        """Per row of ``z``, the vocabulary index ``argmax`` gives (the first maximum; the first NaN)."""
        return z.argmax(dim=1)

    def owned(self, t: torch.Tensor, local: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(mask or None, index)``: which class indices ``t`` fall in this process's ``local`` rows (None:
        all of them), and their row there (0 elsewhere)."""
        return None, t

    def owned_valid(self, t: torch.Tensor, valid: torch.Tensor, local: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mask, index)`` of :meth:`owned` for the ``valid`` entries of ``t``: the mask is False and the index
        0 elsewhere (an ignored target owns no row)."""
        owned, idx = self.owned(torch.where(valid, t, 0), local)
        mine = valid if owned is None else valid & owned
        return mine, torch.where(mine, idx, 0)

    def vocab_of(self, weight: torch.Tensor) -> int:
        """The whole vocabulary's size: the group's, or ``weight``'s rows in one process."""
        return self.vocab or weight.shape[0]


LOCAL = Reducer()


def reducer_of(a) -> Reducer:
    """The call's reducer: :data:`LOCAL`, or its group's for a vocabulary-parallel op."""
    if getattr(a, "group_name", None) is None:
        return LOCAL
    return group_reducer(a)


def process_group(name: str):
    """The process group an op's ``group_name`` argument names."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)  # type: ignore[arg-type]  # GroupName is a str at run time


def all_reduce(t: Tensor, op: str, group) -> Tensor:
    """Functional all-reduce.  A sum in batch-invariant mode (``config.set_batch_invariant``) is
    :func:`ordered_sum`'s: the backend's all-reduce adds the ranks' values in an order that may depend on an
    element's position in the tensor (ring algorithms: its segment), so on the batch."""
    import torch.distributed._functional_collectives as funcol

    if op == "sum" and config.invariant_rows(t.device) is not None:
        return ordered_sum(t, group)
    out = funcol.all_reduce(t, op, group)
    return out.wait() if hasattr(out, "wait") else out


def ordered_sum(t: Tensor, group) -> Tensor:
    """The ranks' ``t`` summed in rank order, ``((t_0 + t_1) + t_2) + ...``, on every rank (one all-gather):
    the same bits for an element wherever it sits and whatever else the tensor holds."""
    parts = all_gather(t.reshape(1, -1), group)
    out = parts[0].clone()
    for part in parts[1:]:
        out.add_(part)
    return out.view(t.shape)


def all_gather(t: Tensor, group) -> Tensor:
    """Functional all-gather along dim 0 (``all_gather_single`` where the build has it)."""
    import torch.distributed._functional_collectives as funcol

    gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
    out = gather(t, 0, group)
    return out.wait() if hasattr(out, "wait") else out


# (group name, vocab_size) -> this rank's (vocab_start, rows, the largest shard's rows) once every rank's
# slice was checked to tile the vocabulary: later calls with the same slice skip the all-gather.  A rank
# whose slice changes checks again; every rank must then change together (a lone change leaves the others
# waiting in their next collective until the process group's timeout).
_TILED: dict[tuple[str, int], tuple[int, int, int]] = {}


class GroupReducer(Reducer):
    """A head's per-row statistics reduced across ``group``: once per chunk (the head sees whole chunks)."""

    whole_chunk = True

    def __init__(self, group, start: int, vocab: int, rows_max: int, partial_input: bool = False):
        self.group, self.start, self.vocab, self.rows_max = group, start, vocab, rows_max
        self.partial_input = partial_input

    def _reduce_(self, op: str, ts) -> None:
        ts = [t for t in ts if t is not None]
        if not ts:
            return
        if len(ts) == 1:
            ts[0].copy_(all_reduce(ts[0], op, self.group))
            return
        flat = all_reduce(torch.cat([t.reshape(-1) for t in ts]), op, self.group)
        for t, r in zip(ts, flat.split([t.numel() for t in ts])):
            t.copy_(r.view(t.shape))

    def max_(self, *ts: Tensor | None) -> None:
        self._reduce_("max", ts)

    def sum_(self, *ts: Tensor | None) -> None:
        self._reduce_("sum", ts)

    def first_argmax(self, z: Tensor) -> Tensor:
        # argmax over the whole vocabulary: the first NaN if any rank's row holds one, else the first maximum
        idx = z.argmax(dim=1)
        v = z.gather(1, idx.unsqueeze(1)).squeeze(1)
        nan = v.isnan()
        top, any_nan = torch.where(nan, torch.inf, v), nan.to(v.dtype)
        self.max_(top, any_nan)
        win = torch.where(any_nan > 0, nan, (v == top) & ~nan)
        return all_reduce(torch.where(win, idx + self.start, int(self.vocab or 0)), "min", self.group)

    def owned(self, t: Tensor, local: int) -> tuple[Tensor | None, Tensor]:
        mine = (t >= self.start) & (t < self.start + local)
        return mine, torch.where(mine, t - self.start, 0)


def group_reducer(a: Args) -> GroupReducer:
    """The group's reducer, after checking (once per group, vocabulary size and slice) that the ranks'
    ``[start, start + rows)`` tile ``[0, vocab_size)``."""
    group, local = process_group(a.group_name), a.weight.shape[0]
    known = _TILED.get((a.group_name, a.vocab_size))
    if known is None or known[:2] != (a.vocab_start, local):
        rows_max = _check_tiling(group, a.vocab_start, a.vocab_size, local, a.input.device)
        known = _TILED[a.group_name, a.vocab_size] = (a.vocab_start, local, rows_max)
    return GroupReducer(group, a.vocab_start, a.vocab_size, known[2], a.input_grad == "partial")


def _check_tiling(group, vocab_start: int, vocab_size: int, local: int, device) -> int:
    """Check that the ranks' slices tile the vocabulary; the largest shard's rows (every rank plans its
    chunks for it, so that all run the same chunks; ``vocab_size`` where the check stays on the device)."""
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
        return vocab_size
    everyone = gathered.tolist()
    spans = sorted((s, s + n) for s, n, _ in everyone)
    sizes = {v for _, _, v in everyone}
    tiles = spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:])) and spans[-1][1] in sizes
    if len(sizes) != 1 or not tiles:
        raise ValueError(
            f"vocab shards do not tile the vocabulary: (vocab_start, rows, vocab_size) per rank = "
            f"{everyone}; each rank must hold a distinct contiguous slice and all must agree on "
            "vocab_size = the total rows"
        )
    return max(n for _, n, _ in everyone)


# ---- sequence parallelism ----------------------------------------------------------------------------


def broadcast(t: Tensor, src: int, group, async_op: bool = False):
    import torch.distributed as dist

    return dist.broadcast(t, src=dist.get_global_rank(group, src), group=group, async_op=async_op)


def reduce_to(t: Tensor, dst: int, group) -> None:
    """The group's ``t`` summed into rank ``dst``'s (in batch-invariant mode in rank order, on every rank)."""
    import torch.distributed as dist

    if config.invariant_rows(t.device) is not None:
        t.copy_(ordered_sum(t, group))
        return
    dist.reduce(t, dst=dist.get_global_rank(group, dst), op=dist.ReduceOp.SUM, group=group)


# start each sequence-parallel chunk's broadcasts before the previous chunk's work (``python -m memops bench
# --tp`` turns it off to measure what the overlap buys)
PREFETCH = True


class Gathered:
    """The rows of a sequence-parallel input: rank ``r`` of ``group`` holds ``sizes[r]`` of them (``local``),
    the group's rows being rank 0's, then rank 1's, ...  The chunk engine reads them one chunk at a time
    (:meth:`rows`: each rank overlapping the chunk broadcasts its part; the next chunk's broadcasts are
    started before the current chunk's work, to overlap where the backend runs them in the background) and
    returns each chunk's input gradient to the rows' owners (:meth:`give_grad`: one reduce per owner).
    The whole ``[N, D]`` never exists on any rank unless it is one chunk."""

    gathered = True
    is_cuda = False

    def __init__(self, local: Tensor, group, sizes: list[int], local_shape):
        self.local, self.group, self.sizes = local, group, sizes
        self.offsets = [sum(sizes[:r]) for r in range(len(sizes))]
        self.rank = torch.distributed.get_rank(group)
        self.shape = (sum(sizes), local.shape[1])
        self.local_shape = tuple(local_shape)
        self.dtype, self.device, self.is_cuda = local.dtype, local.device, local.is_cuda
        self._buffers: list[Tensor] = []
        self._pending: tuple | None = None  # (start, stop, buffer, works) of a chunk already on its way

    def reshape(self, n: int, d: int) -> Gathered:
        if (n, d) != self.shape:
            raise ValueError(f"sequence-parallel rows are [{self.shape[0]}, {self.shape[1]}], not [{n}, {d}]")
        return self

    def pieces(self, start: int, stop: int):
        """``(rank, lo, hi)``: the part of rows ``[start, stop)`` each rank holds."""
        for r, (off, n) in enumerate(zip(self.offsets, self.sizes)):
            lo, hi = max(start, off), min(stop, off + n)
            if lo < hi:
                yield r, lo, hi

    def _start(self, start: int, stop: int, slot: int):
        while len(self._buffers) <= slot:
            self._buffers.append(torch.empty((stop - start, self.shape[1]), dtype=self.dtype, device=self.device))
        buf = self._buffers[slot]
        if buf.shape[0] < stop - start:
            buf = self._buffers[slot] = torch.empty((stop - start, self.shape[1]), dtype=self.dtype, device=self.device)
        buf = buf[: stop - start]
        works = []
        for r, lo, hi in self.pieces(start, stop):
            part = buf[lo - start : hi - start]
            if r == self.rank:
                off = self.offsets[r]
                part.copy_(self.local[lo - off : hi - off])
            works.append(broadcast(part, r, self.group, async_op=True))
        return start, stop, buf, works

    def rows(self, start: int, stop: int, size: int) -> Tensor:
        """Rows ``[start, stop)`` of the group's input, on every rank; starts fetching ``[stop, stop + size)``."""
        pending, self._pending = self._pending, None
        if pending is None or pending[:2] != (start, stop):
            for w in pending[3] if pending else ():
                w.wait()
            pending = self._start(start, stop, 0)
        _, _, buf, works = pending
        for w in works:
            w.wait()
        if PREFETCH and stop < self.shape[0]:  # the next chunk's broadcasts, into the other buffer
            slot = 1 if buf.data_ptr() == self._buffers[0].data_ptr() else 0
            self._pending = self._start(stop, min(stop + size, self.shape[0]), slot)
        return buf

    def give_grad(self, start: int, stop: int, part: Tensor, out: Tensor) -> None:
        """Sum rows ``[start, stop)`` of the group's partial input gradients ``part`` into their owners'
        ``out`` (this rank's ``[sizes[rank], D]`` input gradient)."""
        for r, lo, hi in self.pieces(start, stop):
            piece = part[lo - start : hi - start]
            reduce_to(piece, r, self.group)
            if r == self.rank:
                off = self.offsets[r]
                out[lo - off : hi - off].copy_(piece)

    def finish(self) -> None:
        """Wait for a fetch still on its way (the last chunk's, when a caller stopped early)."""
        pending, self._pending = self._pending, None
        for w in pending[3] if pending else ():
            w.wait()


def token_sizes(n: int, group, device) -> list[int]:
    """Every rank's token count, in rank order: one all-gather, read on the host.  Sync-free (CUDA-graph
    capture, ``memops.set_sync_free``) nothing is read: every rank must hold ``n`` tokens, which a device-side
    assert checks."""
    counts = all_gather(torch.full((1,), n, dtype=torch.int64, device=device), group)
    if config.is_sync_free(counts):
        torch._assert_async(
            (counts == n).all(),
            "memops: sync-free sequence parallelism needs the same token count on every rank of the group",
        )
        return [n] * torch.distributed.get_world_size(group)
    return [int(v) for v in counts.tolist()]


def gather_tokens(t: Tensor, group, sizes: list[int]) -> Tensor:
    """The group's per-token tensor from each rank's ``t [sizes[rank], ...]``: ``[sum(sizes), ...]``, rank 0's
    rows first (one all-gather; uneven sizes padded to the largest)."""
    most = max(sizes)
    if t.shape[0] < most:
        t = torch.cat([t, t.new_zeros((most - t.shape[0], *t.shape[1:]))])
    every = all_gather(t.contiguous(), group).view(len(sizes), most, *t.shape[1:])
    return torch.cat([every[r, :n] for r, n in enumerate(sizes)])


def _same_width(ids: Tensor, group) -> Tensor:
    """``sampling_mask`` rows ``[n, K]`` (int64) padded with -1 to the group's largest ``K``, so that the ranks'
    rows gather: one all-gather of the widths, read on the host.  Sync-free every rank must hold the same
    ``K``, which a device-side assert checks."""
    k = ids.shape[1]
    widths = all_gather(torch.full((1,), k, dtype=torch.int64, device=ids.device), group)
    if config.is_sync_free(widths):
        torch._assert_async(
            (widths == k).all(), "memops: sync-free sequence parallelism needs the same sampling_mask K on every rank"
        )
        return ids
    most = int(widths.max())
    return ids if most == k else torch.cat([ids, ids.new_full((ids.shape[0], most - k), -1)], dim=1)


# inputs holding one row per token (hidden states: gathered one chunk at a time; the rest: whole, once per call)
_ROW_INPUTS = ("input", "teacher_input")
_PER_TOKEN = (
    "target",
    "token_weight",
    "advantages",
    "old_logprobs",
    "ref_logprobs",
    "entropy_weight",
    "teacher_topk_ids",
    "teacher_topk_logprobs",
    "sampling_mask",
    "token_temperature",
)


def _whole(a: Args):
    """The group's call from this rank's: per-token tensors gathered (flattened to one row per token),
    hidden states as :class:`Gathered` rows; with this rank's first token and token count."""
    group, n = process_group(a.group_name), a.target.numel()
    sizes = token_sizes(n, group, a.input.device)
    lead = a.target.dim()
    values = {}
    for name in _PER_TOKEN:
        t = getattr(a, name, None)
        if t is not None:
            rows = t.reshape((n, *t.shape[lead:]))
            if name == "sampling_mask":  # each rank's own K (and id dtype)
                rows = _same_width(rows.long(), group)
            values[name] = gather_tokens(rows, group, sizes)
    for name in _ROW_INPUTS:
        t = getattr(a, name, None)
        if t is not None:
            values[name] = Gathered(t.reshape(n, t.shape[-1]), group, sizes, t.shape)  # type: ignore[assignment]
    return a.replace(**values), sum(sizes[: torch.distributed.get_rank(group)]), n


def _per_token(name: str, a: Args) -> bool:
    """Whether output ``name`` of this call has one value per token (else a scalar or an empty placeholder)."""
    if name == "loss":
        return getattr(a, "reduction", None) == "none"
    return name in ("logprobs", "lse") or bool(getattr(a, "return_" + name, False))


def sequence_parallel(spec, forward, gradients):
    """``spec``'s forward and recompute functions for a call whose ``sequence_parallel`` may be set: then they
    run on the group's tokens (:func:`_whole`) and per-token outputs come back as this rank's tokens'."""

    def done(whole: Args) -> None:
        for name in _ROW_INPUTS:
            rows = getattr(whole, name, None)
            if rows is not None:
                rows.finish()

    def fwd(a: Args, need: list):
        if not a.sequence_parallel:
            return forward(a, need)
        whole, off, n = _whole(a)
        outs, grads = forward(whole, need)
        done(whole)
        outs = tuple(
            o[off : off + n].reshape(a.target.shape) if _per_token(name, a) else o
            for name, o in zip(spec.outputs, outs)
        )
        return outs, grads

    def grad(a: Args, grad_outputs: list, need: list):
        if not a.sequence_parallel:
            return gradients(a, grad_outputs, need)
        whole, _, n = _whole(a)
        group = process_group(a.group_name)
        # every rank takes the same path: which incoming gradients exist anywhere in the group (sync-free: the
        # same ones on every rank, as in a captured graph every rank replays)
        have = [g is not None for g in grad_outputs]
        if not config.is_sync_free(a.input):
            flags = torch.tensor(have, dtype=torch.int64, device=a.input.device)
            have = all_reduce(flags, "max", group).tolist()
        names = [name for name in spec.outputs if name in spec.differentiable]
        cdt = compute_dtype(a.input.dtype)
        full = []
        for name, g, any_g in zip(names, grad_outputs, have):
            if not any_g or not _per_token(name, a):
                full.append(g)
                continue
            g = torch.zeros(a.target.shape, dtype=cdt, device=a.input.device) if g is None else g
            full.append(gather_tokens(g.reshape(n), group, whole.input.sizes))
        out = gradients(whole, full, need)
        done(whole)
        return out

    return fwd, grad
