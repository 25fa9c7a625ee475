"""One (method, shape) per subprocess.

The parent starts a worker with ``python -m memops bench --worker METHOD ...`` and
``MALLOC_MMAP_THRESHOLD_=65536`` (so freed tensors go back to the OS), then sends ``step`` lines on its
stdin; the worker answers each with one protocol line on stdout.  A worker warms up (compiles), then
measures peak memory on one untimed step, then reports ready: on CPU the process's peak RSS (``VmHWM``
after resetting it through ``/proc/self/clear_refs``) minus the RSS before the step minus the bytes of
the gradients the step returns; on CUDA the same from ``torch.cuda.max_memory_allocated``.  Timed steps
then run with glibc's steady-state malloc settings (``steady_state_malloc``), as a training process has.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import time

from .methods import UNCHECKED

_MSG = "@@memops "  # prefix of protocol lines on a worker's stdout
_OOM_TEXT = ("out of memory", "can't allocate memory", "cannot allocate memory", "std::bad_alloc")


def _say(obj) -> None:
    print(_MSG + json.dumps(obj), flush=True)


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (Linux); a clear error where there is none."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} field: peak memory is read on Linux only")


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    return any(s in str(exc).lower() for s in _OOM_TEXT)


def describe(exc: BaseException, width: int = 200) -> str:
    """An exception as one line for a results row: its type and the first line of its message."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:width]}"


def make_inputs(
    shape: dict,
    dtype_name: str,
    device_name: str,
    torch,
    loss: str = "cross_entropy",
    ignored: float = 0.1,
    seed: int = 0,
):
    device = torch.device(device_name)
    dtype = getattr(torch, dtype_name)
    # drawn where they are used, from a seeded generator there: a CPU draw of a [128256, 4096] weight takes
    # seconds per worker, single-threaded (CUDA draws differ from CPU draws; each run's reference uses its own)
    g = torch.Generator(device=device).manual_seed(seed)
    n, d, v = shape["tokens"], shape["hidden"], shape["vocab"]
    x = torch.randn(n, d, generator=g, device=device).to(dtype=dtype)
    w = (torch.randn(v, d, generator=g, device=device) / d**0.5).to(dtype=dtype)
    t = torch.randint(0, v, (n,), generator=g, device=device)
    if loss not in ("grpo", "logprobs"):  # these mask tokens through a completion mask instead
        # padding / prompt tokens, as in real batches: a random ``ignored`` fraction of the targets
        t[torch.randperm(n, generator=g, device=device)[: round(ignored * n)]] = -100
    return x.requires_grad_(True), w.requires_grad_(True), t


def _cap_memory(cap_mib: float, cuda: bool, torch) -> None:
    """Let this process use at most ``cap_mib`` MiB more than it holds now (simulates a smaller machine)."""
    extra = int(cap_mib * 2**20)
    if cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, (torch.cuda.memory_allocated() + extra) / total))
        return
    import resource

    limit = status_kib("VmSize") * 1024 + extra
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))


def _peak_extra_bytes(step, x, w, cuda: bool, torch) -> int | None:
    """Run one (untimed) step and return its peak memory above the memory before it, less the gradients
    it returns.  On CPU the process runs with ``MALLOC_MMAP_THRESHOLD_=65536`` up to here, so freed
    tensors have gone back to the OS and resident memory tracks live tensors."""
    x.grad = w.grad = None
    gc.collect()
    base = None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    elif reset_peak_rss():
        base = status_kib("VmRSS") * 1024
    step()
    if cuda:
        torch.cuda.synchronize()
    if base is None:
        return None
    grads = sum(g.numel() * g.element_size() for g in (x.grad, w.grad))
    if cuda:
        return torch.cuda.max_memory_allocated() - base - grads
    return max(0, status_kib("VmHWM") * 1024 - base - grads)  # RSS moves in pages: tiny steps can dip below 0


