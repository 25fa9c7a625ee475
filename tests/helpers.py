"""Small test utilities: matmul FLOP counting that sees inside memops' kernels; a multi-process launcher."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time

from torch.profiler import ProfilerActivity, profile

_MM = {"aten::mm": (0, 1), "aten::addmm": (1, 2), "aten::addmm_": (1, 2)}


class MatmulFlops:
    """Counts ``2*m*n*k`` for every BLAS matmul the process runs inside the block (profiler-based,
    so it sees into custom-op kernels and torch.func transforms alike)."""

    def __enter__(self):
        self._prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
        self._prof.__enter__()
        return self

    def __exit__(self, *exc):
        self._prof.__exit__(*exc)
        self.flops = 0
        self.calls = []
        for evt in self._prof.events():
            if evt.name in _MM:
                ia, ib = _MM[evt.name]
                a, b = evt.input_shapes[ia], evt.input_shapes[ib]
                self.flops += 2 * a[0] * a[1] * b[1]
                self.calls.append(evt.name)
        return False


def projection_flops(n: int, v: int, d: int) -> int:
    return 2 * n * v * d


def backward_op_args(name: str, args: tuple, grad_outputs: list, need: list | None = None) -> tuple:
    """Arguments of ``memops::<name>_backward`` after the forward call ``memops::<name>(*args)``: the
    forward's gradient outputs as ``saved`` (with its ``have``), tensors detached (the backward op has no
    derivative of its own), ``need`` every gradient slot by default."""
    import torch

    from memops.contract import SPECS

    spec = SPECS[name]
    a = spec.bind(args)
    out = spec.op()(*args)
    saved, have = (list(out[-1]), spec.forward_mask(a)) if spec.forward_grads else ([], [])

    def plain(t):
        if isinstance(t, list):
            return [e.detach() for e in t]
        return t.detach() if isinstance(t, torch.Tensor) else t

    tensors = [plain(t) for t in spec.tensors(a)]
    need = [True] * len(spec.grad_slots(a)) if need is None else need
    return (grad_outputs, *tensors, saved, *spec.option_values(a), need, have)


def op_args(name: str, **values) -> tuple:
    """Positional arguments of ``torch.ops.memops.<name>`` from keyword values (inputs by name, None when not
    given; options at their declared defaults; ``grad_mask`` all False unless given)."""
    from memops.contract import SPECS

    spec = SPECS[name]
    args = [values.pop(i.name, [] if i.kind == "Tensor[]" else None) for i in spec.inputs]
    for o in spec.options:
        if o.name in values:  # as given: the op's own form (chunk_size 0 is the default policy)
            args.append(values.pop(o.name))
        else:
            args.append(o.convert(o.default) if o.convert is not None else o.default)
    if spec.forward_grads:
        args.append(list(values.pop("grad_mask", [False] * sum(i.grad for i in spec.inputs))))
    assert not values, f"{name} has no argument {sorted(values)}"
    return tuple(args)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: list[str], world: int, timeout: float = 240, env: dict | None = None, ranks: int | None = None):
    """Run ``argv`` as ``ranks`` processes (default ``world``: one per rank, RANK / LOCAL_RANK / WORLD_SIZE /
    MASTER_ADDR / MASTER_PORT set as torchrun sets them; ``ranks=1`` for a launcher such as ``accelerate
    launch`` that starts the ranks itself), tests/ on PYTHONPATH, one thread each.  Returns
    ``[(returncode, output), ...]``; a process still running at ``timeout`` is killed."""
    tests = os.path.dirname(os.path.abspath(__file__))
    base = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        WORLD_SIZE=str(world),
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]),
        **(env or {}),
    )
    procs = [
        subprocess.Popen(
            argv,
            env=dict(base, RANK=str(r), LOCAL_RANK=str(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world if ranks is None else ranks)
    ]
    deadline = time.monotonic() + timeout
    results = []
    try:
        for p in procs:
            try:
                out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                out, _ = p.communicate()
                out += f"\n[killed after {timeout} s]"
            results.append((p.returncode, out))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return results


class Syncs:
    """Counts, in ``seen``, every operation inside the block that makes the host wait for the device, as it
    would on CUDA: reading a value (``_local_scalar_dense``: ``item``, ``bool``, ``int``; ``is_nonzero``,
    ``equal``), an output sized by the data (``nonzero``, ``masked_select``, ``unique``, boolean-mask
    indexing), a copy to the CPU (``_to_copy`` / ``copy_`` / ``.cpu()`` / ``.to("cpu")`` / ``tolist`` /
    ``numpy``, counted at the Python call even on CPU tensors, where nothing moves).

    It sees inside memops' ops: a memops op reaching the dispatch mode runs its real kernel
    (``memops.ops.family.IMPLS``) with the counter still on.  The mode only watches (``observes_only``), so
    memops' eager-only paths (donated gradients) run as without it.
    """

    def __init__(self):
        self.seen: list[str] = []

    def __enter__(self):
        import torch
        from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack
        from torch.utils._python_dispatch import TorchDispatchMode

        from memops.ops import family

        seen = self.seen
        cpu = torch.device("cpu")
        copies = {torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu}

        def to_cpu(args, kwargs) -> bool:
            for v in (*args[1:], kwargs.get("device")):
                if (isinstance(v, str) and v.startswith("cpu")) or v == cpu:
                    return True
            return False

        class Functions(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func in copies or (func is torch.Tensor.to and to_cpu(args, kwargs)):
                    seen.append(f"Tensor.{func.__name__}")
                return func(*args, **kwargs)

        functions = Functions()

        class Dispatch(TorchDispatchMode):
            observes_only = True
            DATA_SIZED = {
                "aten::nonzero", "aten::masked_select", "aten::unique", "aten::_unique2", "aten::unique_dim",
                "aten::unique_consecutive",
            }  # fmt: skip
            # one sync each: a read called from Python at the top reaches the mode as ``_local_scalar_dense``;
            # inside a memops kernel (below autograd) as the op called, ``item`` or ``is_nonzero``
            READS = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal"}

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                name = func._schema.name
                if name.startswith("memops::"):
                    impl = family.IMPLS[name.split("::", 1)[1]]
                    on = functions in _get_current_function_mode_stack()
                    with self, contextlib.nullcontext() if on else functions:
                        return impl(*args, **kwargs)
                bool_index = name in ("aten::index", "aten::index_put", "aten::index_put_") and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ())
                )
                to_host = (name == "aten::_to_copy" and kwargs.get("device") == cpu and args[0].device != cpu) or (
                    name == "aten::copy_" and args[0].device == cpu and args[1].device != cpu
                )
                if name in self.READS or name in self.DATA_SIZED or bool_index or to_host:
                    seen.append(name)
                return func(*args, **kwargs)

        self._modes = [functions, Dispatch()]
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc):
        for m in reversed(self._modes):
            m.__exit__(*exc)
        return False
