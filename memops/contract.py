"""The op-family contract: what a loss family declares once, and the op schemas made from it.

A :class:`Spec` names a family's tensor inputs (which get gradients), its options (name, schema type,
default, check, front-end conversion), its outputs and a shape rule.  From it come

* the two schemas, defined by :func:`declare` (called by ``memops/meta``, with the fake kernels)::

      memops::<name>(<inputs>, <options>, bool[] grad_mask) -> (<outputs>, Tensor[] grads)
      memops::<name>_backward(Tensor?[] grad_outputs, <inputs>, Tensor[] saved, <options>,
                              bool[] need, bool[] have) -> Tensor[]

  ``grads`` holds, when a scalar loss is trained, its gradients with respect to every input with
  ``grad=True`` (a ``Tensor[]`` input counts once per element) computed in the forward pass, else empty
  ``[0]`` placeholders; the backward op scales what the forward computed (``have``) and recomputes
  what it did not (``need`` and not ``have``).  A family without forward gradients (``forward_grads=False``)
  has neither ``grad_mask`` nor ``grads``.
* argument binding by name (:meth:`Spec.bind`), validation (:meth:`Spec.validate`: each option's check,
  then the family's cross-argument check from ``memops/validation.py``) and the front-end call
  (:meth:`Spec.call`: defaults, conversions, ``grad_mask``);
* the real kernels, autograd and the shared backward (``memops/ops/family.py``).

This module imports no kernel code: both layers use it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from . import validation
from .rules import placeholder

LIB = torch.library.Library("memops", "DEF")  # owns every memops schema


@dataclass(frozen=True)
class Input:
    """A tensor argument: ``kind`` is its schema type (``Tensor``, ``Tensor?`` or ``Tensor[]``); ``grad``:
    the op returns a gradient for it; ``convert``: what the front end applies to the user's value;
    ``refuse_grad``: a float input the op has no derivative for, refused when it requires grad (a silent
    zero gradient otherwise)."""

    name: str
    kind: str = "Tensor"
    grad: bool = False
    convert: Callable[[Any], Any] | None = None
    refuse_grad: bool = False


@dataclass(frozen=True)
class Option:
    """A non-tensor argument: schema type (``int``, ``int[]``, ``float``, ``float?``, ``bool``, ``str``), default,
    ``check(name, value)`` (after the type check) and the front end's conversion of the user's value."""

    name: str
    type: str
    default: Any
    check: Callable[[str, Any], None] | None = None
    convert: Callable[[Any], Any] | None = None


def _check(o: Option, value) -> None:
    validation.check_option(o.name, o.type, value)
    if o.check is not None:
        o.check(o.name, value)


# option values that passed their checks, per family: ``(spec name, values, their types)`` -> the values as
# their schema types.  Option checks read nothing but the values, so a call with values seen before skips
# them (a per-call cost at small shapes: ``python -m memops bench --preset overhead``); the types are part of
# the key (``True == 1``, yet an int option refuses a bool).  Bounded: cleared when full.
_PASSED: dict = {}
_PASSED_MAX = 4096


def _typed(v):
    """An option value with its type, element-wise for a sequence (``(1, 2.0) == (1, 2)``, yet an ``int[]``
    option refuses the float)."""
    if isinstance(v, (list, tuple)):
        return (type(v), tuple(_typed(e) for e in v))
    return (type(v), v)


def _option_key(name: str, values: Sequence):
    try:
        key = (name, tuple(_typed(v) for v in values))
        hash(key)
    except TypeError:  # an unhashable value: never a valid option, the checks name it
        return None
    return key


class Args:
    """One call's arguments by name (``a.input``, ``a.reduction``, ...)."""

    def __init__(self, **values):
        # setattr and a list of the names, not ``self.__dict__``: dynamo of torch 2.9-2.11 can trace neither
        # ``self.__dict__.update`` nor a dict built from ``self.__dict__``
        self._keys = tuple(values)
        for k, v in values.items():
            setattr(self, k, v)

    if TYPE_CHECKING:  # the names are the spec's, known at run time only

        def __getattr__(self, name: str) -> Any: ...

    def replace(self, **values) -> Args:
        both = {k: getattr(self, k) for k in self._keys}
        both.update(values)
        return Args(**both)


