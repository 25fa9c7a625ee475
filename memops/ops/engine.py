"""The chunk engine shared by every op family.

``run`` walks the rows of ``input`` in chunks.  For each chunk it builds that
chunk's logits (``logit_scale * (x @ W.T + b)``, optionally soft-capped) in
the compute dtype (fp32, or fp64 for fp64 inputs) and hands them to a *head*,
the op family's per-chunk loss.  A head writes its per-row outputs and, when
gradients are wanted, returns ``d(loss)/d(logits)`` for the chunk (already
multiplied by each row's upstream coefficient).  The engine chains that back
through soft-capping and scaling and accumulates the input, weight and bias
gradients: weight and bias in the compute dtype, input per chunk in its own
dtype.  Only ``[chunk, V]`` logits ever exist.

Call tree of a trained scalar loss (cross-entropy; every family alike)::

    memops.linear_cross_entropy          ops/linear_ce.py front end: SPEC.call (defaults, checks), donates
      torch.ops.memops.linear_ce         schema + fake kernel from the declaration in meta/linear_ce.py
                                         (plain eager: its autograd kernel called directly, family._eager_call)
        family.implement kernel          ops/family.py: bind arguments by name, validate, call forward
          forward -> plan.plan           ops/plan.py: which rows to compute (ignored targets), one sync
            chunks -> engine.run          this module: chunk loop, logits, chain rule, gradient matmuls
              head(z, rows)              chunks' head:   loss and d loss / d logits (the CE formula), or
                                         on CUDA triton_heads.ce: the same, with scaling, in one Triton kernel
      backward                           ops/family.py: donated gradients scaled in place, or
        torch.ops.memops.linear_ce_backward   scaled into new tensors / recomputed by gradients
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .. import config
from ..rules import compute_dtype
from .plan import rows_out
from .reducer import LOCAL, Reducer

# head(z, sel) -> dz or None.  ``z`` is a block of final logits in the compute dtype, ``sel`` the
# block's rows of the ``[N]`` per-row tensors (a slice, or an index tensor when rows are skipped:
# ``t[sel]`` and ``out[sel] = v`` work either way); the head may overwrite ``z`` and return it as ``dz``.
Head = Callable[[torch.Tensor, "slice | torch.Tensor"], torch.Tensor | None]


_FP32_OUT_GEMM: dict[str, str] = {}  # device type -> "addmm" | "mm" | "cast", probed once per process


def fp32_out_gemm(device: torch.device) -> str:
    """Which GEMM with low-precision operands and an fp32 result this build runs on ``device``, probed once
    per process and device type on 2x2 tensors:

    * ``"addmm"``: ``addmm(gw, a, b, out_dtype=fp32, out=gw)`` accumulates in place;
    * ``"mm"``: ``mm(a, b, out_dtype=fp32)`` only (releases before pytorch#167931, Nov 2025, reject an fp32
      ``self`` with bf16 operands in ``addmm``): each chunk's fp32 partial goes into one scratch buffer, then
      one add;
    * ``"cast"``: no ``out_dtype`` at all (torch < 2.8): each chunk's partial is rounded to the operands'
      dtype before the fp32 add (less accurate; warned once).
    """
    kind = _FP32_OUT_GEMM.get(device.type)
    if kind is None:
        a = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
        acc = torch.zeros(2, 2, dtype=torch.float32, device=device)
        kind = "cast"
        try:
            torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
            kind = "addmm"
        except (TypeError, RuntimeError, NotImplementedError):
            try:
                torch.mm(a, a, out_dtype=torch.float32, out=acc)
                kind = "mm"
            except (TypeError, RuntimeError, NotImplementedError):
                pass
        if kind != "addmm":
            import warnings

            warnings.warn(
                f"memops: torch {torch.__version__} on {device.type} has no in-place fp32-output addmm for "
                + (
                    "bf16 operands: weight-gradient partials go through one fp32 scratch buffer"
                    if kind == "mm"
                    else "low-precision operands (no out_dtype): each chunk's weight-gradient partial is rounded "
                    "to bf16/fp16 before its fp32 sum; torch >= 2.8 avoids this"
                ),
                stacklevel=3,
            )
        _FP32_OUT_GEMM[device.type] = kind
    return kind


# CPU native low-precision GEMMs: a chunk of fewer rows computes its weight-gradient partial in fp32 (cheap at
# that size) rather than rounding it to bf16 / fp16 before the fp32 sum
EXACT_PARTIAL_ROWS = 256


def _accumulate_weight_grad(
    gw: torch.Tensor, dz: torch.Tensor, xc: torch.Tensor, first: bool, scratch: list | None = None, native=True
) -> None:
    """``gw (+)= dz.T @ xc`` (``first``: overwrite) with ``gw`` and the sum kept in the compute dtype.

    Native low-precision GEMMs (``config.native_gemm``) take ``dz`` in ``xc``'s dtype (cast once per chunk by
    the caller, or written so by a fused head).  Off the CPU a GEMM with an fp32 result accumulates into
    ``gw`` (:func:`fp32_out_gemm` says how; ``scratch`` holds the one fp32 buffer of its ``"mm"`` way across
    chunks); on CPU (no fp32-output low-precision GEMM) with ``native`` each chunk's partial comes out in the
    input dtype, into one ``scratch`` buffer, and is summed in fp32.  Otherwise (fp32 GEMMs on CPU) both
    operands are upcast per chunk.
    """
    if xc.dtype == gw.dtype and dz.dtype == gw.dtype:
        if first:
            torch.mm(dz.t(), xc, out=gw)
        else:
            gw.addmm_(dz.t(), xc)
        return
    if scratch is None:
        scratch = []
    if xc.device.type != "cpu":
        dzt = dz.t() if dz.dtype == xc.dtype else dz.t().to(xc.dtype)
        kind = fp32_out_gemm(xc.device)
        if kind == "addmm" or (kind == "mm" and first):
            if first:
                torch.mm(dzt, xc, out_dtype=gw.dtype, out=gw)
            else:
                torch.addmm(gw, dzt, xc, out_dtype=gw.dtype, out=gw)
        elif kind == "mm":
            if not scratch:
                scratch.append(torch.empty_like(gw))
            torch.mm(dzt, xc, out_dtype=gw.dtype, out=scratch[0])
            gw.add_(scratch[0])
        elif first:
            gw.copy_(torch.mm(dzt, xc))
        else:
            gw.add_(torch.mm(dzt, xc))
        return
    if native and dz.dtype == xc.dtype and xc.shape[0] < EXACT_PARTIAL_ROWS:
        # CPU, native, a small chunk: its partial in fp32 (operands upcast: chunk-sized), so that many small
        # chunks do not round one bf16 partial each (beyond 1.5x the unfused code's error, tests/test_bf16.py)
        if first:
            torch.mm(dz.t().to(gw.dtype), xc.to(gw.dtype), out=gw)
        else:
            gw.addmm_(dz.t().to(gw.dtype), xc.to(gw.dtype))
        return
    if native and dz.dtype == xc.dtype:  # CPU, native: the partial in the input dtype, summed in fp32
        if not scratch:
            scratch.append(torch.empty(gw.shape, dtype=xc.dtype, device=xc.device))
        torch.mm(dz.t(), xc, out=scratch[0])
        if first:
            gw.copy_(scratch[0])
        else:
            gw.add_(scratch[0])
        return
    # CPU without fast low-precision GEMMs: chunk-sized upcasts, fp32 GEMMs
    dzt = dz.t().to(gw.dtype)
    if first:
        torch.mm(dzt, xc.to(gw.dtype), out=gw)
    else:
        gw.addmm_(dzt, xc.to(gw.dtype))


def _input_grad(dz: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> None:
    """``out = dz @ weight``.

    ``dz`` in the weight's dtype (native low-precision GEMMs, ``config.native_gemm``): one GEMM, as in the
    unfused code.  An fp32 ``dz`` with a low-precision weight (CPU without fast low-precision GEMMs): the
    weight is upcast one vocab block at a time and the result rounded once.
    """
    if dz.dtype == weight.dtype:
        if out.dtype == dz.dtype:
            torch.mm(dz, weight, out=out)
        else:  # accurate mode: fp32 GEMMs on upcast operands, the input gradient rounded once
            out.copy_(torch.mm(dz, weight))
        return
    if weight.device.type != "cpu":
        torch.mm(dz.to(weight.dtype), weight, out=out)
        return
    vocab, hidden = weight.shape
    block = max(1, (16 << 20) // max(hidden * dz.element_size(), 1))
    acc = torch.zeros(out.shape, dtype=dz.dtype, device=dz.device)
    for lo in range(0, vocab, block):
        acc.addmm_(dz[:, lo : lo + block], weight[lo : lo + block].to(dz.dtype))
    out.copy_(acc)


def _sub_rows(rows: int, vocab: int, elem: int, device: torch.device, sub_block_bytes: int | None) -> int:
    """Rows per sub-block for the elementwise work.

    Default: cache-sized (4 MiB) on CPU, the whole chunk on GPUs; a head whose
    work keeps several intermediates alive (autograd through a transform) asks
    for ``sub_block_bytes`` instead.
    """
    if sub_block_bytes is None:
        if device.type != "cpu":
            return rows
        sub_block_bytes = 4 << 20
    return max(1, min(rows, sub_block_bytes // max(vocab * elem, 1)))


def _sub_blocks(
    z, sel, start: int, contiguous: bool, sub: int, head: Head, logit_scale: float, softcap, work=None, gb=None
) -> bool:
    """The torch heads' elementwise work on a chunk ``z`` (rows ``sel``), ``sub`` rows at a time: scale and
    soft-cap the logits, call the head, chain its ``dz`` back through both, in place.  Whether every call
    returned a gradient.

    ``work`` (fp32, ``sub`` rows): ``z`` holds the chunk in the input dtype; each sub-block is upcast into
    ``work``, worked on there and written back to ``z`` as ``dz``, its rows' sum added to ``gb`` (the bias
    gradient) when given."""
    grads = True
    rows = z.shape[0]
    for lo in range(0, rows, sub):
        block = z if (lo == 0 and sub >= rows) else z[lo : lo + sub]
        zs = block if work is None else work[: block.shape[0]]
        if work is not None:
            zs.copy_(block)
        if logit_scale != 1.0:
            zs.mul_(logit_scale)
        slope = None
        if softcap is not None:
            zs.div_(softcap).tanh_()
            slope = zs.square().neg_().add_(1.0)  # d softcap(u) / du = 1 - tanh^2
            zs.mul_(softcap)
        part = slice(start + lo, start + lo + zs.shape[0]) if contiguous else sel[lo : lo + zs.shape[0]]
        dz = head(zs, part)
        if dz is None:
            grads = False
            continue
        if dz is not zs:
            zs.copy_(dz)
        if slope is not None:
            zs.mul_(slope)
        if logit_scale != 1.0:
            zs.mul_(logit_scale)
        if work is not None:
            if gb is not None:
                gb.add_(zs.sum(0))
            block.copy_(zs)
    return grads


@dataclass(frozen=True)
class Decisions:
    """What one ``run`` call does, decided once from its arguments (PyTorch's fused cross-entropy builds its
    per-call context the same way); the chunk loop only reads these.

    * ``compute_dtype``: fp32, or fp64 for fp64 inputs: the head's math and the weight and bias gradients.
    * ``native_gemms``: the gradient GEMMs read ``dz`` in the input dtype (``config.native_gemm``: fast
      low-precision GEMMs on this device), never an fp32 copy of the weight.
    * ``accurate``: ``precision="accurate"`` with low-precision inputs: the logits are kept in fp32 from the GEMM.
    * ``upcast_weight``: accurate mode where no fp32-output low-precision GEMM exists (CPU, or a build without
      one): the weight and bias are upcast once per call, each chunk's rows per chunk, and all three GEMMs
      run in fp32.
    * ``fp32_blocks``: CPU with native low-precision GEMMs and a torch head: the chunk's logits stay in the
      input dtype and each cache-sized sub-block is upcast into one fp32 scratch, worked on there and written
      back as ``dz`` (a fused head's layout, its passes over memory in cache).
    * ``input_dtype_buffer``: the chunk buffer holds the input dtype (a fused head in the default precision,
      or ``fp32_blocks``); else the compute dtype.
    * ``one_gemm_each``: one chunk of every row, GEMMs in the compute dtype, no autocast: the logits and the
      input and weight gradients are the GEMMs' own results (no buffer made first: a per-call cost at small
      shapes; autocast would change the dtype of a GEMM that allocates its result, not of one that writes
      into a buffer).
    * ``chunk_rows``: rows per chunk (``config.chunk_rows``; every rank of a vocabulary-parallel group sizes
      its chunks for the largest shard, so that all run the same chunks); ``sub_rows``: rows per sub-block of
      the elementwise work (the whole chunk for a fused head, or one whose statistics must cover it).
    * ``invariant``: batch-invariant mode (``config.set_batch_invariant``): every chunk's GEMMs have
      ``chunk_rows`` rows, the last chunk's input padded with zero rows (and its ``dz`` zeroed there), and a
      torch head's sub-blocks are single rows (a vocabulary-parallel head's too: its collectives then run per
      row, their sums in rank order, ``reducer.ordered_sum``), so a row's results never depend on the batch.
    """

    compute_dtype: torch.dtype
    native_gemms: bool
    accurate: bool
    upcast_weight: bool
    fp32_blocks: bool
    input_dtype_buffer: bool
    one_gemm_each: bool
    chunk_rows: int
    sub_rows: int
    invariant: bool

    @classmethod
    def build(
        cls,
        x2d,
        weight: torch.Tensor,
        computed_rows: int,
        *,
        every_row: bool,
        fused: bool,
        reducer: Reducer,
        accurate: bool,
        chunk_size: int,
        sub_block_bytes: int | None,
    ) -> Decisions:
        cdt = compute_dtype(x2d.dtype)
        low_precision = x2d.dtype != cdt
        accurate = accurate and low_precision
        upcast_weight = accurate and (x2d.device.type == "cpu" or fp32_out_gemm(x2d.device) == "cast")
        native = config.native_gemm(x2d.dtype, x2d.device) and not upcast_weight
        fp32_blocks = (
            native
            and not fused
            and not accurate
            and x2d.device.type == "cpu"
            and low_precision
            and not reducer.whole_chunk
        )
        input_dtype_buffer = (fused and not accurate) or fp32_blocks
        vocab, hidden = weight.shape
        size = config.chunk_rows(
            computed_rows,
            reducer.rows_max or vocab,
            hidden,
            x2d.dtype,
            x2d.device,
            chunk_size,
            fused=input_dtype_buffer,
        )
        invariant = config.invariant_rows(x2d.device) is not None
        if fused or (reducer.whole_chunk and not invariant):  # a vocabulary-parallel head: one collective a chunk
            sub = size
        elif invariant:  # each row's elementwise work and reductions on a [1, V] block, alike everywhere
            sub = 1
        else:
            sub = _sub_rows(size, vocab, cdt.itemsize, x2d.device, sub_block_bytes)
        return cls(
            compute_dtype=cdt,
            native_gemms=native,
            accurate=accurate,
            upcast_weight=upcast_weight,
            fp32_blocks=fp32_blocks,
            input_dtype_buffer=input_dtype_buffer,
            one_gemm_each=(
                not invariant
                and size >= computed_rows
                and every_row
                and not low_precision
                and not input_dtype_buffer
                and not torch._C._is_any_autocast_enabled()
            ),
            chunk_rows=size,
            sub_rows=sub,
            invariant=invariant,
        )


def padded_to(rows: torch.Tensor, size: int) -> torch.Tensor:
    """A chunk's input rows (``run``'s, and those of a second projection of them: distillation's teacher) in
    batch-invariant mode: padded with zero rows to the chunk's ``size``, so that every GEMM's shape is fixed."""
    if rows.shape[0] >= size or config.invariant_rows(rows.device) is None:
        return rows
    out = rows.new_zeros((size,) + tuple(rows.shape[1:]))
    out[: rows.shape[0]] = rows
    return out


def _logits_into(z, xc, weight, bias, weight_c, bias_c, how: Decisions) -> torch.Tensor:
    """One chunk's logits ``xc @ W.T + b``: into ``z`` (the chunk buffer), or the GEMM's own result."""
    if how.one_gemm_each:
        return torch.mm(xc, weight_c.t()) if bias_c is None else torch.addmm(bias_c, xc, weight_c.t())
    if how.accurate and not how.upcast_weight:  # the logits in fp32 from a low-precision GEMM
        torch.mm(xc, weight.t(), out_dtype=how.compute_dtype, out=z)
        if bias is not None:
            z.add_(bias)
    elif xc.dtype != z.dtype:
        z.copy_(F.linear(xc, weight, bias))
    elif bias_c is not None:
        torch.addmm(bias_c, xc, weight_c.t(), out=z)
    else:
        torch.mm(xc, weight_c.t(), out=z)
    return z


def run(
    x2d: Any,  # a Tensor, or a sequence-parallel group's rows (ops/reducer.Gathered)
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    head: Head,
    *,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    chunk_size: int = 0,
    grad_input: bool = False,
    grad_weight: bool = False,
    grad_bias: bool = False,
    sub_block_bytes: int | None = None,
    rows: torch.Tensor | None = None,
    chunk_start: Callable[[slice | torch.Tensor], None] | None = None,
    fused: bool = False,
    reducer: Reducer = LOCAL,
    accurate: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Run ``head`` over ``x2d [N, D]`` in row chunks; return (grad_input, grad_weight, grad_bias).

    ``rows`` (sorted indices, from ``plan.plan``) limits the work to those
    rows; the others get no head call and a zero input gradient.  One ``[rows, V]``
    buffer in the compute dtype is reused by every chunk.  The elementwise work
    (scaling, soft-capping, the head, the chain rule back through them) runs on
    cache-sized sub-blocks of it; the head may overwrite its block in place and
    return it as ``dz`` (another tensor is copied in).  The three gradients are
    ``None`` unless asked for; grad_input has ``x2d``'s dtype, grad_weight and
    grad_bias the compute dtype (callers cast at the end).  A head that returns
    ``None`` gets no gradient work.  ``chunk_start(sel)``, when given, is called
    with each chunk's rows before its sub-blocks (a second projection of the same
    rows, as distillation's teacher logits, is made there once per chunk).

    ``reducer``: a vocabulary-parallel head's group (``Reducer``): every rank sizes its chunks for the largest
    shard (so that all run the same chunks), the head gets whole chunks, and the input gradient's partial
    sums are summed across the group once per call.

    ``x2d`` may also be a sequence-parallel group's rows (``ops/reducer.Gathered``): each chunk's rows
    are gathered as the chunk starts and its input gradient sent back to the rows' owners; grad_input is
    then this rank's rows' (every row is computed: no ``rows``).

    ``accurate=True`` (``precision="accurate"``, low-precision inputs): the logits are kept in fp32 from the
    GEMM: on CPU (and where the build has no fp32-output low-precision GEMM) the weight and bias are upcast
    once per call and each chunk's rows per chunk, and all three GEMMs run in fp32; on CUDA the logits GEMM
    writes fp32 (``mm(out_dtype=float32)``) and the gradient GEMMs stay native, reading ``dz`` rounded once.
    A fused head then reads and writes the fp32 block.

    ``fused=True`` (a Triton head, ``ops/triton_heads.py``): the buffer has the input dtype (fp32 in accurate
    mode), the head gets each whole chunk as the GEMM wrote it and does the scaling and soft-capping itself
    (``logit_scale`` and ``softcap`` are not applied here), and the gradient GEMMs read its ``dz`` in that
    dtype.  What else is decided once per call is :class:`Decisions`.
    """
    n, d = x2d.shape
    m = n if rows is None else rows.numel()
    vocab = weight.shape[0]
    gathered = getattr(x2d, "gathered", False)
    how = Decisions.build(
        x2d,
        weight,
        m,
        every_row=rows is None and not gathered,
        fused=fused,
        reducer=reducer,
        accurate=accurate,
        chunk_size=chunk_size,
        sub_block_bytes=sub_block_bytes,
    )
    cdt, size, own = how.compute_dtype, how.chunk_rows, how.one_gemm_each
    want = grad_input or grad_weight or grad_bias
    weight_c = weight.to(cdt) if how.upcast_weight else weight
    bias_c = None if bias is None else (bias.to(cdt) if how.upcast_weight else bias)
    # input/weight gradients are written whole by the first chunk that computes them (no zero fill),
    # except the input gradient's skipped rows
    gx = gw = None
    gb = torch.zeros(vocab, dtype=cdt, device=weight.device) if (grad_bias and bias is not None) else None
    if grad_input and not own:
        gx = rows_out(x2d.local.shape if gathered else x2d.shape, x2d.dtype, x2d.device, rows)
    if grad_weight and not own:
        gw = torch.empty(weight.shape, dtype=cdt, device=weight.device)
    buf: Any = None
    if not own:
        buf = torch.empty((size, vocab), dtype=x2d.dtype if how.input_dtype_buffer else cdt, device=x2d.device)
    work = torch.empty((min(how.sub_rows, size), vocab), dtype=cdt, device=x2d.device) if how.fp32_blocks else None
    gx_part: Any = None  # with skipped rows a chunk's input gradient is made here, then scattered to its rows
    if grad_input and (rows is not None or gathered or how.invariant):
        gx_part = torch.empty((size, d), dtype=x2d.dtype, device=x2d.device)
    scratch: list = []  # the weight gradient's scratch, where the build needs one (_accumulate_weight_grad)
    written = False
    sel: slice | torch.Tensor
    picked: Any = None  # rows of a chunk that skips some
    for start in range(0, m, size):
        stop = min(start + size, m)
        if gathered:
            sel = slice(start, stop)
            xc = x2d.rows(start, stop, size)
        elif rows is None:
            sel = slice(start, stop)
            xc = x2d if (start == 0 and stop == n) else x2d[sel]
        else:
            sel = picked = rows[start:stop]
            xc = x2d.index_select(0, picked)
        real = stop - start
        short = how.invariant and real < size  # the GEMMs still take `size` rows: xc padded, dz zeroed there
        if short:
            xc = padded_to(xc, size)
        z = buf if (own or real == size or how.invariant) else buf[:real]
        if chunk_start is not None:
            chunk_start(sel)
        if how.upcast_weight:
            xc = xc.to(cdt)
        z = _logits_into(z, xc, weight, bias, weight_c, bias_c, how)
        zr = z[:real] if short else z  # the chunk's own rows, which the head sees
        if fused:  # the head scales, soft-caps and chains back itself
            grads = head(zr, sel) is not None
        elif how.fp32_blocks:
            grads = _sub_blocks(zr, sel, start, rows is None, how.sub_rows, head, logit_scale, softcap, work, gb)
        else:
            grads = _sub_blocks(zr, sel, start, rows is None, how.sub_rows, head, logit_scale, softcap)
        if not (grads and want):
            continue
        if short:
            z[real:].zero_()
        if gb is not None and not how.fp32_blocks:
            gb.add_(z.sum(0, dtype=cdt))
        dz = z
        if z.dtype != x2d.dtype and how.native_gemms:
            dz = z.to(x2d.dtype)  # the gradient GEMMs' operand, cast once for both
        if own:
            gx = torch.mm(dz, weight_c) if grad_input else None
            gw = torch.mm(dz.t(), xc) if grad_weight else None
        elif gx is not None and gx_part is None:  # every row, in place: straight into the chunk's rows of gx
            _input_grad(dz, weight_c, gx if (start == 0 and stop == n) else gx[sel])
        elif gx is not None:  # made in gx_part (batch-invariant: the GEMM's `size` rows), then sent where it goes
            _input_grad(dz, weight_c, gx_part if how.invariant else gx_part[:real])
            part = gx_part[:real]
            if gathered:
                x2d.give_grad(start, stop, part, gx)
            elif rows is None:
                gx[sel] = part
            else:
                gx.index_copy_(0, picked, part)
        if gw is not None and not own:
            native = how.native_gemms and not fused  # a fused head's CPU run keeps the GPU's fp32 partials
            _accumulate_weight_grad(gw, dz, xc, first=not written, scratch=scratch, native=native)
        written = True
    if not written:  # no rows, or a head that computed no gradient
        if own:
            gx = torch.zeros(x2d.shape, dtype=x2d.dtype, device=x2d.device) if grad_input else None
            gw = torch.zeros(weight.shape, dtype=cdt, device=weight.device) if grad_weight else None
        for g in (gx, gw):
            if g is not None:
                g.zero_()
    # sequence-parallel rows went back to their owners chunk by chunk; a partial input gradient is the caller's to sum
    if gx is not None and not gathered and not reducer.partial_input:
        reducer.sum_(gx)
    return gx, gw, gb


