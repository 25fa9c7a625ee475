"""Bytes each chunk head moves over chunk-sized (``[rows, V]``) tensors, per logit: torch heads vs Triton heads.

Run ``python -m memops traffic`` (the table in ``docs/internals.md``).  Both columns are measured, not
written down:

* **torch heads**: one chunk of the family's head runs on ``meta`` tensors (the engine then takes its GPU
  branches: whole-chunk blocks, ``dz`` cast for the gradient GEMMs) under a dispatch mode that adds, for
  every ATen op, the bytes of the chunk-sized tensors it reads and writes; each op is one kernel that
  streams its operands through memory, which is what an eager GPU step does.  ``gather`` and ``scatter``
  touch one element per row and count nothing;
* **Triton heads**: the fused kernel runs under the Triton interpreter, whose loads and stores are counted
  where they fall inside the logits block (``TRITON_INTERPRET=1`` must be set before triton is imported).

``gemm`` is the traffic of the projection GEMM writing the block and of the gradient GEMMs reading it (and
any cast between them), counted the same way for both; ``head`` is everything else.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..contract import Args

GEMMS = {"mm", "addmm", "linear", "matmul", "_to_copy"}  # _to_copy: dz cast for the gradient GEMMs
ONE_PER_ROW = {"gather", "scatter", "scatter_add", "scatter_add_", "scatter_", "index_put_", "index_put"}
ROWS, HIDDEN, VOCAB = 16, 64, 2048  # rows < hidden, so the weight is never taken for a chunk


class _Count(TorchDispatchMode):
    def __init__(self, rows: int, vocab: int):
        super().__init__()
        self.rows, self.vocab = rows, vocab
        self.bytes = {"head": 0, "gemm": 0}

    def _chunk(self, t) -> bool:
        return isinstance(t, torch.Tensor) and t.dim() == 2 and self.vocab in t.shape and min(t.shape) <= self.rows

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if func.is_view or name in ONE_PER_ROW or name in ("empty", "empty_like", "detach", "t", "transpose"):
            return out
        written = kwargs.get("out")
        reads = [t for t in tree_leaves((args, {k: v for k, v in kwargs.items() if k != "out"})) if self._chunk(t)]
        writes = [t for t in tree_leaves(out) if self._chunk(t)] if written is None else [written]
        if name.endswith("_") and not name.startswith("_"):  # in place: written, and read unless overwritten
            writes = [args[0]]
            if name in ("copy_", "fill_", "zero_"):
                reads = [t for t in reads if t is not args[0]]
        nbytes = sum(t.numel() * t.element_size() for t in reads + writes if self._chunk(t))
        self.bytes["gemm" if name in GEMMS else "head"] += nbytes
        return out


def _ce_args(**kw) -> Args:
    base = dict(
        logit_scale=1.0,
        softcap=None,
        label_smoothing=0.0,
        z_loss=0.0,
        ignore_index=-100,
        chunk_size=0,
        class_weight=None,
        precision="reference",
    )
    return Args(**{**base, **kw})


HEADS: dict[str, tuple[str, dict[str, Any], bool]] = {
    # name: (family, options, gradient)
    "cross-entropy, forward + gradient": ("ce", {}, True),
    "cross-entropy, soft-cap + smoothing + z-loss": ("ce", dict(softcap=30.0, label_smoothing=0.1, z_loss=1e-4), True),
    "log-probs, forward only": ("logprobs", {}, False),
    "log-probs + entropy, gradient (recompute)": ("logprobs", dict(entropy=True), True),
    "GRPO, forward + gradient (two launches)": ("grpo", {}, True),
    # precision="accurate": fp32 logits from the GEMM; the Triton heads read and write the fp32 block, dz is
    # cast to the input dtype once for the gradient GEMMs
    "cross-entropy, accurate (fp32 logits)": ("ce", dict(precision="accurate"), True),
    "log-probs + entropy, accurate, gradient": ("logprobs", dict(entropy=True, precision="accurate"), True),
}


def _run_head(family: str, opts: dict, grad: bool, x2d, w, t):
    from ..ops import linear_ce, logprobs

    need = (grad, grad, False, False)
    if family == "ce":
        up = torch.ones((), dtype=torch.float32, device=x2d.device) if grad else None
        linear_ce.chunks(x2d, w, t, None, up, need, _ce_args(**opts))
        return
    n = x2d.shape[0]
    ones = torch.ones(n, dtype=torch.float32, device=x2d.device)
    common = dict(
        temperature=1.0,
        entropy=opts.get("entropy", False),
        need=need,
        chunk_size=0,
        accurate=opts.get("precision") == "accurate",
    )
    if family == "logprobs":
        fixed = (ones, ones if opts.get("entropy") else None) if grad else None
        logprobs.chunks(x2d, w, t, None, fixed=fixed, **common)
        return
    logprobs.chunks(x2d, w, t, None, coef=lambda sel, lp, en: (lp * 0 + 1, None), **common)


def _inputs(dtype, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(ROWS, HIDDEN, generator=g).to(dtype)
    w = (torch.randn(VOCAB, HIDDEN, generator=g) / HIDDEN**0.5).to(dtype)
    t = torch.randint(0, VOCAB, (ROWS,), generator=g)
    return x.to(device), w.to(device), t.to(device)


def torch_head_bytes(name: str, dtype: torch.dtype) -> dict:
    """Bytes per logit of one chunk of the torch head ``name`` as an eager GPU step moves them."""
    from .. import config

    family, opts, grad = HEADS[name]
    x, w, t = _inputs(dtype, "meta")
    count = _Count(ROWS, VOCAB)
    with config.kernels("torch"), config.chunking(chunk_size=ROWS), count:
        _run_head(family, opts, grad, x, w, t)
    return {k: v / (ROWS * VOCAB) for k, v in count.bytes.items()}


@contextlib.contextmanager
def _interpreter_bytes(lo: int, hi: int, total: dict):
    """Count the interpreter's loads and stores that fall in ``[lo, hi)`` into ``total``."""
    import triton.runtime.interpreter as interp

    builder = interp.interpreter_builder
    load, store = builder.create_masked_load, builder.create_masked_store

    def inside(ptrs, mask) -> int:
        p = ptrs.data
        return int(((p >= lo) & (p < hi) & mask.data).sum()) * interp._get_np_dtype(ptrs.get_element_ty()).itemsize

    def counted_load(ptrs, mask, other, *rest):
        total["head"] += inside(ptrs, mask)
        return load(ptrs, mask, other, *rest)

    def counted_store(ptrs, value, mask, *rest):
        total["head"] += inside(ptrs, mask)
        return store(ptrs, value, mask, *rest)

    builder.create_masked_load, builder.create_masked_store = counted_load, counted_store
    try:
        yield
    finally:
        builder.create_masked_load, builder.create_masked_store = load, store


