"""``python -m memops bench --preset overhead``: the fixed cost of one call, in microseconds.

At tiny shapes (default N=8, D=16, V=128) the matmuls cost next to nothing, so a forward + backward step
measures what each method pays per call: argument handling, validation, dispatch, autograd and the
number of small tensor ops.  That cost is paid per micro-batch in RL and per call in many-call patterns
(and on a GPU, per kernel launch).  Methods run in this process, one thread, interleaved: each of
``5 * --reps`` rounds times ``calls`` (100) steps of every method in turn; a method's figure is its best
round's mean (the least disturbed one: short rounds, many of them, so that some round escapes the
interruptions a shared or virtual machine makes).
"""

from __future__ import annotations

import time

METHODS = ("eager", "compile", "torch_lce", "memops")
SHAPE = {"tokens": 8, "hidden": 16, "vocab": 128}


def measure(
    tokens: int = SHAPE["tokens"],
    hidden: int = SHAPE["hidden"],
    vocab: int = SHAPE["vocab"],
    dtype: str = "float32",
    device: str = "cpu",
    methods=METHODS,
    calls: int = 100,
    reps: int = 25,
    threads: int | None = 1,
) -> list[dict]:
    """Microseconds per forward + backward call of each method (rows with ``method``, ``us``, ``vs_eager``;
    ``skipped`` with the reason where a method cannot run)."""
    import torch

    from .methods import build, unavailable
    from .worker import make_inputs

    if threads:
        torch.set_num_threads(threads)
    x, w, t = make_inputs({"tokens": tokens, "hidden": hidden, "vocab": vocab}, dtype, device, torch, ignored=0.0)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    steps, rows = {}, []
    for m in methods:
        why = unavailable(m, "cross_entropy", device)
        if why:
            rows.append({"method": m, "skipped": why})
            continue
        fn = build(m, "cross_entropy", None, device, tokens, vocab)

        def step(fn=fn):
            x.grad = w.grad = None
            fn(x, w, t).backward()

        for _ in range(20):  # warm-up (compiles)
            step()
        steps[m] = step
        rows.append({"method": m, "us": float("inf")})
    for _ in range(max(1, reps)):
        for row in rows:
            if "skipped" in row:
                continue
            step = steps[row["method"]]
            sync()
            t0 = time.perf_counter()
            for _ in range(calls):
                step()
            sync()
            row["us"] = min(row["us"], (time.perf_counter() - t0) / calls * 1e6)
    eager = next((r["us"] for r in rows if r["method"] == "eager" and "us" in r), None)
    for r in rows:
        if "us" in r and eager:
            r["vs_eager"] = r["us"] / eager
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = ["| method | µs per forward+backward | vs eager |", "|---|---:|---:|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['method']} | skipped: {r['skipped']} | |")
        else:
            lines.append(f"| {r['method']} | {r['us']:.1f} | {r.get('vs_eager', float('nan')):.2f}x |")
    return "\n".join(lines)


def main(args) -> int:
    import json

    import torch

    tokens, hidden, vocab = args.tokens, args.hidden, args.vocab
    methods = [m for m in args.method_list if m in METHODS] or list(METHODS)
    rows = measure(tokens, hidden, vocab, args.dtype, args.device, methods, reps=5 * max(args.reps, 3))
    print(
        f"# memops bench --preset overhead: N={tokens} D={hidden} V={vocab} {args.dtype} on {args.device}, "
        f"torch {torch.__version__}, 1 thread\n"
    )
    print(format_rows(rows), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"config": {"tokens": tokens, "hidden": hidden, "vocab": vocab, "dtype": args.dtype,
                            "device": args.device, "preset": "overhead"},
                 "torch": torch.__version__, "threads": 1, "rows": rows},
                f,
                indent=2,
            )  # fmt: skip
    return 0
