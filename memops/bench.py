"""Side-by-side benchmark: forward+backward of projection + cross-entropy.

Each method runs in a fresh subprocess (started with ``MALLOC_MMAP_THRESHOLD_=65536``
so freed tensors go back to the OS) and reports:

* time: median wall time of ``reps`` forward+backward steps after one warm-up
  (which includes compilation for ``compile``); all methods' processes are
  started first and their steps are then run round-robin, one at a time, so a
  drift in the machine's speed affects every method alike;
* peak extra memory: on CPU the process's peak RSS during one step (``VmHWM``
  after resetting it through ``/proc/self/clear_refs``) minus the RSS before the
  step (inputs) minus the bytes of the gradients the step returns; on CUDA the
  same from ``torch.cuda.max_memory_allocated``;
* errors: max absolute difference of the loss and each gradient from a float64
  unfused reference run on the same inputs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

METHODS = ("eager", "compile", "memops")
DTYPES = ("float32", "bfloat16", "float16", "float64")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=4096, help="rows N of the hidden states (default 4096)")
    p.add_argument("--hidden", type=int, default=1024, help="hidden size D (default 1024)")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size V (default 32000)")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per method (default 3)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--loss", default="cross_entropy",
                   help="cross_entropy (memops.linear_cross_entropy) or any registered transform, e.g. focal "
                        "(memops.linear_loss; the baselines apply the same function to the full logits)")
    p.add_argument("--no-check", action="store_true", help="skip the float64 reference and error columns")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--ref-file", help=argparse.SUPPRESS)


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _make_inputs(args, torch):
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.tokens, args.hidden, generator=g).to(device=device, dtype=dtype)
    w = (torch.randn(args.vocab, args.hidden, generator=g) / args.hidden**0.5).to(device=device, dtype=dtype)
    t = torch.randint(0, args.vocab, (args.tokens,), generator=g).to(device)
    t[::10] = -100  # some padding, as in real batches
    return x.requires_grad_(True), w.requires_grad_(True), t


def _loss_fn(method, loss_name, torch):
    import torch.nn.functional as F

    import memops
    if loss_name == "cross_entropy":
        def per_token(logits, t):
            return F.cross_entropy(logits, t, reduction="none")
    else:
        per_token = memops.ops.transform.get_transform(loss_name).fn

    def unfused(x, w, t, upcast=True):
        logits = F.linear(x, w)
        logits = logits.float() if upcast else logits
        if loss_name == "cross_entropy":
            return F.cross_entropy(logits, t)
        valid = t != -100
        return torch.where(valid, per_token(logits, torch.where(valid, t, 0)), 0.0).sum() / valid.sum()

    if method == "eager":
        return unfused
    if method == "compile":
        return torch.compile(unfused)
    if method == "memops":
        if loss_name == "cross_entropy":
            return memops.linear_cross_entropy
        return lambda x, w, t: memops.linear_loss(x, w, t, loss_name)
    if method == "reference":
        return lambda x, w, t: unfused(x.double(), w.double(), t, upcast=False)
    raise ValueError(f"unknown method {method!r}")


_MSG = "@@memops "  # prefix of protocol lines on a worker's stdout


def _say(obj) -> None:
    print(_MSG + json.dumps(obj), flush=True)


def _worker(args) -> None:
    """One method in its own process: warm up, then one timed step per ``step`` line on stdin."""
    import torch
    torch.manual_seed(0)
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    x, w, t = _make_inputs(args, torch)
    fn = _loss_fn(args.worker, args.loss, torch)

    def step():
        x.grad = w.grad = None
        loss = fn(x, w, t)
        loss.backward()
        return loss

    if args.worker == "reference":
        loss = step()
        torch.save({"loss": loss.detach().double(), "gx": x.grad.double(), "gw": w.grad.double()}, args.ref_file)
        _say({"done": True})
        return
    step()  # warm-up (and compilation)
    sync()
    _say({"ready": True})
    times, peak, loss = [], None, None
    for line in sys.stdin:
        if line.strip() != "step":
            break
        first = not times
        x.grad = w.grad = None
        gc.collect()
        if first:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            else:
                base = _status_kib("VmRSS") * 1024 if _reset_peak_rss() else None
        sync()
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
        if first:
            grads = sum(g.numel() * g.element_size() for g in (x.grad, w.grad))
            if cuda:
                peak = torch.cuda.max_memory_allocated() - base - grads
            elif base is not None:  # RSS moves in pages: a tiny step can read slightly below zero
                peak = max(0, _status_kib("VmHWM") * 1024 - base - grads)
        _say({"time_s": times[-1]})
    out = {"method": args.worker, "time_s": statistics.median(times), "times_s": times,
           "peak_extra_bytes": peak, "loss": loss.item()}
    if args.ref_file:
        ref = torch.load(args.ref_file)
        out["err_loss"] = abs(loss.item() - ref["loss"].item())
        out["err_grad_input"] = (x.grad.double().cpu() - ref["gx"].cpu()).abs().max().item()
        out["err_grad_weight"] = (w.grad.double().cpu() - ref["gw"].cpu()).abs().max().item()
    _say(out)


class _Worker:
    """A method's process.  Steps are requested round-robin across methods, so slow drifts of the
    machine's speed hit every method alike."""

    def __init__(self, args, method: str, ref_file: str | None, tmp: str):
        cmd = [sys.executable, "-m", "memops", "bench", "--worker", method, "--tokens", str(args.tokens),
               "--hidden", str(args.hidden), "--vocab", str(args.vocab), "--dtype", args.dtype,
               "--device", args.device, "--loss", args.loss]
        if ref_file:
            cmd += ["--ref-file", ref_file]
        self.method = method
        self.error = None
        self._stderr = open(os.path.join(tmp, f"{method}.stderr"), "w+")
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                     text=True, env=env)

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith(_MSG):
                return json.loads(line[len(_MSG):])
        self.proc.wait()
        self._stderr.seek(0)
        tail = [ln for ln in self._stderr.read().strip().splitlines() if ln.strip()]
        self.error = tail[-1] if tail else f"exited with code {self.proc.returncode}"
        return None

    def request(self, command: str):
        if self.error:
            return None
        try:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        return self._read()

    def result(self) -> dict:
        out = self.request("done")
        self.proc.wait()
        self._stderr.close()
        return out if out is not None else {"method": self.method, "error": self.error}


