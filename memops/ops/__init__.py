"""Custom ops (``torch.ops.memops.*``) and their real kernels."""

from . import (
    distill,  # noqa: F401
    grpo,  # noqa: F401
    linear_ce,  # noqa: F401
    logprobs,  # noqa: F401
    mtp,  # noqa: F401
    transform,  # noqa: F401
    vocab_parallel,  # noqa: F401
)