class RowOutputs:
    """A head's per-row outputs (``[N]`` each, one dtype), written block by block (``put(name, sel, value)``).
    The one writer of the families that have per-row outputs: a block that is every row (one chunk) hands its
    own tensor over, no copy; otherwise an output is made at its first write, zero-filled (``zeroed`` names,
    and every output when ``rows`` leaves rows out: :func:`plan.rows_out`).  ``outs[name]`` is the output,
    made as if written by no block when none wrote it."""

    def __init__(self, n: int, dtype: torch.dtype, device, rows: torch.Tensor | None = None, zeroed=()):
        self.n, self.dtype, self.device, self.rows, self.zeroed = n, dtype, device, rows, zeroed
        self.out: dict[str, torch.Tensor] = {}

    def whole(self, sel) -> bool:
        """Whether the block ``sel`` is every row (one chunk)."""
        return isinstance(sel, slice) and sel.start == 0 and sel.stop == self.n

    def pick(self, t: torch.Tensor, sel) -> torch.Tensor:
        """Rows ``sel`` of a per-row tensor (itself when the block is every row)."""
        return t if self.whole(sel) else t[sel]

    def new(self, name: str) -> torch.Tensor:
        """Output ``name`` made before any write (a fused head writes it itself)."""
        if name in self.zeroed:
            t = torch.zeros(self.n, dtype=self.dtype, device=self.device)
        else:
            t = rows_out(self.n, self.dtype, self.device, self.rows)
        self.out[name] = t
        return t

    def put(self, name: str, sel, value: torch.Tensor) -> None:
        """Output ``name``'s rows ``sel`` = ``value`` (a tensor of the head's own)."""
        rows_of = self.out.get(name)
        if rows_of is None:
            if self.whole(sel):
                self.out[name] = value if value.dtype == self.dtype else value.to(self.dtype)
                return
            rows_of = self.new(name)
        rows_of[sel] = value

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.out[name] if name in self.out else self.new(name)


