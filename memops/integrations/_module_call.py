"""Computing a loss as a module's forward, so that the engines' module hooks see it.

DeepSpeed ZeRO-3 and FSDP2 gather a module's parameters in a forward pre-hook and release them in a forward
hook, which also attaches the pre-backward re-gather to the module's *output* tensors.  A loss computed from
the module's weight must therefore be the module's output: then its backward passes through the engines'
wrappers, and the weight is gathered again before memops' backward reads it.  Both helpers here make the loss
the output of a real ``module(...)`` call; neither depends on the order in which the engines registered their
hooks (the capturing hook is registered last, at call time, so it sees what every engine hook left).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

_NO_FORWARD = object()


@contextlib.contextmanager
def _forward_replaced(module: torch.nn.Module, forward: Callable) -> Iterator[None]:
    old = module.__dict__.get("forward", _NO_FORWARD)
    module.forward = forward
    try:
        yield
    finally:
        if old is _NO_FORWARD:
            del module.forward
        else:
            module.forward = old


def call_as_forward(module: torch.nn.Module, compute: Callable, *args: Any) -> Any:
    """``compute(*args)`` run as ``module``'s forward through ``module(*args)``: every forward pre-hook runs
    before it (and may replace ``args``, as ZeRO-3's post-backward wrapper does), every forward hook after it;
    returns the output those hooks left."""
    with _forward_replaced(module, compute):
        return module(*args)


@contextlib.contextmanager
def output_taken(modules: Sequence[torch.nn.Module], forward: Callable, sink: Callable, stand_in: Callable):
    """While active, a call of any of ``modules`` (from code that expects its ordinary output, such as a
    model's forward calling ``lm_head``) runs ``forward(module)(*args)``; after every other forward hook ran,
    its output goes to ``sink(output)`` and the caller gets ``stand_in(*args)`` instead."""

    def take(module, args, output):
        sink(output)
        return stand_in(*args)

    with contextlib.ExitStack() as stack:
        for module in modules:
            stack.enter_context(_forward_replaced(module, forward(module)))
            stack.callback(module.register_forward_hook(take).remove)
        yield
