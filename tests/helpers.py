"""Small test utilities: matmul FLOP counting that sees inside memops' kernels."""

from __future__ import annotations

import math

import torch
from torch._library import custom_ops
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
_MM = {aten.mm.default, aten.addmm.default, aten.mm.out, aten.addmm.out, aten.addmm_.default}


class MatmulFlops(TorchDispatchMode):
    """Counts 2*m*n*k for every matmul, recursing into ``memops::*`` op kernels."""

    def __init__(self):
        super().__init__()
        self.flops = 0
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten.linear.default:
            x, w = args[0], args[1]
            self.flops += 2 * (x.numel() // max(x.shape[-1], 1)) * w.shape[0] * w.shape[1]
            self.calls.append(func)
        if func in _MM:
            a, b = (args[0], args[1]) if func in (aten.mm.default, aten.mm.out) else (args[1], args[2])
            self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
            self.calls.append(func)
        if func.namespace == "memops":
            # run the op's own Python kernel with this mode still active, so its matmuls count
            with self:
                return custom_ops.OPDEFS[func._name]._init_fn(*args, **kwargs)
        return func(*args, **kwargs)


def projection_flops(n: int, v: int, d: int) -> int:
    return 2 * n * v * d


def close(a, b, tol):
    return math.isclose(a, b, rel_tol=tol, abs_tol=tol)
