"""``python -m memops train-demo``: the same Llama trained unpatched and patched, step by step.

Offline and deterministic: the corpus is this Python's own standard-library source, tokenized by a
byte-level BPE tokenizer that the command trains first (``tokenizers``); the model is a Llama built from a
config in code with random initialization.  Each variant (unpatched transformers, then
``memops.integrations.transformers.apply``) runs in its own subprocess from the same seed on the same
batches with gradient accumulation, recording the loss, the step time and the peak memory.  Writes
``loss_curves.png``, ``train_demo.md`` (table) and ``train_demo.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import time
from typing import Any

from .bench.worker import reset_peak_rss, status_kib

CONFIGS: dict[str, dict[str, Any]] = {
    # a small Llama for CPUs
    "tiny": dict(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    ),
    # Llama 3.2 1B's architecture (random init), for GPUs
    "llama-3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        tie_word_embeddings=True,
        rope_theta=500000.0,
        vocab_size=128256,
    ),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        choices=sorted(CONFIGS),
        default="tiny",
        help="model architecture: tiny (hidden 256, 2 layers, for CPUs) or llama-3.2-1b (Llama 3.2 1B's shape, "
        "random init, 128256-token vocabulary, for GPUs) (default: %(default)s)",
    )
    p.add_argument(
        "--model-type",
        default="llama",
        help="any verified transformers model type (python -m memops models), built from its own config class "
        "at --config's sizes (default: %(default)s)",
    )
    p.add_argument("--steps", type=int, default=50, help="optimizer steps (default: %(default)s)")
    p.add_argument(
        "--accum", type=int, default=2, help="gradient accumulation micro-batches per step (default: %(default)s)"
    )
    p.add_argument("--batch", type=int, default=4, help="sequences per micro-batch (default: %(default)s)")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence (default: %(default)s)")
    p.add_argument(
        "--vocab", type=int, default=32000, help="BPE vocabulary the tokenizer is trained to (default: %(default)s)"
    )
    p.add_argument(
        "--corpus-mb",
        type=float,
        default=4.0,
        help="megabytes of this Python's standard-library source to train on (default: %(default)s)",
    )
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default: %(default)s)")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="parameter and activation dtype; the loss-parity check applies to float32 (default: %(default)s)",
    )
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: %(default)s)")
    p.add_argument(
        "--out",
        default="train-demo-out",
        help="output folder for loss_curves.png, train_demo.md and train_demo.json (default: %(default)s)",
    )
    p.add_argument("--variant", choices=("unpatched", "memops"), help=argparse.SUPPRESS)


def _corpus(limit_bytes: int) -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    texts, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "test", "__pycache__"))
        for name in sorted(filenames):
            if name.endswith(".py") and total < limit_bytes:
                with open(os.path.join(dirpath, name), encoding="utf-8", errors="replace") as f:
                    text = f.read()
                texts.append(text)
                total += len(text)
    if not texts:
        raise SystemExit(f"no Python source found under {root}")
    return texts


def _prepare(args) -> str:
    """Train the tokenizer, tokenize the corpus, save the token stream; return its path."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = _corpus(int(args.corpus_mb * 2**20))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    t0 = time.perf_counter()
    tok.train_from_iterator(texts, trainer=trainer)
    ids = [i for enc in tok.encode_batch(texts) for i in enc.ids]
    need = args.steps * args.accum * args.batch * (args.seq + 1)
    if len(ids) < need:
        raise SystemExit(f"corpus gives {len(ids)} tokens, the run needs {need}: raise --corpus-mb")
    path = os.path.join(args.out, "tokens.pt")
    torch.save(torch.tensor(ids[:need], dtype=torch.long), path)
    print(
        f"tokenizer: {tok.get_vocab_size()} tokens trained on {sum(map(len, texts)) / 2**20:.1f} MB of "
        f"{sysconfig.get_paths()['stdlib']} in {time.perf_counter() - t0:.1f} s; {len(ids)} tokens",
        flush=True,
    )
    return path


def _peak_reset(device):
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()


def _peak_bytes(device) -> int | None:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return status_kib("VmHWM") * 1024


