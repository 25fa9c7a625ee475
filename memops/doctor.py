"""``python -m memops doctor``: what memops will do on this machine, and whether it does it right.

Run it first on any machine, and paste its output into a bug report.  In order:

* **environment**: Python, torch, triton, numpy; CUDA, driver, GPU name and memory; CPU model, its bf16 /
  AMX flags and the kernel set ATen picked;
* **kernels**: which chunk heads memops will use at ``--device`` / ``--dtype`` and why, and how the
  weight gradient is accumulated in fp32 there (``engine.fp32_out_gemm``);
* **chunk plan** for ``--tokens --hidden --vocab --dtype``: rows per chunk, chunks, buffer bytes (torch
  heads and, on CUDA, the fused Triton heads);
* **self-test** on the device at small shapes: every family (cross-entropy plain and soft-capped, a
  transform, GRPO, distillation) with each head set available, loss and gradients against the unfused
  computation in float64, next to the unfused code's own error in the same dtype; the weight gradient
  summed over 8 chunks; CUDA-graph captures of a cross-entropy and a GRPO step replayed on new data,
  and a ``torch.compile(mode="reduce-overhead")`` training step (CUDA only);
* **speed probe** (``--seconds``, default 20): memops vs the unfused code vs the three projection matmuls
  alone at the given shape.

Ends with a verdict table; ``--json PATH`` writes everything.  Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, cast

from .bench.worker import describe

# a self-test passes when memops' error against float64 is within FACTOR x the unfused code's error in the
# same dtype, or under the dtype's floor (a relative error, of the loss and of max |gradient|)
FACTOR = 2.0
FLOOR = {"float32": 1e-5, "float64": 1e-12, "bfloat16": 2e-2, "float16": 4e-3}
SMALL = {"tokens": 96, "hidden": 64, "vocab": 1000}
FAMILIES = (
    ("cross_entropy", None),
    ("cross_entropy", 30.0),  # soft-capped
    ("class_weighted", None),  # class weights + label smoothing (the torch heads on every device)
    ("focal", None),
    ("grpo", None),
    ("distill", None),
)
TRITON_FAMILIES = ("cross_entropy", "grpo")
# precision="accurate" checked too (fp32 logits from the GEMM: on CUDA mm(out_dtype=float32), each head set)
ACCURATE_FAMILIES = ("cross_entropy", "grpo", "distill")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="default: bfloat16 on CUDA, float32 on CPU")  # fmt: skip
    p.add_argument("--tokens", type=int, default=None, help="rows N of the chunk plan and speed probe")
    p.add_argument("--hidden", type=int, default=None, help="hidden size D (default 4096 on CUDA, 1024 on CPU)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary V (default 128256 on CUDA, 32000 on CPU)")
    p.add_argument("--seconds", type=float, default=20.0, help="time for the speed probe (0: skip it)")
    p.add_argument("--json", metavar="PATH", help="also write every result as JSON")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu() -> dict:
    info: dict[str, Any] = {"model": platform.processor() or platform.machine(), "flags": []}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        for line in text.splitlines():
            if line.startswith("model name") and info["model"] in ("", platform.machine(), platform.processor()):
                info["model"] = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                info["flags"] = sorted(have & {"avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16",
                                               "amx_tile", "amx_fp16"})  # fmt: skip
                break
    except OSError:
        pass
    flags = set(info["flags"])
    info["fast_bf16_gemm"] = bool(flags & {"avx512_bf16", "amx_bf16"})
    return info


def environment(device: str) -> dict:
    import torch

    from .ops import torch_private

    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "memops": _version("memops"),
        "threads": torch.get_num_threads(),
        "cpu": _cpu(),
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "ATEN_CPU_CAPABILITY": os.environ.get("ATEN_CPU_CAPABILITY"),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
        "cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        # memops/ops/torch_private.py: the registration path this torch took at import, and why
        "registration_path": torch_private.PATH,
        "registration_probe_error": torch_private.PROBE_ERROR,
        "torch_func_probe_error": torch_private.functorch_probe_error() if torch_private.PATH == "private" else None,
    }
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                      "capability": f"{props.major}.{props.minor}", "count": torch.cuda.device_count()}  # fmt: skip
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10)  # fmt: skip
            env["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
        except (OSError, subprocess.TimeoutExpired):
            env["driver"] = None
    return env


def kernels(device: str, dtype: str) -> dict:
    """Which chunk heads memops picks for ``device`` / ``dtype`` and why; the fp32 weight-gradient path."""
    import torch

    from . import config
    from .ops import engine, triton_heads

    choice = config.kernel_choice()
    x = torch.empty(0, device=device, dtype=getattr(torch, dtype))
    try:
        triton = triton_heads.wanted(x)
        error = None
    except RuntimeError as exc:
        triton, error = False, str(exc)
    if choice == "torch":
        why = "memops.set_kernels('torch')"
    elif triton:
        why = ("memops.set_kernels('triton')" if choice == "triton" else "auto: CUDA tensors and triton imports") + (
            " (the Triton interpreter: slow, for tests)" if triton_heads.interpreted() else ""
        )
    elif error:
        why = error
    elif not device.startswith("cuda"):
        why = "auto: not CUDA tensors"
    else:
        why = "auto: triton does not import (pip install triton)"
    out = {
        "choice": choice,
        "heads": {"cross_entropy, log-probs, GRPO": "triton" if triton else "torch", "every other family": "torch"},
        "why": why,
    }
    if dtype in ("bfloat16", "float16"):
        if device.startswith("cuda"):
            kind = engine.fp32_out_gemm(torch.device(device))
            out["weight_grad"] = {
                "addmm": "fp32-output addmm in place (bf16/fp16 operands, fp32 sum)",
                "mm": "fp32-output mm into one fp32 scratch buffer, then added (this torch rejects addmm's fp32 "
                "self with low-precision operands)",
                "cast": "each chunk's partial rounded to the input dtype before its fp32 sum (no out_dtype in this "
                "torch: upgrade to >= 2.8)",
            }[kind]
            out["weight_grad_kind"] = kind
        elif config.native_gemm(getattr(torch, dtype), torch.device("cpu")):
            out["weight_grad"] = (
                f"CPU: native {dtype} GEMMs (fast on this CPU: memops.config.fast_cpu_gemm), each chunk's partial "
                "rounded to the input dtype before its fp32 sum"
            )
            out["weight_grad_kind"] = "cpu-native"
        else:
            out["weight_grad"] = "CPU: fp32 GEMMs on chunk-sized upcasts, fp32 sum"
            out["weight_grad_kind"] = "cpu-fp32"
    else:
        out["weight_grad"] = f"{dtype} GEMMs, {dtype} sum"
        out["weight_grad_kind"] = dtype
    return out


def chunk_plan(tokens: int, hidden: int, vocab: int, dtype: str, device: str) -> dict:
    import torch

    from . import config

    dt = getattr(torch, dtype)
    budget = config.chunk_budget(torch.device(device))
    plans = {}
    for name, fused in (("torch heads", False), ("Triton heads", True)):
        if fused and not device.startswith("cuda"):
            continue
        rows = config.chunk_rows(tokens, vocab, hidden, dt, torch.device(device), fused=fused)
        logit_bytes = dt.itemsize if fused else 4 + (dt.itemsize if dt.itemsize != 4 else 0)
        plans[name] = {"rows_per_chunk": rows, "chunks": -(-tokens // rows),
                       "buffer_mib": round(rows * vocab * logit_bytes / 2**20, 1)}  # fmt: skip
    full = tokens * vocab
    return {"tokens": tokens, "hidden": hidden, "vocab": vocab, "dtype": dtype, "budget_mib": budget >> 20,
            "full_logits_mib": {"as " + dtype: round(full * dt.itemsize / 2**20, 1),
                                "fp32": round(full * 4 / 2**20, 1)},
            "plans": plans}  # fmt: skip


def _rel(a, b) -> float:
    """max |a - b| / max |b| (a scalar loss: relative difference)."""
    a, b = a.double().cpu(), b.double().cpu()
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def _errors(fn, x, w, t, ref) -> dict:
    x.grad = w.grad = None
    loss = fn(x, w, t)
    loss.backward()
    return {
        "loss": _rel(loss.detach(), ref[0]),
        "grad_input": _rel(x.grad, ref[1]),
        "grad_weight": _rel(w.grad, ref[2]),
    }


def _reference(fn, x, w, t) -> tuple:
    """``fn``'s loss and input / weight gradients in float64 at ``x``, ``w`` (the unfused reference)."""
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    loss = fn(xr, wr, t)
    loss.backward()
    return loss.detach(), xr.grad, wr.grad


