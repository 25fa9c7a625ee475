"""memops: output projection + loss, chunk by chunk, as real ``torch.library`` custom ops.

Importing memops registers every op under ``torch.ops.memops``.
"""

from . import ops  # noqa: F401  (registers the ops and their autograd)
from . import meta  # noqa: F401  (registers the fake kernels)
from .config import chunking, set_chunk_budget, set_chunk_size
from .modules import LinearCrossEntropy
from .ops.linear_ce import linear_cross_entropy

__version__ = "0.1.0"

__all__ = [
    "LinearCrossEntropy",
    "chunking",
    "linear_cross_entropy",
    "set_chunk_budget",
    "set_chunk_size",
]
