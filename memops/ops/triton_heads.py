"""The Triton chunk heads: which head runs (``memops.set_kernels``), and the launchers.

A *fused* head (``engine.run(..., fused=True)``) gets each chunk's ``[rows, V]`` logits block as the
projection GEMM wrote it, in the input dtype, and does in one kernel what the torch head and the engine's
elementwise steps do over an fp32 copy: logit scale, soft-cap, temperature, the loss or log-prob
statistics, and ``d loss / d logits`` written over the block in place (``ops/_triton_kernels.py``).  The
engine's gradient GEMMs read that block as it is.

Which heads are fused: cross-entropy in one process (``ops/linear_ce.py``), log-probs and GRPO
(``ops/logprobs.py``, ``ops/grpo.py``).  Vocabulary-parallel cross-entropy, distillation and user transforms keep the
torch heads.  ``"auto"`` picks the Triton heads for CUDA tensors when ``triton`` imports; ``"triton"``
picks them everywhere, which on CPU tensors needs the Triton interpreter (``TRITON_INTERPRET=1`` set
before triton is imported): that is how the tests run them without a GPU.

``LAUNCHES`` counts kernel launches by kernel name (the tests check that the Triton heads ran).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import math
import os
import struct

import torch
from torch import Tensor

from .. import config

LAUNCHES: collections.Counter = collections.Counter()


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """How a head kernel walks a row longer than one tile: vocabulary tile, warps, and the launch's
    ``num_stages`` (software pipelining of the tile loops' loads; 1: none; 3 is Triton's CUDA default)."""

    block: int
    warps: int
    stages: int = 3

    @property
    def maxnreg(self) -> int:
        """The registers a thread may use, passed to ptxas (``.maxnreg``): all an SM's 64k registers allow
        for one block of ``warps`` (at most 255).  Set explicitly, it keeps ptxas from trading spills for
        occupancy on its own (Triton 3.9's ptxas caps some variants at 80 registers and spills 8 bytes to
        fit 3 blocks per SM; ``scripts/triton_aot_check.py`` fails on any spill)."""
        return min(255, 65536 // (32 * self.warps))


# the configurations a device check times (scripts/gpu_bench.sh; MEMOPS_TRITON_LAUNCH="block,warps,stages"
# picks one); every one compiles for sm_90 and sm_100 without spills (scripts/triton_aot_check.py --configs;
# a 16384 tile spills in cross-entropy's full option set, so none is offered).  fp64 rows keep a tile of at
# most FP64_BLOCK (an 8192 fp64 tile spills).  The default stays the first until a GPU measures another faster.
LAUNCH_CONFIGS = tuple(
    LaunchConfig(b, w, st)
    for b, w, st in ((4096, 8, 3), (4096, 8, 1), (4096, 8, 2), (4096, 16, 3), (8192, 8, 3), (8192, 16, 3))
)  # fmt: skip


def _launch_config_from_env() -> LaunchConfig:
    value = os.environ.get("MEMOPS_TRITON_LAUNCH")
    if not value:
        return LAUNCH_CONFIGS[0]
    try:
        cfg = LaunchConfig(*(int(v) for v in value.split(",")))
    except (TypeError, ValueError):
        raise ValueError(f"MEMOPS_TRITON_LAUNCH must be 'block,warps[,stages]', got {value!r}") from None
    if cfg not in LAUNCH_CONFIGS:
        raise ValueError(f"MEMOPS_TRITON_LAUNCH={value!r} is not one of {LAUNCH_CONFIGS}")
    return cfg


LAUNCH = _launch_config_from_env()
FP64_BLOCK = 4096
# widest vocabulary tile; a row longer than this is walked in tiles (the tests lower it to exercise that)
BLOCK_MAX = LAUNCH.block


@functools.cache
def available() -> bool:
    """Whether ``triton`` imports."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _kernels():
    from . import _triton_kernels

    return _triton_kernels


@functools.cache
def interpreted() -> bool:
    """Whether the kernels run under the Triton interpreter (``TRITON_INTERPRET=1`` when they were built)."""
    # by the kernel object's type name: importing triton.runtime.interpreter would import numpy, which
    # neither torch nor triton requires
    return type(_kernels().ce_head).__name__ == "InterpretedFunction"


