"""Every private torch API of memops' op registration, dispatch and autograd, in this one module, each used only
where a probe at import shows that the running release behaves as memops needs; the public ``torch.library``
path is the fallback.  (The few other private names memops reads -- functional collectives, device-side
asserts, a DTensor layout helper -- are listed with their reasons in docs/internals.md.)

Two paths register an op family's autograd (:func:`register_autograd`):

``"private"``
    memops' own kernel at the ``Autograd`` dispatch key: one ``autograd.function._SingleLevelFunction``
    whose forward redispatches below autograd (``torch._C._AutoDispatchBelowAutograd``,
    ``torch._C._after_autograd_keyset``, ``OpOverload.redispatch``), the ``Tensor[]`` arguments spread by
    position instead of pytree-flattened, the CPU/CUDA kernel called without a second trip through the
    dispatcher, and the front ends' plain-eager calls made straight to that kernel (:func:`eager_call`: the
    dispatcher's thread-local key sets, torch-function / dispatch mode and tracing state read to know that
    nothing else would see the call).  ``torch.func`` transforms (``grad``, ``vjp``, ``vmap``, ``jvp``) work
    through it: under a transform the function is applied as a single-level function
    (``torch._C._functorch.set_single_level_autograd_function_allowed``), as functorch's own
    ``custom_function_call`` does for its generated functions.  torch 2.14 moved ``autograd.Function.apply``
    into C++, where a ``Function`` subclass under a transform is always routed to ``custom_function_call``,
    which has no kernel at the ``Autograd`` key ("could not find kernel for HigherOrderOperator
    custom_function_call"): the base class is ``_SingleLevelFunction`` (``Function`` less that routing) on
    every release.
``"public"``
    ``torch.library.register_autograd`` with the family's ``setup_context`` and ``backward`` (and the public
    ``register_fake`` / ``register_vmap`` both paths use): eager autograd, ``torch.compile``,
    ``torch.export`` and ``vmap`` of the op are exact; ``torch.func.grad`` / ``vjp`` / ``jvp`` are refused
    by name (the generated ``autograd.Function`` of ``register_autograd`` has no ``setup_context`` for
    functorch, on every release tested); every call goes through the dispatcher
    (``python -m memops bench --preset overhead`` measures the cost).

The path is chosen once at import: ``MEMOPS_TORCH_PRIVATE=0`` forces the public one (the tests run both),
else :func:`_probe` runs a tiny op through the private path -- a gradient taken inside its kernel and the
eager gradient through its autograd node, each against its closed form -- and any failure or missing entry
point selects the public path.  :data:`PATH` and :data:`PROBE_ERROR` say which and why (``python -m memops
doctor`` prints both).  The ``torch.func`` half (``grad`` and ``jvp`` of the same op) runs once, on the first
memops call under a transform, in a thread of its own (:func:`functorch_probe_error`): importing
``torch.func`` imports dynamo and triton, which ``import memops`` must not (0.07 s against 1.5 s); where it
fails, calls under a transform are refused by name.

Chunk heads that take a gradient inside a kernel (user transforms, GRPO's token coefficients) run
:func:`autograd_inside_kernel`: grad mode with the autograd keys taken off the thread-local exclude set
(``torch._C._ForceDispatchKeyGuard``).  No public API turns autograd back on below the ``Autograd`` key; its
probe is part of :func:`_probe`, and on the public path the same guard is used when it exists (it does on
every release 2.9-2.15).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable

import torch
from torch import Tensor

from ..contract import EAGER, LIB, NAMERS

# the registration path: "private" while the probe runs it (set by _choose at the end of this module)
PATH = "private"

# ---- reading the dispatcher's state --------------------------------------------------------------------


def functorch_active() -> bool:
    """Whether a ``torch.func`` transform (grad, vjp, jvp, vmap) is active (on the public path torch refuses
    transforms before memops' code runs: False)."""
    return PATH == "private" and torch._C._are_functorch_transforms_active()


def plain_eager(t: Tensor) -> bool:
    """True outside torch.compile / export / make_fx tracing, torch.func transforms and any dispatch mode (but
    one that only watches: a mode with ``observes_only = True``, as the tests' sync counter).  Always False on
    the public path: the forward's gradients are then never donated (the backward op scales copies)."""
    if PATH != "private" or type(t) is not torch.Tensor or torch.compiler.is_compiling() or functorch_active():
        return False
    if torch._C._len_torch_dispatch_stack() == 0:
        return True
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return all(getattr(m, "observes_only", False) for m in _get_current_dispatch_mode_stack())


def grad_tracked(t) -> bool:
    """Whether ``t`` is tracked by a torch.func grad level enclosing the one whose backward runs (its
    wrappers, vmap's included, hold two grad-tracking layers: this level's and an outer one's).  False on the
    public path (no transform reaches memops there)."""
    if PATH != "private":
        return False
    ft, layers = torch._C._functorch, 0
    while isinstance(t, Tensor) and ft.is_functorch_wrapped_tensor(t):
        layers += bool(ft.is_gradtrackingtensor(t))
        t = ft.get_unwrapped(t)
    return layers > 1


def functorch_wrapped(t) -> bool:
    return PATH == "private" and isinstance(t, Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(t)


def dual_level_open() -> bool:
    """Whether a forward-mode AD dual level is open (``torch.autograd.forward_ad.dual_level``)."""
    return torch.autograd.forward_ad._current_level >= 0


def has_tangent(tensors) -> bool:
    """Whether forward-mode AD (``torch.autograd.forward_ad``, ``torch.func.jvp`` / ``jacfwd``) gave any of
    ``tensors`` a tangent (one global read when no dual level is open)."""
    if not dual_level_open():
        return False
    for t in tensors:
        for u in t if isinstance(t, (list, tuple)) else (t,):
            if isinstance(u, Tensor) and torch.autograd.forward_ad.unpack_dual(u).tangent is not None:
                return True
    return False


_AUTOGRAD_KEYS = ("AutogradCPU", "AutogradCUDA", "AutogradOther", "ADInplaceOrView")


@contextlib.contextmanager
def autograd_inside_kernel():
    """Grad mode with autograd dispatch turned back on inside a custom op's kernel.

    A custom op's real kernel runs below the autograd dispatch keys, so tensors
    made there do not record a graph.  Chunk heads that derive their gradient
    with ``torch.autograd.grad`` run under this context instead.
    """
    keys = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for name in _AUTOGRAD_KEYS:
        exclude = exclude.remove(getattr(keys, name))
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        yield


# ---- the two registration paths ------------------------------------------------------------------------

_DIRECT = (torch._C.DispatchKey.CPU, torch._C.DispatchKey.CUDA)


def _private_function_base():
    return torch.autograd.function._SingleLevelFunction


def _apply_of(fn_class, qualname: str):
    """``fn_class.apply``, run as a single-level function under a torch.func transform: this kernel runs at
    the Autograd key, where the transform has already unwrapped its level's tensors and expects a plain
    autograd node.  The first call under a transform runs :func:`functorch_probe_error`; where it failed, every
    call under a transform is refused by name."""
    single = fn_class.apply
    ft = torch._C._functorch

    def apply(*args):
        if not functorch_active():
            return single(*args)
        error = functorch_probe_error()
        if error is not None:
            raise FunctorchUnavailable(
                f"{qualname}: torch.func transforms of memops ops failed memops' probe on this torch "
                f"({torch.__version__}): {error}; reverse mode (torch.autograd.grad, .backward()) works"
            )
        allowed = ft.get_single_level_autograd_function_allowed()
        ft.set_single_level_autograd_function_allowed(True)
        try:
            return single(*args)
        finally:
            ft.set_single_level_autograd_function_allowed(allowed)

    return apply


def register_private(
    name: str,
    op,
    kernel: Callable,
    n_outputs: int,
    forward_grads: bool,
    flat: Callable,
    unflat: Callable,
    setup_context: Callable,
    backward: Callable,
    jvp: Callable,
    refuse_requires_grad: Callable,
    n_inputs: int,
    lib=LIB,
) -> Callable:
    """The private path's autograd kernel of op ``name`` (registered at ``Autograd`` with its keyset; its first
    ``n_inputs`` arguments are the tensor inputs); returns its plain-eager call (:func:`eager_call`)."""
    below = torch._C._after_autograd_keyset

    def redispatch(keyset, args):
        if keyset is None:  # eager_call: the backend kernel, as the dispatcher would pick it
            return kernel(*args)
        rest = (keyset & below).remove(torch._C.DispatchKey.ADInplaceOrView)  # a fallthrough for these ops
        if rest.highestPriorityTypeId() in _DIRECT:
            return kernel(*args)
        return op.redispatch(keyset & below, *args)

    class Fn(_private_function_base()):  # type: ignore[misc]  # a base class chosen at run time
        # forward / setup_context kept apart: what torch.func's transforms (grad, vjp, jvp) need
        @staticmethod
        def forward(keyset, layout, rest, *flat_args):  # rest: the non-tensor arguments, as one tuple
            args = unflat(flat_args, layout) + list(rest)
            with torch._C._AutoDispatchBelowAutograd():
                result = redispatch(keyset, args)
            if forward_grads:
                return (*result[:n_outputs], *result[n_outputs])
            return tuple(result)

        @staticmethod
        def setup_context(ctx, inputs, output):
            _, layout, rest, *flat_args = inputs
            result = (*output[:n_outputs], list(output[n_outputs:])) if forward_grads else output
            setup_context(ctx, unflat(flat_args, layout) + list(rest), result, flat_args, layout)
            ctx.rest = rest
            ctx.n_flat = len(flat_args)

        @staticmethod
        def backward(ctx, *grad_outputs):
            layout = ctx.layout  # setup_context's
            flags = ctx.needs_input_grad
            try:
                ctx.needs_input_grad = tuple(unflat(flags[3 : 3 + ctx.n_flat], layout))
                result = backward(ctx, *grad_outputs[:n_outputs], list(grad_outputs[n_outputs:]))
            finally:
                ctx.needs_input_grad = flags
            out = []
            for g, n in zip(result[: len(layout)], layout):
                out.extend((g if g is not None else [None] * n) if n is not None else [g])
            return (None, None, None, *out)

        @staticmethod
        def jvp(ctx, _keyset, _layout, _rest, *tangents):
            return jvp(ctx, tangents)

    Fn.__name__ = Fn.__qualname__ = f"MemopsBackward_{name}"
    apply = _apply_of(Fn, f"memops::{name}")

    def autograd_kernel(keyset, *args):
        if (torch.is_grad_enabled() and torch._C._any_requires_grad(*args)) or has_tangent(args[:n_inputs]):
            refuse_requires_grad(args)
            flat_args, layout = flat(args[:n_inputs])
            out = apply(keyset, layout, tuple(args[n_inputs:]), *flat_args)
            return (*out[:n_outputs], list(out[n_outputs:])) if forward_grads else out
        with torch._C._AutoDispatchBelowAutograd():
            return redispatch(keyset, args)

    lib.impl(name, autograd_kernel, "Autograd", with_keyset=True)
    return eager_call(n_inputs, autograd_kernel)


def eager_call(n_inputs: int, autograd_kernel):
    """The front end's call of ``op``, made without the dispatcher where the dispatcher would run exactly
    this: its autograd kernel, then the real kernel on a CPU or CUDA backend.  That holds when every tensor
    argument is a plain CPU / CUDA ``torch.Tensor`` and no tracer, mode or transform is active
    (torch.compile, torch.func, ``torch.jit.trace``, torch function and dispatch modes, the profiler: under any
    of them, and for meta / fake / subclass tensors, the op itself is called, so each sees it).  Saves the
    dispatcher's boxing of the op's arguments and results (a per-call cost at small shapes: ``python -m memops
    bench --preset overhead``).  Returns None where it does not apply."""
    is_compiling = torch.compiler.is_compiling
    profiler = torch.autograd.profiler

    def call(args):
        # the dispatcher's thread-local key sets as outside any context that changes dispatch: a dispatch mode,
        # torch.func, autocast, inference mode, a kernel running below autograd each add or drop keys there
        if (
            is_compiling()  # first: torch.compile traces the op call (and reads no key sets)
            or torch._C._dispatch_tls_local_include_set().raw_repr() != _PLAIN_TLS[0]
            or torch._C._dispatch_tls_local_exclude_set().raw_repr() != _PLAIN_TLS[1]
            or torch._C._is_torch_function_mode_enabled()
            or profiler._is_profiler_enabled
            or torch._C._get_tracing_state() is not None
        ):
            return None
        for t in args[:n_inputs]:
            for u in t if isinstance(t, (list, tuple)) else (t,):
                if u is not None and (type(u) is not torch.Tensor or not (u.is_cpu or u.is_cuda)):
                    return None
        return autograd_kernel(None, *args)

    return call


# the thread-local dispatch key sets (included, excluded) of plain eager code, read as memops is imported
_PLAIN_TLS = (
    torch._C._dispatch_tls_local_include_set().raw_repr(),
    torch._C._dispatch_tls_local_exclude_set().raw_repr(),
)


class FunctorchUnavailable(NotImplementedError):
    """A torch.func transform of a memops op on the public registration path."""


def register_public(
    name: str,
    qualname: str,
    n_outputs: int,
    forward_grads: bool,
    flat: Callable,
    setup_context: Callable,
    backward: Callable,
    refuse_requires_grad: Callable,
    n_inputs: int,
    lib=LIB,
) -> None:
    """The public path: ``torch.library.register_autograd`` with the family's context and backward."""

    def setup(ctx, inputs, output):
        refuse_requires_grad(list(inputs))
        flat_args, layout = flat(inputs[:n_inputs])
        result = (*output[:n_outputs], list(output[n_outputs])) if forward_grads else output
        setup_context(ctx, list(inputs), result, flat_args, layout)
        ctx.rest = tuple(inputs[n_inputs:])
        ctx.n_flat = len(flat_args)

    def bwd(ctx, *grad_outputs):
        if forward_grads:  # the Tensor[] grads output comes as one list
            grad_outputs = (*grad_outputs[:n_outputs], list(grad_outputs[n_outputs] or []))
        return tuple(backward(ctx, *grad_outputs))

    torch.library.register_autograd(qualname, bwd, setup_context=setup, lib=lib)


def refuse_transforms(qualname: str) -> None:
    """On the public path, in the op's real kernel: ``register_autograd``'s function has no forward derivative,
    so a tangent would be dropped (a silent zero).  A tangent cannot be seen below autograd; any call while a
    forward-mode dual level is open (``torch.autograd.forward_ad.dual_level``, ``torch.func.jvp`` /
    ``jacfwd``) is refused by name."""
    if dual_level_open():
        raise FunctorchUnavailable(_refusal(qualname, "forward-mode AD (torch.func.jvp / jacfwd, forward_ad)"))


def _refusal(qualname: str, what: str) -> str:
    why = f"it failed its probe: {PROBE_ERROR}" if PROBE_ERROR else "MEMOPS_TORCH_PRIVATE=0 chose the public path"
    return (
        f"{qualname}: {what} needs memops' private registration path, which this torch ({torch.__version__}) does "
        f"not take ({why}); reverse mode (torch.autograd.grad, .backward()) works on every path"
    )


def functorch_refusal(qualname: str, error: Exception) -> Exception | None:
    """For ``error`` raised by a memops op call on the public path: the refusal naming the op when it is torch's
    refusal of a torch.func transform by ``register_autograd``'s generated function, else None."""
    if PATH == "public" and "functorch transforms" in str(error):
        return FunctorchUnavailable(_refusal(qualname, "torch.func transforms (grad, vjp, vmap of a gradient)"))
    return None


# ---- the probe --------------------------------------------------------------------------------------------


_PROBE_OP: list = []  # the probe's op once registered (the torch.func half runs it later)
# the torch.func half of the probe's result once run (None: passed), and the flag of its own thread
_FUNCTORCH: dict = {}
_IN_PROBE = threading.local()


def _probe() -> str | None:
    """Register a tiny op ``f(x) = sum(x**3)`` (its gradient taken inside the kernel, as the chunk heads do)
    through the private path and check, eagerly, the gradient inside the kernel and the autograd node's, against
    the closed form.  None when it holds, else what failed.  No ``torch.func`` here: importing it imports dynamo
    (and triton), which ``import memops`` must not (seconds of import time, and ``TRITON_INTERPRET`` must be
    set before triton is imported); :func:`functorch_probe_error` checks it on the first call under a
    transform."""
    try:
        lib = torch.library.Library("memops_probe", "FRAGMENT")
        lib.define("cube(Tensor x) -> (Tensor, Tensor)")

        def kernel(x):
            with autograd_inside_kernel():
                leaf = x.detach().requires_grad_(True)
                (g,) = torch.autograd.grad(leaf.pow(3).sum(), leaf)
            return x.pow(3).sum(), g.detach()

        lib.impl("cube", kernel, "CompositeExplicitAutograd")
        torch.library.register_fake("memops_probe::cube", lambda x: (x.new_empty(()), torch.empty_like(x)), lib=lib)
        op = torch.ops.memops_probe.cube.default

        def setup(ctx, inputs, output, flat_args, layout):
            ctx.layout = layout
            ctx.save_for_backward(*flat_args)
            ctx.save_for_forward(*flat_args)
            ctx.mark_non_differentiable(output[1])

        def backward(ctx, grad, _g, _rest):
            (x,) = ctx.saved_tensors
            return (3 * x * x * grad,)

        def jvp(ctx, tangents):
            (x,) = ctx.saved_tensors
            return (3 * x * x * tangents[0]).sum(), None

        def flat(ts):
            return list(ts), [None] * len(ts)

        def unflat(ts, layout):
            return list(ts)

        register_private(
            "cube", op, kernel, 2, False, flat, unflat, setup, backward, jvp, lambda args: None, 1, lib=lib
        )
        x = torch.tensor([0.5, -1.25, 2.0], dtype=torch.float64)
        xr = x.clone().requires_grad_(True)
        loss, inner = op(xr)
        (eager,) = torch.autograd.grad(loss, xr)
        for what, got in (("gradient inside the kernel", inner), ("eager gradient", eager)):
            if not torch.equal(got, 3 * x * x):
                return f"{what} differs"
        _PROBE_OP.append((lib, op))
        return None
    except Exception as e:  # any missing entry point or changed behaviour: the public path
        return f"{type(e).__name__}: {e}"


def functorch_probe_error() -> str | None:
    """The torch.func half of the probe, run once, on the first memops call under a transform (the caller has
    imported torch.func): ``torch.func.grad`` and ``torch.func.jvp`` of the probe's op against the closed form,
    in a thread of its own (functorch's transform stack and the dispatcher's key sets are per thread: the
    caller's transform and kernel frame stay out of it).  None when they hold, else what failed."""
    if "result" not in _FUNCTORCH:
        if getattr(_IN_PROBE, "on", False):  # the probe's own calls
            return None

        def run():
            _IN_PROBE.on = True
            try:
                (_, op), x = _PROBE_OP[0], torch.tensor([0.5, -1.25, 2.0], dtype=torch.float64)
                t = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
                fgrad = torch.func.grad(lambda u: op(u)[0])(x)
                _, tangent = torch.func.jvp(lambda u: op(u)[0], (x,), (t,))
                if not torch.equal(fgrad, 3 * x * x):
                    _FUNCTORCH["result"] = "torch.func.grad differs"
                elif not torch.equal(tangent, (3 * x * x * t).sum()):
                    _FUNCTORCH["result"] = "torch.func.jvp differs"
                else:
                    _FUNCTORCH["result"] = None
            except Exception as e:
                _FUNCTORCH["result"] = f"{type(e).__name__}: {e}"

        probe = threading.Thread(target=run, name="memops-functorch-probe")
        probe.start()
        probe.join()
        _FUNCTORCH.setdefault("result", "the probe thread ended without a result")
    return _FUNCTORCH["result"]


def _choose() -> tuple[str, str | None]:
    if os.environ.get("MEMOPS_TORCH_PRIVATE", "1") == "0":
        return "public", None
    error = _probe()
    return ("private", None) if error is None else ("public", error)


PATH, PROBE_ERROR = _choose()
NAMERS.append(functorch_refusal)


def register_autograd(spec, kernel, setup_context, backward, jvp, refuse_requires_grad, flat, unflat):
    """Register ``spec``'s autograd on :data:`PATH`; the front ends' direct eager call goes into
    ``memops.contract.EAGER`` on the private path."""
    n_outputs = len(spec.outputs)
    if PATH == "private":
        EAGER[spec.name] = register_private(
            spec.name,
            spec.op().default,
            kernel,
            n_outputs,
            spec.forward_grads,
            flat,
            unflat,
            setup_context,
            backward,
            jvp,
            refuse_requires_grad,
            len(spec.inputs),
        )
    else:
        register_public(
            spec.name,
            spec.qualname,
            n_outputs,
            spec.forward_grads,
            flat,
            setup_context,
            backward,
            refuse_requires_grad,
            len(spec.inputs),
        )


__all__ = [
    "PATH",
    "PROBE_ERROR",
    "autograd_inside_kernel",
    "functorch_active",
    "functorch_refusal",
    "functorch_wrapped",
    "grad_tracked",
    "plain_eager",
    "register_autograd",
]