def triton_head_bytes(name: str, dtype: torch.dtype) -> dict:
    """Bytes per logit of one chunk of the Triton head ``name``: the kernels' loads and stores in the
    logits block (under the interpreter), and the GEMMs' traffic counted as for the torch heads."""
    from .. import config
    from ..ops import engine, triton_heads

    if not triton_heads.interpreted():
        raise RuntimeError("the Triton traffic is counted under the interpreter: set TRITON_INTERPRET=1")
    family, opts, grad = HEADS[name]
    x, w, t = _inputs(dtype, "cpu")
    total = {"head": 0, "gemm": 0}
    real_run = engine.run

    def run(x2d, weight, bias, head, **kw):  # count inside the one chunk's head call
        def counted(z, sel):
            with _interpreter_bytes(z.data_ptr(), z.data_ptr() + z.nbytes, total):
                return head(z, sel)

        return real_run(x2d, weight, bias, counted if kw.get("fused") else head, **kw)

    with config.kernels("triton"), config.chunking(chunk_size=ROWS), _patched(engine, "run", run):
        _run_head(family, opts, grad, x, w, t)
    # the GEMMs: the same engine on meta tensors with a fused head that moves nothing
    count = _Count(ROWS, VOCAB)
    xm, wm, _ = _inputs(dtype, "meta")
    with count:
        real_run(
            xm,
            wm,
            None,
            lambda z, sel: z if grad else None,
            grad_input=grad,
            grad_weight=grad,
            fused=True,
            accurate=opts.get("precision") == "accurate",
        )
    total["gemm"] = count.bytes["gemm"] + count.bytes["head"]
    return {k: v / (ROWS * VOCAB) for k, v in total.items()}


@contextlib.contextmanager
def _patched(module, name, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def table(dtypes=(torch.bfloat16, torch.float32)) -> str:
    """The markdown table of ``docs/internals.md``."""
    lines = [
        "| head | dtype | torch heads: head | torch heads: GEMMs | Triton heads: head | Triton heads: GEMMs |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name in HEADS:
        for dtype in dtypes:
            a = torch_head_bytes(name, dtype)
            b = triton_head_bytes(name, dtype)
            triton = f"{b['head']:.1f} | {b['gemm']:.1f} |"
            lines.append(
                f"| {name} | {str(dtype).removeprefix('torch.')} | {a['head']:.1f} | {a['gemm']:.1f} | {triton}"
            )
    return "\n".join(lines)
