"""Rules the real kernels (``memops/ops``) and the fake kernels (``memops/meta``) share.

This module, ``memops/validation.py`` and ``memops/registry.py`` are the only memops modules the shape layer
(``memops/meta``) imports: none of them imports kernel code.
"""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the math inside a chunk and of the per-token outputs: fp64 for fp64 inputs, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def placeholder(like: torch.Tensor) -> torch.Tensor:
    """The output that stands for a gradient not computed: an empty ``[0]`` tensor of ``like``'s dtype and
    device (a new one each time: outputs never alias)."""
    return like.new_empty((0,))
