"""Global chunking settings.

The chunk engine works on row blocks of ``[rows, V]`` logits.  How many rows a
block holds comes from a memory budget for the block's fp32 work buffers;
``set_chunk_size`` pins the row count instead, and a per-call ``chunk_size``
overrides both.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch

_MIN_ROWS = 16
# CPU: every chunk streams the whole weight twice (logits, input gradient) and reads and writes the fp32
# weight gradient once, about 4 * V * D * 4 bytes, against 6 * rows * V * D FLOPs of matmul: the ratio
# depends on the row count alone.  Below about 512 rows that pass shows in the step time (V = 128256:
# 228-row chunks 1.10x torch.compile's time, 456-row 1.01x; docs/internals.md), so the default rule raises
# smaller chunks towards it, as long as a chunk stays within a fifth of the rows.
_AMORTIZE_ROWS = 512
_MAX_SHARE = 5


@dataclass
class _Settings:
    chunk_size: int | None = None
    budget_bytes: int | None = None
    kernels: str = "auto"
    sync_free: bool = False
    precision: str = "reference"
    batch_invariant: bool = False
    invariant_rows: int | None = None


KERNELS = ("auto", "triton", "torch")


_settings = _Settings()


def set_chunk_size(rows: int | None) -> None:
    """Pin the number of rows per chunk for every call (``None`` restores the budget rule)."""
    if rows is not None and (not isinstance(rows, int) or isinstance(rows, bool) or rows < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {rows!r}")
    _settings.chunk_size = rows


def set_chunk_budget(nbytes: int | None) -> None:
    """Set the memory budget (bytes) for one chunk's work buffers (``None`` restores the default)."""
    if nbytes is not None and (not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 1):
        raise ValueError(f"chunk budget must be a positive int (bytes) or None, got {nbytes!r}")
    _settings.budget_bytes = nbytes


@contextlib.contextmanager
def chunking(*, chunk_size: int | None = None, budget_bytes: int | None = None) -> Iterator[None]:
    """Temporarily change the global chunk settings."""
    old = _Settings(_settings.chunk_size, _settings.budget_bytes)
    set_chunk_size(chunk_size)
    set_chunk_budget(budget_bytes)
    try:
        yield
    finally:
        _settings.chunk_size, _settings.budget_bytes = old.chunk_size, old.budget_bytes


def set_kernels(kind: str) -> None:
    """Choose the per-chunk heads of cross-entropy, log-probs and GRPO: ``"auto"`` (the default: the Triton
    heads on CUDA tensors when ``triton`` imports, the torch heads elsewhere), ``"triton"`` (always; CPU
    tensors need ``TRITON_INTERPRET=1`` set before triton is imported, else the op raises) or ``"torch"``."""
    if kind not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kind!r}")
    if kind == "triton":
        try:
            import triton  # noqa: F401
        except ImportError as err:
            raise ImportError("memops.set_kernels('triton') needs the triton package (pip install triton)") from err
    _settings.kernels = kind


def kernel_choice() -> str:
    """The current ``set_kernels`` choice."""
    return _settings.kernels


@contextlib.contextmanager
def _temporarily(name: str, setter, value) -> Iterator[None]:
    """``setter(value)`` for the block, then the setting ``name`` as it was."""
    old = getattr(_settings, name)
    setter(value)
    try:
        yield
    finally:
        setattr(_settings, name, old)


def kernels(kind: str) -> contextlib.AbstractContextManager[None]:
    """Temporarily choose the heads (see :func:`set_kernels`); a context manager."""
    return _temporarily("kernels", set_kernels, kind)


PRECISIONS = ("reference", "accurate")


def set_precision(kind: str) -> None:
    """The precision of every later call that does not pass ``precision=`` itself:

    * ``"reference"`` (the default): bit-compatible with the unfused code (``lm_head(h).float()``): low-precision
      inputs give logits rounded to their dtype by the GEMM, then fp32 math;
    * ``"accurate"``: the logits are kept in fp32 from the GEMM (CPU: fp32 GEMMs, the weight upcast once per
      call; CUDA: ``mm(out_dtype=float32)``, the Triton heads reading the fp32 block), as PyTorch's
      ``F.linear_cross_entropy`` (``acc_policy="accurate"``) and CCE compute; closer to float64 math, slower.
      fp32 and fp64 inputs are unchanged.
    """
    if kind not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {kind!r}")
    _settings.precision = kind


def precision_of(kind: str | None) -> str:
    """A call's precision: ``kind``, or the global one (:func:`set_precision`) when None."""
    if kind is None:
        return _settings.precision
    if kind not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} or None, got {kind!r}")
    return kind


def precision(kind: str) -> contextlib.AbstractContextManager[None]:
    """Temporarily set the precision (see :func:`set_precision`); a context manager."""
    return _temporarily("precision", set_precision, kind)