def _inputs(tokens, hidden, vocab, dtype, device, loss, seed=0):
    import torch

    from .bench.worker import make_inputs

    return make_inputs({"tokens": tokens, "hidden": hidden, "vocab": vocab}, dtype, device, torch, loss, seed=seed)


def self_test(device: str, dtype: str) -> list[dict]:
    """Every family, each head set, against float64; the multi-chunk weight gradient; CUDA-graph capture."""
    from . import config
    from .bench.methods import build
    from .ops import triton_heads

    n, d, v = SMALL["tokens"], SMALL["hidden"], SMALL["vocab"]
    results = []
    head_sets = ["torch"]
    if device.startswith("cuda") and kernels(device, dtype)["heads"]["cross_entropy, log-probs, GRPO"] == "triton":
        head_sets.append("triton")
    elif os.environ.get("TRITON_INTERPRET") == "1" and triton_heads.available() and triton_heads.interpreted():
        head_sets.append("triton")  # a dry run on CPU: the Triton heads under the interpreter
    for loss, softcap in FAMILIES:
        label = loss + (f" softcap={softcap:g}" if softcap else "")
        x, w, t = _inputs(n, d, v, dtype, device, loss)
        make = lambda m, loss=loss, softcap=softcap: build(m, loss, softcap, device, tokens=n, vocab=v, batch=8)  # noqa: E731
        ref = _reference(make("reference"), x, w, t)
        eager = _errors(make("eager"), x, w, t, ref)
        heads_here = head_sets if loss in TRITON_FAMILIES else ["torch"]
        runs = [(h, "reference") for h in heads_here]
        if loss in ACCURATE_FAMILIES and not softcap:
            runs += [(h, "accurate") for h in heads_here]
        for heads, precision in runs:
            how = " heads, interpreted" if heads == "triton" and not device.startswith("cuda") else " heads"
            if precision == "accurate":
                how += ', precision="accurate"'
            row: dict[str, Any] = {"check": f"{label} ({heads}{how})", "unfused_error": eager}
            try:
                with config.kernels(heads), config.precision(precision):
                    row["error"] = _errors(make("memops"), x, w, t, ref)
                bound = {k: max(FACTOR * eager[k], FLOOR[dtype]) for k in eager}
                row["bound"] = bound
                worst = [k for k in bound if not row["error"][k] <= bound[k]]
                row["status"] = "FAIL" if worst else "OK"
                if worst:
                    row["why"] = f"{', '.join(worst)} above {FACTOR:g}x the unfused code's error"
            except Exception as exc:  # noqa: BLE001  (reported in the table)
                row["status"], row["why"] = "FAIL", describe(exc)
            results.append(row)
    results.append(_weight_grad_check(device, dtype))
    results.append(batch_invariance_check(device, dtype))
    results.extend(_graph_capture(device, dtype))
    return results


