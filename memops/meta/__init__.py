"""Fake (meta) kernels: output shapes, dtypes and strides of every memops op."""

from . import linear_ce  # noqa: F401
from . import transform  # noqa: F401
from . import logprobs  # noqa: F401
from . import vocab_parallel  # noqa: F401
