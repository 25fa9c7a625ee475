"""memops: output projection + loss, chunk by chunk, as real ``torch.library`` custom ops.

Importing memops registers every op under ``torch.ops.memops``.
"""

from . import (
    distributed,  # noqa: F401  (memops.distributed.*)
    meta,  # noqa: F401  (registers the fake kernels)
    nn,  # noqa: F401  (memops.nn: drop-ins for torch's LinearCrossEntropyLoss and its functional form)
    ops,  # noqa: F401  (registers the ops and their autograd)
    transforms,  # noqa: F401  (registers the built-in transforms)
)
from .config import (
    batch_invariant,
    chunking,
    kernels,
    precision,
    set_batch_invariant,
    set_chunk_budget,
    set_chunk_size,
    set_kernels,
    set_precision,
    set_sync_free,
    sync_free,
)
from .modules import LinearCrossEntropy
from .ops.distill import linear_distillation_loss
from .ops.grpo import linear_grpo_loss
from .ops.linear_ce import linear_cross_entropy
from .ops.logprobs import linear_logprobs
from .ops.mtp import linear_mtp_cross_entropy
from .ops.transform import linear_loss
from .registry import registered_transforms, transform

__version__ = "0.1.0"

__all__ = [
    "LinearCrossEntropy",
    "batch_invariant",
    "chunking",
    "kernels",
    "linear_cross_entropy",
    "linear_distillation_loss",
    "linear_grpo_loss",
    "linear_logprobs",
    "linear_mtp_cross_entropy",
    "linear_loss",
    "registered_transforms",
    "set_batch_invariant",
    "set_chunk_budget",
    "set_chunk_size",
    "set_kernels",
    "set_sync_free",
    "set_precision",
    "precision",
    "sync_free",
    "transform",
]
