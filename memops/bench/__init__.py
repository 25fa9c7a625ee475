"""``python -m memops bench``: time, peak memory and error of projection + loss, memops vs the baselines.

Every (method, shape) runs in its own subprocess (see ``worker``); on CPU all methods of a shape are
started and warmed up first and their timed steps then run round-robin, one at a time, so slow drifts of
the machine's speed hit every method alike; on CUDA methods run one after another.  Time is the median
of ``--reps`` steps after a warm-up (which includes compilation).  See BENCHMARKS.md for the columns.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import tempfile
from typing import Any

from .methods import DISTILL_BETA, ENTROPY_COEFF, GRPO_BETA, METHODS, PER_DEPTH, VARIANTS, VERL_PEERS, unavailable
from .report import LEGEND, add_ratios, format_table, plot
from .worker import Worker, run_worker

DTYPES = ("float32", "bfloat16", "float16", "float64")
DEFAULT = {"tokens": 2048, "hidden": 1024, "vocab": 32000}
# Real model heads: hidden size, vocabulary, final-logit soft-capping.
PRESETS: dict[str, dict[str, Any]] = {
    "llama3-8b": {"hidden": 4096, "vocab": 128256, "softcap": None},
    "gemma2-2b": {"hidden": 2304, "vocab": 256000, "softcap": 30.0},
    "qwen2.5-7b": {"hidden": 3584, "vocab": 152064, "softcap": None},
    # the fixed cost per call: tiny shapes, memops vs eager vs compile vs torch_lce, µs per call (bench/overhead.py)
    "overhead": {"tokens": 8, "hidden": 16, "vocab": 128, "softcap": None},
    # the seed's harness: B=64 x T=512 tokens, D=768, V=16000, bf16 input and a bias, mean cross-entropy
    "seed-harness": {"tokens": 64 * 512, "hidden": 768, "vocab": 16000, "softcap": None, "bias": True},
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, help=f"rows N (default {DEFAULT['tokens']} or the preset's)")
    p.add_argument("--hidden", type=int, help=f"hidden size D (default {DEFAULT['hidden']} or the preset's)")
    p.add_argument("--vocab", type=int, help=f"vocabulary size V (default {DEFAULT['vocab']} or the preset's)")
    p.add_argument("--softcap", type=float, help="final-logit soft-capping (default none or the preset's)")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="a real model head's D, V and soft-capping; overhead: the fixed cost of one call (N=8 D=16 V=128, "
        "one thread, µs per forward+backward of memops, eager, compile and torch_lce)",
    )
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default float32 (bfloat16 for --preset seed-harness)")
    p.add_argument(
        "--bias",
        action="store_true",
        help="give the head a bias (a trained parameter): cross-entropy and transforms (on by --preset seed-harness)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per method (default 3)")
    p.add_argument(
        "--methods",
        default=",".join(m for m in METHODS if m not in (*VARIANTS, PER_DEPTH, *VERL_PEERS)),
        help="comma-separated subset of %(default)s, memops_torch and memops_triton (memops with the torch or "
        "the Triton chunk heads: memops.set_kernels), memops_sync_free (memops.set_sync_free(True)), "
        "memops_accurate (memops.set_precision('accurate'): fp32 logits), memops_batch_invariant "
        "(memops.set_batch_invariant(True)) and, with --loss mtp, memops_per_depth (one memops cross-entropy "
        "call per depth), with --loss verl verl's fused head's backends verl (torch), verl_triton and "
        "verl_liger; peers "
        "that are not installed are skipped",
    )
    p.add_argument(
        "--loss",
        default="cross_entropy",
        help="cross_entropy (memops.linear_cross_entropy), class_weighted (cross-entropy with class weights and "
        "label smoothing 0.1), grpo (memops.linear_grpo_loss: a GRPO "
        "step on --batch completions), logprobs (memops.linear_logprobs: the masked mean negative log-prob of "
        "--batch completions, what an SFT-on-samples or REINFORCE step trains), distill "
        "(memops.linear_distillation_loss against a teacher "
        "projection of the same size), mtp (memops.linear_mtp_cross_entropy: --depths cross-entropies against "
        "one head, targets shifted 1..D), verl (verl's fused head: per-token log-probs and entropy, trained "
        "as a PPO actor with an entropy bonus; --methods verl,verl_triton,verl_liger run verl's own backends) "
        "or any registered transform, e.g. focal "
        "(memops.linear_loss; the baselines apply the same function to the full logits)",
    )
    p.add_argument(
        "--ignored",
        type=float,
        default=0.1,
        help="fraction of targets set to ignore_index, as padding / prompt tokens; with --loss grpo "
        "the fraction of completion tokens masked out (default %(default)s)",
    )
    p.add_argument("--batch", type=int, default=8, help="completions B of --loss grpo (tokens = B x T; default 8)")
    p.add_argument(
        "--kept",
        type=int,
        default=0,
        help="--loss grpo and logprobs: a sampling mask of this many kept ids per token (the sampler's top-k / "
        "top-p), the log-probs renormalized over them (memops: sampling_mask=; the unfused baselines: "
        "log_softmax of the logits with the other ids at -inf); 0 (default): none",
    )
    p.add_argument(
        "--depths",
        type=int,
        default=2,
        help="--loss mtp: prediction depths D (default %(default)s)",
    )
    p.add_argument(
        "--beta",
        type=float,
        default=None,
        help=f"KL coefficient of --loss grpo (default {GRPO_BETA}; 0: no reference log-probs, as in TRL), "
        f"or the generalized-JSD beta of --loss distill (default {DISTILL_BETA})",
    )
    p.add_argument(
        "--sweep",
        choices=("tokens", "vocab"),
        help="run every method at several sizes (default: 1/8, 1/4, 1/2 and 1x the size)",
    )
    p.add_argument("--sweep-values", help="comma-separated sizes for --sweep")
    p.add_argument(
        "--memory-cap-mib",
        type=float,
        help="let each method use at most this much memory above its inputs; methods that need "
        "more are reported as OOM (simulates a smaller machine)",
    )
    p.add_argument("--no-check", action="store_true", help="skip the float64 reference and error columns")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--plot", metavar="PATH", help="also write a PNG of time and peak memory (needs matplotlib)")
    p.add_argument(
        "--tp",
        type=int,
        help="vocabulary-parallel mode over this many processes (gloo on CPU, NCCL on CUDA): --loss cross_entropy "
        "or logprobs, memops (replicated and sequence-parallel hidden states) vs gathered logits vs the "
        "single-process op; time and per-rank peak memory (bench/tp.py)",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--ref-file", help=argparse.SUPPRESS)


class Progress:
    """A progress bar on stderr (one line per update when stderr is not a terminal)."""

    def __init__(self, total: int, stream=None):
        self.total, self.done, self.stream = max(total, 1), 0, stream or sys.stderr
        self.tty = self.stream.isatty()

    def update(self, label: str) -> None:
        self.done = min(self.done + 1, self.total)
        filled = 30 * self.done // self.total
        bar = f"[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} {label}"
        self.stream.write(("\r" + bar.ljust(90)) if self.tty else bar + "\n")
        if self.tty and self.done == self.total:
            self.stream.write("\n")
        self.stream.flush()


def _resolve(args) -> list[dict]:
    """Fill preset defaults, check every argument, return the shapes to run."""
    preset = PRESETS.get(args.preset, {})
    args.tokens = args.tokens if args.tokens is not None else preset.get("tokens", DEFAULT["tokens"])
    args.hidden = args.hidden if args.hidden is not None else preset.get("hidden", DEFAULT["hidden"])
    args.vocab = args.vocab if args.vocab is not None else preset.get("vocab", DEFAULT["vocab"])
    if args.softcap is None:
        args.softcap = preset.get("softcap")
    args.bias = bool(args.bias or preset.get("bias"))
    if args.dtype is None:
        args.dtype = "bfloat16" if args.preset == "seed-harness" else "float32"
    if args.bias and args.loss in ("grpo", "logprobs", "distill", "class_weighted", "mtp", "verl"):
        raise SystemExit(f"--bias: cross-entropy and transforms only, not --loss {args.loss}")
    for name in ("tokens", "hidden", "vocab", "reps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be >= 1")
    if args.softcap is not None and not args.softcap > 0:
        raise SystemExit("--softcap must be > 0")
    if args.beta is None:
        args.beta = DISTILL_BETA if args.loss == "distill" else GRPO_BETA
    if args.loss == "distill":
        if args.softcap is not None:
            raise SystemExit("--loss distill takes no --softcap")
        if not 0 <= args.beta <= 1:
            raise SystemExit(f"--beta of --loss distill must be in [0, 1], got {args.beta!r}")
    if args.depths < 1:
        raise SystemExit("--depths must be >= 1")
    if args.kept < 0 or (args.kept and args.loss not in ("grpo", "logprobs")):
        raise SystemExit("--kept: a non-negative count, with --loss grpo or logprobs only")
    if args.loss in ("grpo", "logprobs"):
        if args.softcap is not None:
            raise SystemExit(f"--loss {args.loss} takes no --softcap")
        if args.batch < 1:
            raise SystemExit("--batch must be >= 1")
        if not math.isfinite(args.beta):
            raise SystemExit(f"--beta must be finite, got {args.beta!r}")
    if not 0.0 <= args.ignored <= 1.0:
        raise SystemExit(f"--ignored must be a fraction in [0, 1], got {args.ignored!r}")
    if args.memory_cap_mib is not None and not args.memory_cap_mib > 0:
        raise SystemExit("--memory-cap-mib must be > 0")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    args.method_list = methods
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise SystemExit("--plot needs matplotlib: pip install 'memops[bench]'")
    if args.sweep_values and not args.sweep:
        raise SystemExit("--sweep-values needs --sweep tokens|vocab")
    base = {"tokens": args.tokens, "hidden": args.hidden, "vocab": args.vocab}
    if not args.sweep:
        return _check_grpo([base], args)
    if args.sweep_values:
        try:
            values = [int(v) for v in args.sweep_values.split(",") if v.strip()]
        except ValueError:
            raise SystemExit(f"--sweep-values must be comma-separated integers, got {args.sweep_values!r}") from None
        if not values or min(values) < 1:
            raise SystemExit("--sweep-values must be integers >= 1")
    else:
        values = [max(1, base[args.sweep] // f) for f in (8, 4, 2, 1)]
    return _check_grpo([dict(base, **{args.sweep: v}) for v in sorted(set(values))], args)


def _check_grpo(shapes: list[dict], args) -> list[dict]:
    if args.loss in ("grpo", "logprobs"):
        for s in shapes:
            if s["tokens"] % args.batch:
                raise SystemExit(f"--loss {args.loss} needs tokens ({s['tokens']}) divisible by --batch ({args.batch})")
    return shapes


def _run_shape(
    args, shape: dict, methods: list[str], skipped: dict[str, str], progress: Progress, tmp: str, done=None
) -> list[dict]:
    """Every method's row at ``shape``; ``done(rows)`` (when given) gets the rows measured so far as each
    one is measured (on CUDA after each method, on CPU after the round-robin)."""
    rows = {m: {"method": m, "status": "skipped", "error": why} for m, why in skipped.items()}

    def report(new: dict) -> None:
        if done is not None:
            done(new, add_ratios([rows[m] for m in methods if m in rows]))

    runnable = [m for m in methods if m not in skipped]
    ref_file = None
    if not args.no_check:
        ref_file = os.path.join(tmp, f"ref-{shape['tokens']}-{shape['vocab']}.pt")
        ref = Worker(args, "reference", shape, ref_file, tmp)
        if ref.read() is None:
            why = (ref.failure or {}).get("message")
            print(f"float64 reference failed ({why}); error columns left out", flush=True)
            ref_file = None
        ref.proc.wait()
        progress.update("float64 reference")

    def steps(workers):
        for rep in range(args.reps):
            for wk in workers:
                if not wk.failure:
                    wk.request("step")
                progress.update(f"{wk.method} step {rep + 1}/{args.reps}")

    workers = []
    try:
        if args.device == "cpu":  # all warm first, then round-robin
            for m in runnable:
                workers.append(Worker(args, m, shape, ref_file, tmp))
                workers[-1].read()
                progress.update(f"{m} warm-up")
            steps(workers)
            for wk in workers:
                rows[wk.method] = wk.result()
                report(rows[wk.method])
        else:  # one process at a time: no other method's memory on the device
            for m in runnable:
                workers.append(Worker(args, m, shape, ref_file, tmp))
                workers[-1].read()
                progress.update(f"{m} warm-up")
                steps(workers[-1:])
                rows[m] = workers[-1].result()
                report(rows[m])
    finally:  # a run cut short leaves no worker behind
        for wk in workers:
            wk.stop()
    return add_ratios([rows[m] for m in methods])


def main(args) -> int:
    if args.dtype is None:
        args.dtype = "bfloat16" if args.preset == "seed-harness" else "float32"
    if args.worker:
        run_worker(args)
        return 0
    if args.tp:
        from . import tp

        return tp.main(args)
    shapes = _resolve(args)
    if args.preset == "overhead":
        from . import overhead

        return overhead.main(args)
    import torch

    import memops

    if args.loss not in ("grpo", "logprobs", "distill", "class_weighted", "mtp", "verl"):
        try:
            memops.registry.get_transform(args.loss)  # unknown names fail here, before any worker starts
        except (KeyError, ValueError) as exc:
            raise SystemExit(f"--loss: {exc}") from None
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available in this torch build")
    if not (args.device == "cpu" or args.device.startswith("cuda")):
        raise SystemExit(f"--device must be cpu or cuda, got {args.device!r}")
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    softcap = f" softcap={args.softcap:g}" if args.softcap is not None else ""
    if args.bias:
        softcap += " with bias"
    if args.loss == "grpo":
        softcap += f", {args.ignored:.0%} of completion tokens masked, beta={args.beta:g}"
    elif args.loss == "logprobs":
        softcap += f", {args.ignored:.0%} of completion tokens masked"
    elif args.loss == "distill":
        softcap += f", {args.ignored:.0%} of targets ignored, beta={args.beta:g}"
    elif args.loss == "mtp":
        softcap += f", {args.depths} depths, {args.ignored:.0%} of targets ignored"
    elif args.loss == "verl":
        softcap += f", {args.ignored:.0%} of tokens masked, entropy bonus {ENTROPY_COEFF:g}"
    else:
        softcap += f", {args.ignored:.0%} of targets ignored"
    if args.kept:
        softcap += f", a sampling mask of {args.kept} kept ids per token"
    print(
        f"# memops bench ({args.loss}{softcap}): D={args.hidden} V={args.vocab} {args.dtype} on {device_name}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        flush=True,
    )
    methods = args.method_list
    skipped = {m: why for m in methods if (why := unavailable(m, args.loss, args.device, args.softcap, args.bias))}
    runnable = len(methods) - len(skipped)
    progress = Progress(len(shapes) * ((0 if args.no_check else 1) + runnable * (1 + args.reps)))
    runs: list[dict] = []

    def write_json(partial=None) -> None:
        """The JSON file rewritten whole as each row arrives: a run cut short keeps what it measured."""
        if not args.json:
            return
        config = {
            k: getattr(args, k)
            for k in (
                "tokens",
                "hidden",
                "vocab",
                "softcap",
                "preset",
                "dtype",
                "device",
                "reps",
                "loss",
                "ignored",
                "batch",
                "beta",
                "sweep",
                "memory_cap_mib",
            )
        }
        config["methods"] = methods
        data = {
            "config": config,
            "torch": torch.__version__,
            "device_name": device_name,
            "threads": torch.get_num_threads(),
            "runs": runs + ([partial] if partial else []),
            "complete": partial is None,
        }
        tmp_path = args.json + ".tmp"
        with open(tmp_path, "w") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp_path, args.json)

    with tempfile.TemporaryDirectory() as tmp:
        for shape in shapes:

            def done(row, so_far, shape=shape):
                t = row.get("time_s")
                print(
                    f"row N={shape['tokens']} D={shape['hidden']} V={shape['vocab']}: {row['method']} "
                    f"{row.get('status')}" + (f" {t * 1e3:.2f} ms" if isinstance(t, (int, float)) else ""),
                    flush=True,
                )
                write_json(dict(shape, rows=so_far))

            rows = _run_shape(args, shape, methods, skipped, progress, tmp, done)
            runs.append(dict(shape, rows=rows))
            print(f"\n## N={shape['tokens']} D={shape['hidden']} V={shape['vocab']}\n", flush=True)
            print(format_table(rows), flush=True)
            write_json()
    print(f"\n{LEGEND}", flush=True)
    if args.plot:
        plot(
            runs,
            args.sweep,
            args.plot,
            f"{args.loss}{softcap}, "
            + {"tokens": f"D={args.hidden} V={args.vocab}", "vocab": f"N={args.tokens} D={args.hidden}"}.get(
                args.sweep, f"N={args.tokens} D={args.hidden} V={args.vocab}"
            )
            + f" {args.dtype}, {device_name}",
        )
    return 0