INVARIANT_BATCHES = ((1, 0), (5, 3), (64, 17), (300, 299))  # (rows in the batch, the checked row's position)


def batch_invariance_check(device: str, dtype: str) -> dict:
    """Batch-invariant mode on this device's heads: cross-entropy (loss and lse rows), log-probs and entropy,
    and their input-gradient rows, for one row alone and inside batches of other sizes at other positions
    (:data:`INVARIANT_BATCHES`), chunk size varied; OK when every result is bitwise the same.  Also counts how
    many differ without the mode (information: what the mode buys on this device)."""
    import torch

    import memops

    from . import config

    d, v = SMALL["hidden"], SMALL["vocab"]
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(5)
    w = (torch.randn(v, d, generator=g) * 0.3).to(device=device, dtype=dt)
    row_x, row_t = torch.randn(1, d, generator=g), torch.randint(0, v, (1,), generator=g)

    def results(n: int, pos: int, chunk: int | None) -> list:
        x = torch.randn(n, d, generator=g)
        t = torch.randint(0, v, (n,), generator=g)
        x[pos], t[pos] = row_x[0], row_t[0]
        x = x.to(device=device, dtype=dt).requires_grad_()
        t = t.to(device)
        loss, lse = cast(
            tuple, memops.linear_cross_entropy(x, w, t, reduction="none", return_lse=True, chunk_size=chunk)
        )
        (gx,) = torch.autograd.grad(loss.sum(), x)
        lp, ent = cast(tuple, memops.linear_logprobs(x, w, t, temperature=0.8, return_entropy=True, chunk_size=chunk))
        (gx2,) = torch.autograd.grad(lp.sum() + ent.sum(), x)
        return [r[pos].detach().cpu() for r in (loss, lse, gx, lp, ent, gx2)]

    def differing(on: bool) -> int:
        with config.batch_invariant(on):
            alone = results(1, 0, None)
            bad = 0
            for k, (n, pos) in enumerate(INVARIANT_BATCHES):
                got = results(n, pos, (None, 7, 32, 128)[k])
                bad += sum(not torch.equal(a, b) for a, b in zip(alone, got, strict=True))
        return bad

    total = 6 * len(INVARIANT_BATCHES)
    try:
        bad, without = differing(True), differing(False)
    except Exception as exc:  # noqa: BLE001  (reported in the table)
        return {"check": "batch-invariant mode", "status": "FAIL", "why": describe(exc)}
    why = f"{bad} of {total} per-row results differ from the row alone; without the mode {without} differ"
    return {"check": "batch-invariant mode", "status": "FAIL" if bad else "OK", "why": why}