def _run_variant(args) -> None:
    import torch
    import transformers

    from .integrations import transformers as mt

    device = torch.device(args.device)
    tokens = torch.load(os.path.join(args.out, "tokens.pt"))
    cfg = dict(CONFIGS[args.config])
    cfg.setdefault("vocab_size", args.vocab)
    torch.manual_seed(0)
    if args.model_type == "llama":
        config = transformers.LlamaConfig(max_position_embeddings=max(args.seq, 128), **cfg)
        model: Any = transformers.LlamaForCausalLM(config)
    else:  # the type's own config class at these sizes (memops' tiny builder, every other size small)
        from .integrations.hf.tiny import model_class, small_config

        cls = model_class(args.model_type)
        sizes = dict(cfg, head_dim=cfg["hidden_size"] // cfg["num_attention_heads"])
        model = cls(small_config(cls.config_class, dict(sizes, max_position_embeddings=max(args.seq, 128))))
    model = model.to(device=device, dtype=getattr(torch, args.dtype)).train()
    if args.variant == "memops":
        mt.apply(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    batches = tokens.view(args.steps, args.accum, args.batch, args.seq + 1)
    losses, times, peak = [], [], None
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for step in range(args.steps):
        if step == 1:  # the first step warms up; peak and times from the second on
            _peak_reset(device)
        sync()
        t0 = time.perf_counter()
        micro = batches[step].to(device)
        # num_items_in_batch as HF Trainer computes it: the step's label tokens over all micro-batches
        num_items = torch.tensor(micro[..., 1:].numel(), device=device)
        total = 0.0
        for mb in micro:
            out = model(input_ids=mb[:, :-1], labels=mb[:, :-1], num_items_in_batch=num_items, use_cache=False)
            out.loss.backward()
            total += out.loss.item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(total)
        print(f"[{args.variant}] step {step + 1}/{args.steps}  loss {total:.6f}  {times[-1]:.3f} s", flush=True)
    peak = _peak_bytes(device)
    with open(os.path.join(args.out, f"{args.variant}.json"), "w") as f:
        json.dump(
            {
                "losses": losses,
                "times_s": times[1:],
                "peak_bytes": peak,
                "params": sum(p.numel() for p in model.parameters()),
            },
            f,
        )


def _plot(res: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_d) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in res.items():
        ax.plot(range(1, len(r["losses"]) + 1), r["losses"], label=name, linestyle="-" if name == "unpatched" else "--")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend()
    rel = [abs(a - b) / abs(b) for a, b in zip(res["memops"]["losses"], res["unpatched"]["losses"])]
    ax_d.semilogy(range(1, len(rel) + 1), [max(r, 1e-12) for r in rel])
    ax_d.axhline(1e-4, color="red", linestyle=":", label="1e-4")
    ax_d.set_xlabel("step")
    ax_d.set_ylabel("|memops - unpatched| / unpatched")
    ax_d.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args) -> int:
    os.makedirs(args.out, exist_ok=True)
    if args.variant:
        _run_variant(args)
        return 0
    for name in ("steps", "accum", "batch", "seq", "vocab"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be >= 1")
    if args.model_type != "llama":
        from .integrations.transformers import verify

        verify(args.model_type)  # refused before any training, naming why
    _prepare(args)
    res = {}
    for variant in ("unpatched", "memops"):
        print(f"training {variant} ...", flush=True)
        cmd = [sys.executable, "-m", "memops", "train-demo", "--variant", variant] + [
            a
            for k in ("config", "model_type", "steps", "accum", "batch", "seq", "vocab", "lr", "dtype", "device", "out")
            for a in (f"--{k.replace('_', '-')}", str(getattr(args, k)))
        ]
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        proc = subprocess.run(cmd, env=env)
        if proc.returncode:
            raise SystemExit(f"{variant} run failed with exit code {proc.returncode}")
        with open(os.path.join(args.out, f"{variant}.json")) as f:
            res[variant] = json.load(f)
    rel = [abs(a - b) / abs(b) for a, b in zip(res["memops"]["losses"], res["unpatched"]["losses"])]
    worst = max(rel)
    ok = worst < 1e-4 if args.dtype == "float32" else None
    rows = ["| run | median step s | peak MiB | final loss |", "|---|---|---|---|"]
    for name, r in res.items():
        peak = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:,.1f}"
        med = statistics.median(r["times_s"]) if r["times_s"] else float("nan")
        rows.append(f"| {name} | {med:.3f} | {peak} | {r['losses'][-1]:.6f} |")
    what = "process peak RSS" if args.device == "cpu" else "torch.cuda.max_memory_allocated"
    table = "\n".join(rows) + (
        f"\n\n{args.config} {args.model_type} ({res['unpatched']['params']:,} parameters), {args.dtype} on "
        f"{args.device}, "
        f"{args.steps} steps x {args.accum} micro-batches x {args.batch} x {args.seq} tokens; peak = {what} "
        f"after the first step.\nLoss parity: max relative difference {worst:.2e} over {len(rel)} steps"
        + ("" if ok is None else f" (fp32 threshold 1e-4: {'OK' if ok else 'FAILED'})")
    )
    print(table)
    with open(os.path.join(args.out, "train_demo.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "train_demo.json"), "w") as f:
        json.dump({"config": vars(args), "runs": res, "max_rel_diff": worst, "parity_ok": ok}, f, indent=2)
    try:
        _plot(
            res,
            os.path.join(args.out, "loss_curves.png"),
            f"{args.config} {args.model_type}, {args.dtype}: loss per step",
        )
    except ImportError:
        print("matplotlib not installed: no plot (pip install 'memops[bench]')")
    return 0 if ok is not False else 1