# ---- reductions shared by the op families ---------------------------------------------------------


def scalar_on(value, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 0-dim ``dtype`` tensor on ``device`` holding ``value`` (a number or a 0-dim tensor), made without a
    host-to-device copy: a CPU tensor's value is read on the host (no device sync) and filled in, so the call
    stays capturable in a CUDA graph (which then replays the value it was captured with; a tensor on
    ``device`` is read when the graph runs)."""
    if isinstance(value, torch.Tensor):
        if value.device == device:
            return value.to(dtype)
        if value.device.type == "cpu":
            value = value.item()
        else:
            return value.to(device=device, dtype=dtype)
    return torch.full((), value, dtype=dtype, device=device)


def denominator(valid: torch.Tensor, num_items: torch.Tensor | None, cdt: torch.dtype) -> torch.Tensor:
    """Divisor of ``reduction="mean"``: ``num_items`` when given, else the non-ignored row count."""
    if num_items is not None:
        return scalar_on(num_items, cdt, valid.device)
    # a count below 2**24 is exact in fp32 (summed in it at once), a larger one counted as an integer
    return valid.sum(dtype=cdt) if valid.numel() < (1 << 24) else valid.sum().to(cdt)


def reduce_rows(
    loss_rows: torch.Tensor,
    reduction: str,
    valid: torch.Tensor,
    num_items: torch.Tensor | None,
    shape,
    den: torch.Tensor | None = None,
) -> torch.Tensor:
    """The reduced loss.  The per-row losses are summed in float64 (N numbers: free next to a chunk) and
    rounded once: an fp32 sum of thousands of O(10) losses would add rounding of its own, as large as
    the bf16 logits' contribution to the loss error (``tests/test_bf16.py``).  ``den``: the caller's
    :func:`denominator`, when it has it."""
    if reduction == "none":
        return loss_rows.view(shape)
    total = loss_rows.sum(dtype=torch.float64).to(loss_rows.dtype)
    if reduction == "sum":
        return total
    return total / (denominator(valid, num_items, loss_rows.dtype) if den is None else den)


def upstream(
    grad_loss: torch.Tensor | None,
    reduction: str,
    valid: torch.Tensor,
    num_items: torch.Tensor | None,
    cdt: torch.dtype,
    den: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row (``"none"``) or shared factor on each row's d(loss)/d(logits).

    ``grad_loss=None`` means the forward pass of a scalar loss (incoming gradient 1); ``den``: the caller's
    :func:`denominator`, when it has it.
    """
    if reduction == "mean":
        den = denominator(valid, num_items, cdt) if den is None else den
        return den.reciprocal() if grad_loss is None else grad_loss.to(cdt) / den
    g = torch.ones((), dtype=cdt, device=valid.device) if grad_loss is None else grad_loss.to(cdt)
    return g.reshape(-1) if reduction == "none" else g


def row_coef(up: torch.Tensor, sel, valid: torch.Tensor) -> torch.Tensor:
    """The factor for rows ``sel`` of a chunk (0 where the target is ignored)."""
    return torch.where(valid, up[sel] if up.dim() else up, 0.0)


def flatten(input: torch.Tensor, target: torch.Tensor, extras=()):
    """``[..., D]`` input, ``[...]`` target and per-token extras as rows: ``[N, D]``, ``[N]``, ``[N, *]``."""
    n, lead = target.numel(), target.dim()
    return (
        input if (lead == 1 and len(input.shape) == 2) else input.reshape(n, input.shape[-1]),
        target if lead == 1 else target.reshape(n),
        [e if lead == 1 else e.reshape((n,) + tuple(e.shape[lead:])) for e in extras],
    )


def grads_out(gx, gw, gb, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> list:
    """Engine gradients as op outputs: input's shape, parameter dtypes, None where not computed."""
    shape = getattr(input, "local_shape", None) or input.shape
    return [
        None if gx is None else (gx if gx.shape == shape else gx.view(shape)),
        gw if (gw is None or gw.dtype == weight.dtype) else gw.to(weight.dtype),
        gb if (gb is None or bias is None or gb.dtype == bias.dtype) else gb.to(bias.dtype),
    ]