def set_sync_free(on: bool) -> None:
    """Turn the sync-free path on (``True``) or back to the default (``False``) for every later call.

    Sync-free, an op never makes the host wait for the device: every row is computed (an ignored or masked
    row with a zero coefficient, the NaN/inf rules unchanged), ``num_items`` stays where it is, and
    out-of-range targets are caught by a device-side assert (``torch._assert_async``: on CUDA the next
    synchronizing call raises, as ``F.cross_entropy``'s own check does; on CPU the op raises at once).  A call
    whose inputs are on a CUDA stream that is being captured into a graph is sync-free whatever this says.
    The default skips the rows whose result reaches nothing (padding, prompt tokens), which costs a sync.
    """
    if not isinstance(on, bool):
        raise TypeError(f"set_sync_free takes a bool, got {type(on).__name__}")
    _settings.sync_free = on


@contextlib.contextmanager
def sync_free(on: bool = True) -> Iterator[None]:
    """Temporarily turn the sync-free path on (see :func:`set_sync_free`)."""
    old = _settings.sync_free
    set_sync_free(on)
    try:
        yield
    finally:
        _settings.sync_free = old


_thread = threading.local()  # .sync_free: a backward pass of a sync-free forward, on this thread


def is_sync_free(t: torch.Tensor) -> bool:
    """Whether a call on ``t``'s device runs sync-free: :func:`set_sync_free`, the backward pass of a sync-free
    forward (:func:`backward_like`), or ``t``'s CUDA stream capturing."""
    if _settings.sync_free or getattr(_thread, "sync_free", False):
        return True
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def backward_like(forward_was_sync_free: bool) -> contextlib.AbstractContextManager:
    """Run a backward pass sync-free when its forward was (on this thread only: autograd may run it on a
    device thread of its own, whatever the stream it sees).  A forward that was not gets a no-op context (the
    common case, on every backward: no generator made)."""
    return _sync_free_backward() if forward_was_sync_free else contextlib.nullcontext()


@contextlib.contextmanager
def _sync_free_backward() -> Iterator[None]:
    old = getattr(_thread, "sync_free", False)
    _thread.sync_free = True
    try:
        yield
    finally:
        _thread.sync_free = old


# batch-invariant mode: every chunk's GEMMs have this many rows (the last chunk padded with zero rows), so the
# GEMM library runs one kernel, with one reduction order, whatever the batch (docs/internals.md)
INVARIANT_ROWS = {"cpu": 256, "other": 1024}


def set_batch_invariant(on: bool, *, rows: int | None = None) -> None:
    """Turn batch-invariant mode on (``True``) or off (``False``, the default) for every later call.

    On, every per-row result (loss rows, log-probs, kept-set log-probs, entropies, lse, top-1, the input
    gradient's row for a given upstream gradient) is bitwise the same whatever the other rows of the batch, its
    size, the row's position, the padding and ``chunk_size``: every chunk's GEMMs have ``rows`` rows (default
    256 on CPU, 1024 on GPUs; the last chunk padded with zero rows, ``chunk_size`` and the budget ignored), the
    torch heads work one row at a time and the Triton heads one row per program.  Weight and bias gradients
    are bitwise the same run to run for the same batch.  Costs a GEMM of ``rows`` rows even for one token, and
    a per-row head call (measured in BENCHMARKS.md)."""
    if not isinstance(on, bool):
        raise TypeError(f"set_batch_invariant takes a bool, got {type(on).__name__}")
    if rows is not None and (not isinstance(rows, int) or isinstance(rows, bool) or rows < 1):
        raise ValueError(f"rows must be a positive int or None, got {rows!r}")
    _settings.batch_invariant = on
    _settings.invariant_rows = rows


@contextlib.contextmanager
def batch_invariant(on: bool = True, *, rows: int | None = None) -> Iterator[None]:
    """Temporarily turn batch-invariant mode on (see :func:`set_batch_invariant`)."""
    old = (_settings.batch_invariant, _settings.invariant_rows)
    set_batch_invariant(on, rows=rows)
    try:
        yield
    finally:
        _settings.batch_invariant, _settings.invariant_rows = old


def invariant_rows(device: torch.device) -> int | None:
    """Rows of every chunk's GEMMs in batch-invariant mode on ``device``; None when the mode is off."""
    if not _settings.batch_invariant:
        return None
    return _settings.invariant_rows or INVARIANT_ROWS["cpu" if device.type == "cpu" else "other"]


CPU_GEMMS = ("auto", "native", "fp32")
_CPU_GEMM = {"mode": os.environ.get("MEMOPS_CPU_GEMM", "auto")}
_FAST_CPU_GEMM: dict[torch.dtype, bool] = {}


def set_cpu_gemm(mode: str) -> None:
    """How the gradient GEMMs of bf16 / fp16 inputs run on CPU: ``"auto"`` (the default; also the
    ``MEMOPS_CPU_GEMM`` environment variable): natively in the input dtype where the CPU has fast GEMMs for
    it (:func:`fast_cpu_gemm`), else in fp32; ``"native"`` or ``"fp32"`` always."""
    if mode not in CPU_GEMMS:
        raise ValueError(f"cpu gemm mode must be one of {CPU_GEMMS}, got {mode!r}")
    _CPU_GEMM["mode"] = mode


