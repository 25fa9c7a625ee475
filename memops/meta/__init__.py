"""The shape layer: every op family's declaration (``memops.contract.Spec``), hence its schemas and fake
kernels (output shapes, dtypes and strides).  Imports no kernel code."""

from . import (
    distill,  # noqa: F401
    grpo,  # noqa: F401
    linear_ce,  # noqa: F401
    logprobs,  # noqa: F401
    mtp,  # noqa: F401
    transform,  # noqa: F401
    vocab_parallel,  # noqa: F401
)
