"""Custom ops (``torch.ops.memops.*``) and their real kernels."""

from . import linear_ce  # noqa: F401
from . import transform  # noqa: F401
from . import logprobs  # noqa: F401
from . import vocab_parallel  # noqa: F401
