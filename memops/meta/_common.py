"""Shape rules shared by the fake kernels of every op family."""

from __future__ import annotations

import torch

from ..rules import placeholder


def grads_like(input: torch.Tensor, tensors, mask) -> list[torch.Tensor]:
    """A gradient output per tensor: contiguous and like the tensor where ``mask`` holds (and the
    tensor exists), else an empty ``[0]`` tensor of input's dtype (each its own, never aliased)."""
    return [t.new_empty(t.shape) if (m and t is not None) else placeholder(input) for t, m in zip(tensors, mask)]