def fast_cpu_gemm(dtype: torch.dtype) -> bool:
    """Whether this CPU runs ``dtype`` GEMMs faster than fp32 ones, decided once per process from what torch
    reports of the CPU (oneDNN uses these instructions whatever ``ATEN_CPU_CAPABILITY`` says): bf16 with
    AVX512-BF16 or AMX tiles (``torch.cpu._is_avx512_bf16_supported`` / ``_is_amx_tile_supported``), fp16 with
    AMX-FP16 (``_is_amx_fp16_supported``; AVX512-FP16 alone measured no faster than fp32)."""
    if dtype not in _FAST_CPU_GEMM:
        probes = {
            torch.bfloat16: ("_is_avx512_bf16_supported", "_is_amx_tile_supported"),
            torch.float16: ("_is_amx_fp16_supported",),
        }.get(dtype, ())
        fast = False
        for name in probes:
            probe = getattr(torch.cpu, name, None)
            try:
                fast = fast or bool(probe and probe())
            except (RuntimeError, AttributeError):
                pass
        _FAST_CPU_GEMM[dtype] = fast
    return _FAST_CPU_GEMM[dtype]


def native_gemm(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the chunk engine's gradient GEMMs take ``dz`` rounded to ``dtype`` (bf16 / fp16 inputs):
    always off the CPU, on CPU by :func:`set_cpu_gemm`."""
    if dtype not in (torch.bfloat16, torch.float16):
        return False
    if device.type != "cpu":
        return True
    mode = _CPU_GEMM["mode"]
    return mode == "native" or (mode == "auto" and fast_cpu_gemm(dtype))


def chunk_budget(device: torch.device) -> int:
    """The bytes one chunk's work buffers may take on ``device``: the budget set (:func:`set_chunk_budget`,
    :func:`chunking`), else :func:`default_budget`'s."""
    return _settings.budget_bytes or default_budget(device)


def default_budget(device: torch.device) -> int:
    """Bytes one chunk's work buffers may take when no budget is set.

    CPU: 112 MiB (at most about 860 rows at V=32000): a chunk's GEMMs lose
    efficiency as its row count shrinks, and this keeps the peak small (see
    ``chunk_rows`` for large vocabularies).  CUDA: 1/32 of the device
    memory, between 256 MiB and 2 GiB, so matmuls stay large enough to saturate the tensor cores.
    """
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return int(min(max(total // 32, 256 << 20), 2 << 30))
    return 112 << 20


def chunk_rows(
    n_rows: int,
    vocab: int,
    hidden: int,
    dtype: torch.dtype,
    device: torch.device,
    requested: int = 0,
    logit_rows: int = 1,
    fused: bool = False,
) -> int:
    """Rows per chunk for ``n_rows`` rows of ``[*, vocab]`` logits.

    Batch-invariant mode (:func:`set_batch_invariant`) fixes it at :func:`invariant_rows`, whatever the rest.
    Otherwise ``requested`` (per call) wins, then ``set_chunk_size``, then the budget, sized
    by what the engine allocates per row: the torch heads hold one ``vocab``-long
    row of the compute dtype (fp32, fp64 for fp64 inputs) plus one in the input
    dtype when that differs (the matmul output, or ``dz`` cast for the gradient
    GEMMs); a fused (Triton) head holds one row in the input dtype only
    (``fused=True``).  Both add the row's ``hidden``-sized input and input-gradient
    rows in the input dtype; ``logit_rows`` logits rows per token when a family
    holds more than one logits buffer (distillation: the student's and the
    teacher's).  With the default CPU
    budget, chunks smaller than ``_AMORTIZE_ROWS`` rows are raised towards it
    (so the pass over the weight each chunk makes is amortised), but never
    above a fifth of ``n_rows`` (so a chunk's buffer stays at most a fifth of
    the full logits).  Budget-sized chunks are balanced (``n_rows`` split into
    equal chunks of at most that many rows) so no small ragged chunk pays a
    full pass over the weight gradient.
    """
    fixed = invariant_rows(device)
    if fixed is not None:
        return fixed
    if requested and requested > 0:
        rows = requested
    elif _settings.chunk_size is not None:
        rows = _settings.chunk_size
    else:
        budget = chunk_budget(device)
        work = 8 if dtype == torch.float64 else 4
        logit_bytes = dtype.itemsize if fused else work + (dtype.itemsize if dtype.itemsize != work else 0)
        per_row = logit_rows * vocab * logit_bytes + 2 * hidden * dtype.itemsize
        rows = max(_MIN_ROWS, budget // max(per_row, 1))
        if device.type == "cpu" and _settings.budget_bytes is None and rows < _AMORTIZE_ROWS:
            rows = max(rows, min(_AMORTIZE_ROWS, -(-n_rows // _MAX_SHARE)))
        if n_rows > rows:
            rows = -(-n_rows // -(-n_rows // rows))
    return int(max(1, min(rows, max(n_rows, 1))))