def _run_methods(args, methods, ref_file, tmp) -> list[dict]:
    workers = []
    for m in methods:
        print(f"starting {m} (warm-up{' and compilation' if m == 'compile' else ''}) ...", flush=True)
        wk = _Worker(args, m, ref_file, tmp)
        wk._read()  # "ready", or the error that stopped it
        workers.append(wk)
    for rep in range(args.reps):
        print(f"round {rep + 1}/{args.reps}: " + ", ".join(
            m.method for m in workers if not m.error), flush=True)
        for wk in workers:
            wk.request("step")
    return [wk.result() for wk in workers]


def _fmt_bytes(b):
    return "n/a" if b is None else f"{b / 2**20:,.1f}"


def _ratio(a, b):
    return "n/a" if (a is None or not b) else f"{a / b:.3f}"


def format_table(rows: list[dict]) -> str:
    by = {r["method"]: r for r in rows}
    eager, comp = by.get("eager", {}), by.get("compile", {})
    head = ["method", "time s", "x eager", "x compile", "peak extra MiB", "x eager mem",
            "err loss", "err grad_input", "err grad_weight"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error']} |" + " |" * (len(head) - 2))
            continue
        errs = [f"{r[k]:.2e}" if k in r else "-" for k in ("err_loss", "err_grad_input", "err_grad_weight")]
        lines.append("| " + " | ".join([
            r["method"], f"{r['time_s']:.3f}", _ratio(r["time_s"], eager.get("time_s")),
            _ratio(r["time_s"], comp.get("time_s")), _fmt_bytes(r["peak_extra_bytes"]),
            _ratio(r["peak_extra_bytes"], eager.get("peak_extra_bytes")), *errs]) + " |")
    return "\n".join(lines)


def main(args) -> int:
    if args.worker:
        _worker(args)
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    for name in ("tokens", "hidden", "vocab", "reps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be >= 1")
    import torch
    import memops
    memops.ops.transform.get_transform(args.loss)  # unknown names fail here, before any worker starts
    print(f"# memops bench ({args.loss}): N={args.tokens} D={args.hidden} V={args.vocab} {args.dtype} on {args.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        ref_file = None
        if not args.no_check:
            ref_file = os.path.join(tmp, "ref.pt")
            print("running float64 reference ...", flush=True)
            ref = _Worker(args, "reference", ref_file, tmp)
            if ref._read() is None:
                print(f"reference failed ({ref.error}); error columns left out", flush=True)
                ref_file = None
            ref.proc.wait()
        rows = _run_methods(args, methods, ref_file, tmp)
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": {k: getattr(args, k) for k in ("tokens", "hidden", "vocab", "dtype", "device",
                                                                 "reps", "loss")},
                       "torch": torch.__version__, "rows": rows}, f, indent=2)
    return 0
