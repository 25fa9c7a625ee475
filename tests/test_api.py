"""The public API stays annotated (memops ships py.typed): every parameter and return of what users call."""

from __future__ import annotations

import inspect
from pathlib import Path

import memops
import memops.distributed


def _public():
    for name in memops.__all__:
        obj = getattr(memops, name)
        yield from ([obj.__init__, obj.forward] if inspect.isclass(obj) else [obj])
    yield memops.distributed.vocab_parallel_cross_entropy
    yield memops.distributed.vocab_parallel_logprobs
    yield memops.distributed.vocab_parallel_grpo_loss
    yield memops.distributed.vocab_parallel_distillation_loss
    yield memops.distributed.LinearCrossEntropyHead.forward


def test_public_api_is_annotated_and_typed():
    for fn in _public():
        sig = inspect.signature(fn)
        bare = [
            p.name
            for p in sig.parameters.values()
            if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.annotation is p.empty
        ]
        assert not bare, f"{fn.__qualname__}: parameters without annotation: {bare}"
        assert sig.return_annotation is not sig.empty, f"{fn.__qualname__}: no return annotation"
    assert (Path(memops.__file__).parent / "py.typed").is_file()