def wanted(x: Tensor) -> bool:
    """Whether this call's chunk heads run in Triton (``memops.set_kernels``)."""
    choice = config.kernel_choice()
    if choice == "torch":
        return False
    if choice == "auto":
        return x.device.type == "cuda" and available()
    if x.device.type != "cuda" and not interpreted():
        raise RuntimeError(
            f"memops.set_kernels('triton'): the inputs are on {x.device.type}, and compiled Triton kernels need "
            "CUDA tensors; set TRITON_INTERPRET=1 before triton is imported to run them on the CPU (slow: for "
            "tests), or choose 'auto' or 'torch'"
        )
    return True


def _launch_shape(vocab: int, cdt: torch.dtype) -> tuple[int, int, int]:
    """(vocabulary tile, warps, stages) for a row of ``vocab`` logits computed in ``cdt``: one tile of the
    next power of two for a short row (4 warps up to 1024 columns), else :data:`LAUNCH`'s."""
    widest = min(BLOCK_MAX, FP64_BLOCK) if cdt == torch.float64 else BLOCK_MAX
    block = min(widest, 1 << max(vocab - 1, 1).bit_length())
    warps = 4 if block <= 1024 else LAUNCH.warps
    return block, warps, LAUNCH.stages


def _rne_by_hand(z: Tensor) -> bool:
    """The interpreter's fp32 -> bf16 cast truncates; the kernels then round by hand (``_rne_bf16``)."""
    return z.dtype == torch.bfloat16 and interpreted()


def _cdt(dtype: torch.dtype):
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


def _rows(out: Tensor, sel, n: int) -> tuple[Tensor, bool]:
    """A contiguous ``[n]`` tensor for rows ``sel`` of ``out``: a view for a slice (the kernel writes the
    output directly), else a new tensor to scatter back (``True``)."""
    if isinstance(sel, slice):
        return out[sel], False
    return torch.empty(n, dtype=out.dtype, device=out.device), True


def _launch(kernel, rows: int, z: Tensor, *args, **kwargs) -> None:
    """``kernel`` over ``rows`` programs, on ``z``'s GPU (Triton launches on the current device); counted."""
    with torch.cuda.device(z.device) if z.is_cuda else contextlib.nullcontext():
        kernel[(rows,)](z, *args, **kwargs)
    LAUNCHES[kernel.fn.__name__] += 1


def _store(outs: dict, sel) -> None:
    for out, (buf, back) in outs.items():
        if back:
            out[sel] = buf


def _fp32(v: float) -> float:
    """``v`` rounded to fp32 (round to nearest even); ValueError where that overflows to infinity."""
    r = struct.unpack("f", struct.pack("f", v))[0]
    if math.isinf(r) and not math.isinf(v):
        raise ValueError(f"memops' Triton heads take float options within fp32's range, got {v!r}")
    return r


def _params(values) -> tuple[float, ...]:
    """The kernels' float options as scalar launch arguments: each an fp32 ``(hi, lo)`` pair with
    ``hi + lo`` equal to the option to 48 bits (``_triton_kernels._option``); None (no soft-cap) as 1."""
    out = []
    for v in values:
        v = 1.0 if v is None else float(v)
        hi = _fp32(v)
        out += [hi, _fp32(v - hi)]
    return tuple(out)


def ce(t1d: Tensor, coef: Tensor | None, a, loss_rows: Tensor, lse_rows: Tensor, top1: Tensor | None):
    """The fused cross-entropy head: ``head(z, sel)`` fills ``loss_rows``, ``lse_rows`` (and ``top1``) at
    ``sel`` and, when ``coef`` (the ``[N]`` per-row factor, 0 at ignored rows) is given, returns ``z`` holding
    ``coef * d loss / d z``: one launch per chunk."""
    k = _kernels()
    cdt = loss_rows.dtype
    params = _params((a.logit_scale, a.softcap, a.label_smoothing, a.z_loss))
    top1_u8 = None if top1 is None else top1.view(torch.uint8)

    def head(z: Tensor, sel):
        n, vocab = z.shape
        t = t1d[sel].contiguous()
        outs = {out: _rows(out, sel, n) for out in (loss_rows, lse_rows, top1_u8) if out is not None}
        c = None if coef is None else coef[sel].contiguous()
        block, warps, stages = _launch_shape(vocab, cdt)
        _launch(
            k.ce_head,
            n,
            z,
            z.stride(0),
            vocab,
            *params,
            t,
            z if c is None else c,
            outs[loss_rows][0],
            outs[lse_rows][0],
            z if top1_u8 is None else outs[top1_u8][0],
            a.ignore_index,
            SOFTCAP=a.softcap is not None,
            SMOOTH=bool(a.label_smoothing),
            ZLOSS=bool(a.z_loss),
            GRAD=c is not None,
            WANT_TOP1=top1_u8 is not None,
            RNE_BF16=_rne_by_hand(z),
            BLOCK=block,
            CDT=_cdt(cdt),
            num_warps=warps,
            num_stages=stages,
            maxnreg=LAUNCH.maxnreg,
        )
        _store(outs, sel)
        return None if c is None else z

    return head


