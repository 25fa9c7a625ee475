"""The transform registry: names of per-token losses written in plain PyTorch (``memops.transform``).

Neutral ground for both layers: the fake kernels check a transform's name here, the real kernels fetch its
function; this module imports no kernel code.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

_TRANSFORMS: dict[str, Transform] = {}


@dataclass(frozen=True)
class Transform:
    name: str
    fn: Callable[..., Tensor]


def transform(name: str, fn: Callable | None = None, *, replace: bool = False) -> Callable:
    """Register ``fn(logits, target, *extras, **options) -> per-row loss [n]`` under ``name``.

    Usable as ``@memops.transform("focal")`` or ``memops.transform("focal", fn)``.
    Registering an existing name raises unless ``replace=True``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"transform name must be a non-empty string, got {name!r}")

    def register(f: Callable) -> Callable:
        if not callable(f):
            raise TypeError(f"transform {name!r} must be callable, got {type(f).__name__}")
        if name in _TRANSFORMS and not replace and _TRANSFORMS[name].fn is not f:
            raise ValueError(f"transform {name!r} is already registered (pass replace=True to replace it)")
        _TRANSFORMS[name] = Transform(name, f)
        return f

    return register if fn is None else register(fn)


def registered_transforms() -> list[str]:
    return sorted(_TRANSFORMS)


def get_transform(name: str) -> Transform:
    try:
        return _TRANSFORMS[name]
    except KeyError:
        raise ValueError(
            f"unknown transform {name!r}; registered: {registered_transforms()} "
            "(a user transform is registered when the module defining it is imported)"
        ) from None


def encode_options(options: dict) -> str:
    return repr(sorted(options.items()))


@functools.lru_cache(maxsize=256)
def decode_options(text: str) -> dict:
    return dict(ast.literal_eval(text))