@dataclass(frozen=True)
class Spec:
    name: str
    inputs: tuple[Input, ...]
    options: tuple[Option, ...]
    outputs: tuple[str, ...]
    shapes: Callable[[Args], tuple]  # fake non-gradient outputs
    check: Callable[[Args], None]  # cross-argument checks (the family's meta/<family>.py)
    differentiable: tuple[str, ...] = ("loss",)  # outputs that take an incoming gradient
    forward_grads: bool = True
    scalar: Callable[[Args], bool] = field(default=lambda a: a.reduction != "none")
    # differentiable outputs that a call returns detached (an option turns their gradient on)
    detached: Callable[[Args], tuple[str, ...]] = field(default=lambda a: ())

    def live(self, a: Args) -> list[int]:
        """Positions of the outputs that carry a gradient in this call."""
        off = self.detached(a)
        return [k for k, name in enumerate(self.outputs) if name in self.differentiable and name not in off]

    # ---- names and schemas -------------------------------------------------------------------------
    @property
    def qualname(self) -> str:
        return f"memops::{self.name}"

    @property
    def backward_name(self) -> str:
        return f"{self.name}_backward"

    def _params(self) -> str:
        return ", ".join([f"{i.kind} {i.name}" for i in self.inputs])

    def _opts(self) -> str:
        return ", ".join(f"{o.type} {o.name}" for o in self.options)

    def schema(self) -> str:
        outs = ", ".join(["Tensor"] * len(self.outputs) + (["Tensor[]"] if self.forward_grads else []))
        mask = ", bool[] grad_mask" if self.forward_grads else ""
        return f"({self._params()}, {self._opts()}{mask}) -> ({outs})"

    def backward_schema(self) -> str:
        return (
            f"(Tensor?[] grad_outputs, {self._params()}, Tensor[] saved, {self._opts()}, "
            "bool[] need, bool[] have) -> Tensor[]"
        )

    # ---- arguments ---------------------------------------------------------------------------------
    def __post_init__(self):
        # computed once here, not lazily: a ``functools.cached_property`` takes a lock that torch.compile cannot
        # trace, so a process whose first memops call was compiled failed (every torch release)
        inputs, options = [i.name for i in self.inputs], [o.name for o in self.options]
        forward = inputs + options + (["grad_mask"] if self.forward_grads else [])
        names = (tuple(forward), tuple(inputs + ["saved"] + options + ["need", "have"]), frozenset(inputs + options))
        object.__setattr__(self, "_names", names)

    # the positional argument names of the forward and the backward op (less ``grad_outputs``), and the names a
    # front end may pass (set by ``__post_init__``)
    _names: tuple = field(init=False, repr=False, compare=False)

    def bind(self, args: Sequence, backward: bool = False) -> Args:
        """Positional op arguments as :class:`Args` (forward, or backward without ``grad_outputs``)."""
        names = self._names[1 if backward else 0]
        if len(args) != len(names):
            raise TypeError(f"{self.qualname} takes {len(names)} arguments ({', '.join(names)}), got {len(args)}")
        return Args(**dict(zip(names, args)))

    def tensors(self, a: Args) -> list:
        return [getattr(a, i.name) for i in self.inputs]

    def option_values(self, a: Args) -> list:
        return [getattr(a, o.name) for o in self.options]

    def grad_slots(self, a: Args) -> list:
        """The tensors that can get a gradient, in output order (a ``Tensor[]`` input element-wise)."""
        slots: list = []
        for i in self.inputs:
            if i.grad:
                v = getattr(a, i.name)
                slots.extend(v if i.kind == "Tensor[]" else [v])
        return slots

    def check_options(self, values: dict) -> None:
        """The front end's conversion and the checks of the options in ``values`` (by name)."""
        for o in self.options:
            if o.name in values:
                _check(o, o.convert(values[o.name]) if o.convert is not None else values[o.name])

    def checked_options(self, values: Sequence) -> tuple:
        """``values`` (one per option, in order) checked, as the Python types of their schema (``float`` for an
        int given as a float); values seen before (:data:`_PASSED`) are not checked again."""
        key = None if torch.compiler.is_compiling() else _option_key(self.name, values)
        done = None if key is None else _PASSED.get(key)
        if done is None:
            for o, v in zip(self.options, values):
                _check(o, v)
            done = tuple(validation.as_schema_type(o.type, v) for o, v in zip(self.options, values))
            if key is not None:
                if len(_PASSED) >= _PASSED_MAX:
                    _PASSED.clear()
                _PASSED[key] = done
        return done

    def validate(self, a: Args) -> None:
        """Every check that reads no tensor data: each option's type and range, then the family's."""
        self.checked_options(self.option_values(a))
        self.check(a)

    def fake_grads(self, a: Args, mask: Sequence[bool]) -> list:
        """Gradient outputs: contiguous and like their tensor where ``mask`` holds (and the tensor is a float
        one: class-index targets have a slot, never a gradient), else placeholders."""
        like = a.input
        return [
            t.new_empty(t.shape) if (m and t is not None and t.is_floating_point()) else placeholder(like)
            for t, m in zip(self.grad_slots(a), mask)
        ]

    def forward_mask(self, a: Args) -> list[bool]:
        """Which gradients this forward call computes: ``grad_mask`` when the loss is a scalar."""
        scalar = self.scalar(a)
        return [scalar and bool(m) for m in a.grad_mask]

    def op(self):
        return getattr(torch.ops.memops, self.name)

    def backward_op(self):
        return getattr(torch.ops.memops, self.backward_name)

    def call(self, **values):
        """The front end's call: defaults and conversions applied, validated, ``grad_mask`` from the
        tensors (grad mode on and ``requires_grad``); returns the op's outputs."""
        # a loop, not ``values.keys() - names``: dynamo of torch 2.11 cannot trace that set difference
        allowed = self._names[2]
        unknown = [k for k in values if k not in allowed]
        if unknown:
            raise TypeError(f"{self.qualname}: unexpected arguments {sorted(unknown)}")
        for i in self.inputs:
            v = values.get(i.name)
            values[i.name] = i.convert(v) if i.convert is not None else v
        opts = []
        for o in self.options:
            v = values.get(o.name, o.default)
            opts.append(o.convert(v) if o.convert is not None else v)
        # checked on the user's values; the op gets them as their schema types
        for o, v in zip(self.options, self.checked_options(opts)):
            values[o.name] = v
        a = Args(**values)
        self.check(a)
        args = self.tensors(a) + self.option_values(a)
        if self.forward_grads:
            on = torch.is_grad_enabled()
            args.append([on and t is not None and t.requires_grad for t in self.grad_slots(a)])
        direct = EAGER.get(self.name)
        out = None if direct is None else direct(args)
        if out is not None:
            return out
        try:
            return self.op()(*args)
        except RuntimeError as e:  # an error the kernel layer names (torch.func on the public path: NAMERS)
            for namer in NAMERS:
                named = namer(self.qualname, e)
                if named is not None:
                    raise named from e
            raise