def logprobs(
    t1d: Tensor,
    out: tuple,
    extras: dict,
    *,
    scale: float,
    softcap: float | None,
    post: float,
    coef=None,
    fixed: tuple | None = None,
):
    """The fused log-prob head: ``y = post * softcap(scale * z)``; fills ``out`` (log-probs, entropy or
    None) and ``extras`` at ``sel``.  Gradient coefficients: ``fixed = (c1, c2)`` (``[N]`` tensors or None,
    known beforehand: one launch per chunk), or ``coef(sel, logp, ent) -> (c1, c2) | None`` (computed from
    the chunk's log-probs, as GRPO's: a forward launch, then a gradient launch)."""
    k = _kernels()
    logp_rows, ent_rows = out
    cdt = logp_rows.dtype
    params = _params((scale, softcap, post))
    top1 = extras.get("is_top1")
    named = {
        "LOGP": logp_rows,
        "ENT": ent_rows,
        "SQ": extras.get("log_sum_sq_probs"),
        "MEAN": extras.get("mean_logits"),
        "TOP1": None if top1 is None else top1.view(torch.uint8),
    }

    def launch(z, t, *, forward, grad, c1=None, c2=None, stats=None, save=False, outs=None):
        n, vocab = z.shape
        block, warps, stages = _launch_shape(vocab, cdt)
        bufs = {name: (z if o is None or outs is None else outs[o][0]) for name, o in named.items()}
        _launch(
            k.logprobs_head,
            n,
            z,
            z.stride(0),
            vocab,
            *params,
            t,
            z if c1 is None else c1,
            z if c2 is None else c2,
            z if stats is None else stats,
            *bufs.values(),
            FORWARD=forward,
            GRAD=grad,
            SOFTCAP=softcap is not None,
            ENTROPY=ent_rows is not None,
            SQUARES=named["SQ"] is not None,
            SUM=named["MEAN"] is not None,
            WANT_TOP1=named["TOP1"] is not None,
            HAS_C1=c1 is not None,
            HAS_C2=c2 is not None,
            SAVE=save,
            RNE_BF16=_rne_by_hand(z),
            BLOCK=block,
            CDT=_cdt(cdt),
            num_warps=warps,
            num_stages=stages,
            maxnreg=LAUNCH.maxnreg,
        )

    def head(z: Tensor, sel):
        n = z.shape[0]
        t = t1d[sel].contiguous()
        outs = {o: _rows(o, sel, n) for o in named.values() if o is not None}
        if fixed is not None:
            c1, c2 = (None if c is None else c[sel].contiguous() for c in fixed)
            grad = c1 is not None or c2 is not None
            launch(z, t, forward=True, grad=grad, c1=c1, c2=c2, outs=outs)
            _store(outs, sel)
            return z if grad else None
        stats = None if coef is None else torch.empty((n, k.STATS), dtype=cdt, device=z.device)
        launch(z, t, forward=True, grad=False, stats=stats, save=stats is not None, outs=outs)
        _store(outs, sel)
        if coef is None:
            return None
        c = coef(sel, logp_rows[sel], None if ent_rows is None else ent_rows[sel])
        if c is None or (c[0] is None and c[1] is None):
            return None
        c1, c2 = (None if v is None else v.to(cdt).contiguous() for v in c)
        launch(z, t, forward=False, grad=True, c1=c1, c2=c2, stats=stats)
        return z

    return head