def _weight_grad_check(device: str, dtype: str) -> dict:
    """Cross-entropy over 8 chunks: the weight gradient summed across chunks against float64."""
    import memops

    from .bench.methods import build

    n, d, v = 256, 64, 1000
    x, w, t = _inputs(n, d, v, dtype, device, "cross_entropy", seed=1)
    ref = _reference(build("reference", "cross_entropy", None, device), x, w, t)
    eager = _errors(build("eager", "cross_entropy", None, device), x, w, t, ref)
    err = _errors(lambda a, b, c: memops.linear_cross_entropy(a, b, c, chunk_size=n // 8), x, w, t, ref)
    bound = max(FACTOR * eager["grad_weight"], FLOOR[dtype])
    ok = err["grad_weight"] <= bound
    return {"check": "weight gradient over 8 chunks", "error": err, "unfused_error": eager,
            "bound": {"grad_weight": bound}, "status": "OK" if ok else "FAIL",
            **({} if ok else {"why": "grad_weight above the bound"})}  # fmt: skip


CAPTURED = ("cross_entropy", "grpo")  # the families whose step a CUDA graph captures in the self-test


def _graph_capture(device: str, dtype: str) -> list[dict]:
    """Each of :data:`CAPTURED`: one forward+backward step captured in a ``torch.cuda.CUDAGraph`` (sync-free by
    itself: the stream is capturing), replayed on new data and compared with eager on that data; and one
    ``torch.compile(mode="reduce-overhead")`` training step (inductor's CUDA graphs) against eager."""
    rows = [_capture_step(loss, device, dtype) for loss in CAPTURED]
    rows.append(_reduce_overhead_step(device, dtype))
    return rows


def _capture_step(loss: str, device: str, dtype: str, dry_run: bool = False) -> dict:
    """``dry_run`` (CPU, for the tests): the same steps with the captured step re-run in place of a replay."""
    import torch

    from .bench.methods import build

    row: dict[str, Any] = {"check": f"CUDA-graph capture of a {loss} step, replayed on new data"}
    if not device.startswith("cuda") and not dry_run:
        return dict(row, status="n/a", why="CPU")
    n, d, v = 256, 64, 1000
    step = build("memops", loss, None, device, tokens=n, vocab=v, batch=8)
    x, w, t = _inputs(n, d, v, dtype, device, loss)
    held = {}

    def body():  # grads allocated inside the capture: a replay overwrites them, nothing accumulates
        x.grad = w.grad = None
        held["loss"] = step(x, w, t)
        held["loss"].backward()

    try:
        replay = body
        if device.startswith("cuda"):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up: kernels compiled, probes made, outside the capture
                for _ in range(2):
                    body()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                body()
            replay = graph.replay
        else:
            body()
        worst = 0.0
        for seed in (1, 2):
            x2, w2, t2 = _inputs(n, d, v, dtype, device, loss, seed=seed)
            with torch.no_grad():
                x.copy_(x2)
                w.copy_(w2)
                t.copy_(t2)
            replay()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            want = step(x2, w2, t2)
            want.backward()
            for got, ref in ((held["loss"], want), (x.grad, x2.grad), (w.grad, w2.grad)):
                got, ref = got.detach().double(), ref.detach().double()
                worst = max(worst, float((got - ref).abs().max() / ref.abs().max().clamp(min=1e-30)))
        ok = worst <= FLOOR[dtype]
        return dict(row, error=worst, bound=FLOOR[dtype], status="OK" if ok else "FAIL",
                    **({} if ok else {"why": "replayed step differs from eager"}))  # fmt: skip
    except Exception as exc:  # noqa: BLE001
        return dict(row, status="FAIL", why=describe(exc))


def _reduce_overhead_step(device: str, dtype: str, dry_run: bool = False) -> dict:
    """``dry_run``: run it on CPU too (inductor's compile path there, no CUDA graphs)."""
    import copy

    import torch

    import memops

    row: dict[str, Any] = {"check": 'torch.compile(mode="reduce-overhead") training step'}
    if not device.startswith("cuda") and not dry_run:
        return dict(row, status="n/a", why="CPU (tests/test_sync_free.py runs the compile path there)")
    n, d, v = 256, 64, 1000
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.Tanh(), torch.nn.Linear(d, v, bias=False))
        models = [m.to(device=device, dtype=getattr(torch, dtype)) for m in (model, copy.deepcopy(model))]

        def loss_of(model, x, t):
            return memops.linear_cross_entropy(model[1](model[0](x)), model[2].weight, t)

        compiled = torch.compile(loss_of, mode="reduce-overhead")
        opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
        worst = 0.0
        for seed in range(4):  # cudagraph trees: warm-up, capture, then replays
            x, _, t = _inputs(n, d, v, dtype, device, "cross_entropy", seed=seed)
            losses = []
            for fn, model, opt in zip((loss_of, compiled), models, opts):
                opt.zero_grad()
                out = fn(model, x.detach(), t)
                out.backward()
                opt.step()
                losses.append(out.detach().double().clone())
            worst = max(worst, float((losses[0] - losses[1]).abs() / losses[0].abs()))
        ok = worst <= 10 * FLOOR[dtype]  # four optimizer steps apart, in dtype
        return dict(row, error=worst, bound=10 * FLOOR[dtype], status="OK" if ok else "FAIL",
                    **({} if ok else {"why": "compiled losses drift from eager's"}))  # fmt: skip
    except Exception as exc:  # noqa: BLE001
        return dict(row, status="FAIL", why=describe(exc))


def speed_probe(tokens: int, hidden: int, vocab: int, dtype: str, device: str, seconds: float) -> list[dict]:
    """Median step time of memops, the unfused code and the three matmuls alone, ``seconds`` in all."""
    import torch

    from .bench.methods import build

    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    x, w, t = _inputs(tokens, hidden, vocab, dtype, device, "cross_entropy")
    rows = []
    share = seconds / 3
    for method in ("floor", "eager", "memops"):
        fn = build(method, "cross_entropy", None, device)
        row: dict[str, Any] = {"method": {"floor": "three matmuls", "eager": "unfused"}.get(method, method)}
        try:
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() if cuda else 0
            times: list[float] = []
            start = time.perf_counter()
            while len(times) < 20 and (len(times) < 2 or time.perf_counter() - start < share):
                x.grad = w.grad = None
                sync()
                t0 = time.perf_counter()
                fn(x, w, t).backward()
                sync()
                times.append(time.perf_counter() - t0)
            timed = times[1:] or times  # the first step warms up
            row.update(ms=statistics.median(timed) * 1e3, steps=len(timed))
            if cuda:
                row["peak_extra_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
        except Exception as exc:  # noqa: BLE001  (an OOM of the unfused code is a result)
            row["error"] = describe(exc, 160)
        x.grad = w.grad = None
        rows.append(row)
    floor = next((r.get("ms") for r in rows if r["method"] == "three matmuls"), None)
    unfused = next((r.get("ms") for r in rows if r["method"] == "unfused"), None)
    for r in rows:
        if "ms" in r:
            r["vs_matmuls"] = r["ms"] / floor if floor else None
            r["vs_unfused"] = r["ms"] / unfused if unfused else None
    return rows


def _fmt_err(e: dict) -> str:
    return " ".join(f"{k.replace('grad_', 'd')}={v:.1e}" for k, v in e.items())


def report(result: dict) -> str:
    env, k, plan = result["environment"], result["kernels"], result["chunk_plan"]
    gpu = env.get("gpu")
    lines = [
        "# memops doctor",
        "",
        f"python {env['python']}, torch {env['torch']}, triton {env['triton']}, numpy {env['numpy']}, "
        f"memops {env['memops']}",
        f"CUDA build {env['cuda_build']}, available {env['cuda_available']}"
        + (
            f"; GPU {gpu['name']} ({gpu['memory_gib']} GiB, sm {gpu['capability']}), driver {env.get('driver')}"
            if gpu
            else ""
        ),  # fmt: skip
        f"CPU {env['cpu']['model']}; flags {', '.join(env['cpu']['flags']) or 'none of avx2/avx512/amx'}; "
        f"ATen kernels {env['aten_cpu_capability']}; {env['threads']} threads",
        f"op registration: {env['registration_path']} path"
        + (f" (the probe failed: {env['registration_probe_error']})" if env["registration_probe_error"] else "")
        + (f"; torch.func refused: {env['torch_func_probe_error']}" if env["torch_func_probe_error"] else ""),
        "",
        f"kernels ({result['device']}, {result['dtype']}): "
        + "; ".join(f"{fam}: {heads} heads" for fam, heads in k["heads"].items())
        + f" ({k['why']})",
        f"weight gradient: {k['weight_grad']}",
        f"chunk plan N={plan['tokens']} D={plan['hidden']} V={plan['vocab']} {plan['dtype']}: budget "
        f"{plan['budget_mib']} MiB; "
        + "; ".join(
            f"{name}: {p['chunks']} chunk(s) of {p['rows_per_chunk']} rows ({p['buffer_mib']} MiB)"
            for name, p in plan["plans"].items()
        )
        + "; full logits "
        + ", ".join(f"{mib} MiB {how}" for how, mib in plan["full_logits_mib"].items()),
        "",
        "| check | result | status |",
        "|---|---|---|",
    ]
    for r in result["self_test"]:
        if "error" in r:
            text = f"memops {_fmt_err(r['error'])}; unfused {_fmt_err(r['unfused_error'])}"
        else:
            text = r.get("why", "")
        if r["status"] == "FAIL" and "error" in r:
            text += f" — {r.get('why', '')}"
        lines.append(f"| {r['check']} | {text} | {r['status']} |")
    for r in result.get("speed", []):
        if "ms" in r:
            text = (
                f"{r['ms']:.2f} ms ({r['steps']} steps)"
                + (f", {r['vs_matmuls']:.2f}x the matmuls" if r.get("vs_matmuls") else "")
                + (f", {r['vs_unfused']:.2f}x unfused" if r.get("vs_unfused") else "")
            )
            text += f", peak +{r['peak_extra_mib']} MiB" if "peak_extra_mib" in r else ""
            status = "info"
        else:
            text, status = r["error"], "info"
        lines.append(f"| speed: {r['method']} | {text} | {status} |")
    lines += ["", f"verdict: {result['verdict']}"]
    return "\n".join(lines)


def run(args) -> dict:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: CUDA is not available in this torch build")
    if not (device == "cpu" or device.startswith("cuda")):
        raise SystemExit(f"--device must be cpu or cuda, got {device!r}")
    cuda = device.startswith("cuda")
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    tokens = args.tokens or (16384 if cuda else 2048)
    hidden = args.hidden or (4096 if cuda else 1024)
    vocab = args.vocab or (128256 if cuda else 32000)
    for name, value in (("tokens", tokens), ("hidden", hidden), ("vocab", vocab)):
        if value < 1:
            raise SystemExit(f"--{name} must be >= 1")
    if not args.seconds >= 0:
        raise SystemExit("--seconds must be >= 0")
    result: dict[str, Any] = {
        "device": device,
        "dtype": dtype,
        "environment": environment(device),
        "kernels": kernels(device, dtype),
        "chunk_plan": chunk_plan(tokens, hidden, vocab, dtype, device),
    }
    result["self_test"] = self_test(device, dtype)
    result["speed"] = speed_probe(tokens, hidden, vocab, dtype, device, args.seconds) if args.seconds else []
    failed = [r["check"] for r in result["self_test"] if r["status"] == "FAIL"]
    result["verdict"] = f"FAIL: {'; '.join(failed)}" if failed else "OK: every check passed"
    return result


def main(args) -> int:
    result = run(args)
    print(report(result), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
    return 1 if result["verdict"].startswith("FAIL") else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m memops.doctor")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