def declare(spec: Spec) -> None:
    """Define ``spec``'s forward and backward schemas and register their fake kernels."""
    LIB.define(spec.name + spec.schema())
    LIB.define(spec.backward_name + spec.backward_schema())

    def fake(*args):
        a = spec.bind(args)
        spec.validate(a)
        outs = tuple(spec.shapes(a))
        return outs + ((spec.fake_grads(a, spec.forward_mask(a)),) if spec.forward_grads else ())

    def fake_backward(grad_outputs, *args):
        a = spec.bind(args, backward=True)
        spec.validate(a)
        return spec.fake_grads(a, a.need)

    torch.library.register_fake(spec.qualname, fake, lib=LIB)
    torch.library.register_fake(f"memops::{spec.backward_name}", fake_backward, lib=LIB)


SPECS: dict[str, Spec] = {}
# op name -> ``call(args)``: the op's autograd kernel run directly when nothing but the CPU / CUDA backend would
# see the call (``memops/ops/torch_private.py``: ``eager_call``, on the private path), else None; the front ends
# call the op otherwise
EAGER: dict[str, Callable] = {}
# ``namer(qualname, error) -> Exception | None``: the kernel layer's names for errors torch raises from an op
# call (``memops/ops/torch_private.py``: torch.func refused on the public registration path)
NAMERS: list[Callable] = []


def register(spec: Spec) -> Spec:
    """Declare ``spec`` (schemas and fake kernels) and list it in :data:`SPECS`."""
    if spec.name in SPECS:
        raise ValueError(f"op family {spec.name!r} is declared twice")
    declare(spec)
    SPECS[spec.name] = spec
    return spec


def schemas() -> list[str]:
    """Every declared op's forward and backward schema (``python -m memops schemas``; every family is
    declared once ``memops`` is imported)."""
    out = []
    for name, spec in sorted(SPECS.items()):
        out += [f"memops::{name}{spec.schema()}", f"memops::{spec.backward_name}{spec.backward_schema()}"]
    return out