def steady_state_malloc() -> bool:
    """Give glibc malloc the settings its dynamic rule reaches in a long-running process (mmap threshold
    32 MiB, its maximum; trim threshold twice that) instead of ``MALLOC_MMAP_THRESHOLD_=65536``, under
    which every allocation over 64 KiB is a fresh, page-faulting mmap.  Timed steps run like this."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 64 << 20))
    except (OSError, AttributeError):
        return False


def run_worker(args) -> None:
    import torch

    from .methods import build

    torch.manual_seed(0)
    cuda = args.device.startswith("cuda")
    shape = {"tokens": args.tokens, "hidden": args.hidden, "vocab": args.vocab}
    x, w, t = make_inputs(shape, args.dtype, args.device, torch, args.loss, args.ignored)
    # --bias: the head's bias, a trained parameter (drawn after the other inputs: they stay the same)
    b = None
    if getattr(args, "bias", False):
        g = torch.Generator(device=x.device).manual_seed(1)
        b = torch.randn(args.vocab, generator=g, device=x.device).to(x.dtype).requires_grad_(True)
    fn = build(
        args.worker,
        args.loss,
        args.softcap,
        args.device,
        tokens=args.tokens,
        vocab=args.vocab,
        batch=args.batch,
        ignored=args.ignored,
        beta=args.beta,
        kept=getattr(args, "kept", 0),
        depths=getattr(args, "depths", 2),
    )
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def step():
        x.grad = w.grad = None
        if b is not None:
            b.grad = None
        loss = fn(x, w, t) if b is None else fn(x, w, t, b)
        loss.backward()
        return loss

    if args.worker == "reference":
        loss = step()
        torch.save(
            {"loss": loss.detach().double().cpu(), "gx": x.grad.double().cpu(), "gw": w.grad.double().cpu()},
            args.ref_file,
        )
        _say({"done": True})
        return
    if args.memory_cap_mib is not None:
        _cap_memory(args.memory_cap_mib, cuda, torch)
    try:
        step()  # warm-up (and compilation)
        peak = _peak_extra_bytes(step, x, w, cuda, torch)
    except Exception as exc:  # noqa: BLE001  (reported in the method's row)
        _say({"oom": is_oom(exc), "error": describe(exc)})
        return
    steady_state_malloc()
    _say({"ready": True})
    times, loss = [], None
    for line in sys.stdin:
        if line.strip() != "step":
            break
        x.grad = w.grad = None
        gc.collect()
        try:
            if cuda:
                start.record()
                loss = step()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1000)
            else:
                t0 = time.perf_counter()
                loss = step()
                times.append(time.perf_counter() - t0)
        except Exception as exc:  # noqa: BLE001
            _say({"oom": is_oom(exc), "error": describe(exc)})
            return
        _say({"time_s": times[-1]})
    out = {
        "method": args.worker,
        "status": "ok",
        "time_s": statistics.median(times),
        "times_s": times,
        "peak_extra_bytes": peak,
        "loss": loss.item(),
    }
    if args.ref_file:
        ref = torch.load(args.ref_file)
        out["err_loss"] = abs(loss.item() - ref["loss"].item())
        out["err_grad_input"] = (x.grad.double().cpu() - ref["gx"]).abs().max().item()
        out["err_grad_weight"] = (w.grad.double().cpu() - ref["gw"]).abs().max().item()
    _say(out)


class Worker:
    """The parent's handle on one worker process."""

    def __init__(self, args, method: str, shape: dict, ref_file: str | None, tmp: str):
        cmd = [
            sys.executable,
            "-m",
            "memops",
            "bench",
            "--worker",
            method,
            "--tokens",
            str(shape["tokens"]),
            "--hidden",
            str(shape["hidden"]),
            "--vocab",
            str(shape["vocab"]),
            "--dtype",
            args.dtype,
            "--device",
            args.device,
            "--loss",
            args.loss,
            "--batch",
            str(args.batch),
            "--ignored",
            repr(args.ignored),
            "--beta",
            repr(args.beta),
            "--kept",
            str(getattr(args, "kept", 0)),
            "--depths",
            str(getattr(args, "depths", 2)),
        ]
        if args.softcap is not None:
            cmd += ["--softcap", repr(args.softcap)]
        if getattr(args, "bias", False):
            cmd += ["--bias"]
        if args.memory_cap_mib is not None and method != "reference":
            cmd += ["--memory-cap-mib", repr(args.memory_cap_mib)]
        if ref_file and method not in UNCHECKED:
            cmd += ["--ref-file", ref_file]
        self.method, self.shape = method, shape
        self.failure: dict | None = None
        self._stderr = open(os.path.join(tmp, f"{method}-{shape['tokens']}-{shape['vocab']}.stderr"), "w+")
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True, env=env
        )

    def _fail(self, oom: bool, message: str) -> None:
        n = self.shape["tokens"]
        self.failure = {
            "method": self.method,
            "status": "oom" if oom else "failed",
            "error": f"OOM at {n} tokens" if oom else message,
            "message": message,
        }

    def read(self):
        for line in self.proc.stdout:
            if line.startswith(_MSG):
                msg = json.loads(line[len(_MSG) :])
                if "error" in msg and "status" not in msg:
                    self._fail(msg["oom"], msg["error"])
                    self.proc.wait()
                    return None
                return msg
        rc = self.proc.wait()
        self._stderr.seek(0)
        tail = [ln for ln in self._stderr.read().strip().splitlines() if ln.strip()]
        if rc == -signal.SIGKILL:  # the kernel's OOM killer
            self._fail(True, "killed by SIGKILL (out of memory)")
        else:
            self._fail(bool(tail) and is_oom(RuntimeError(tail[-1])), tail[-1] if tail else f"exited with code {rc}")
        return None

    def request(self, command: str):
        if self.failure:
            return None
        stdin = self.proc.stdin
        assert stdin is not None  # opened with stdin=PIPE
        try:
            stdin.write(command + "\n")
            stdin.flush()
        except BrokenPipeError:
            pass
        return self.read()

    def result(self) -> dict:
        out = self.request("done")
        self.proc.wait()
        self._stderr.close()
        return out if out is not None else (self.failure or {})

    def stop(self) -> None:
        """End the process if it still runs (a run cut short: Ctrl-C, an error in another method's row)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._stderr.close()
