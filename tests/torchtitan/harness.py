"""One rank of a torchtitan training run on the CPU (launched by ``torchrun`` from ``test_torchtitan.py`` and
``scripts/torchtitan_bench.sh``).

``python harness.py OUT [torchtitan CLI arguments...]`` runs torchtitan's own config manager and trainer (the
CLI arguments given) and writes ``OUT.rank<r>.json``: the loss of each step as the trainer returned it (this
rank's summed loss / the global valid-token count), the gradient norm of each step, the seconds of each
forward+backward, how often memops' loss ran, and the rank's peak resident memory (``VmHWM``).
``python harness.py --assets DIR`` writes what torchtitan's debug configs read from ``./tests/assets`` (a
word-level tokenizer and the ``c4_test`` text), made here: nothing is downloaded.

CPU workarounds (torchtitan 0.3.0 with torch 2.13 on a machine without a GPU), each applied here before the
trainer is imported, none of them touching the loss:

1. torchtitan picks ``device_type="cuda"`` when no accelerator is found: ``torchtitan.tools.utils`` gets
   ``"cpu"`` and a device module that forwards to ``torch.cpu``, with stand-ins for the memory-monitor calls.
2. FlexAttention has no CPU backward: ``FlexAttention.compiled_flex_attn`` is replaced by dense attention
   (the block mask's ``mask_mod`` evaluated on broadcasting position indices, then SDPA).
3. ``torch.distributed.set_timeout`` does not exist in torch 2.13: a no-op.
4. FSDP2 on gloo rejects ``PREMUL_SUM``: gradient reductions are forced to plain sums (torchtitan sets a
   divide factor of 1, so the sums are what it asks for).
5. The default SPMD backend fails in ``fully_shard`` with torch 2.13: the test passes
   ``--parallelism.spmd_backend partial_dtensor``.
"""

from __future__ import annotations

import inspect
import json
import sys
import time
import types


def _cpu_workarounds() -> None:
    import torch
    import torch.distributed as dist

    # 1. the device
    import torchtitan.tools.utils as tt_utils

    cpu = types.ModuleType("cpu_device_module")
    for name in dir(torch.cpu):
        if not name.startswith("_"):
            setattr(cpu, name, getattr(torch.cpu, name))
    cpu.current_device = lambda: 0
    cpu.set_device = lambda *a, **k: None
    cpu.device_count = lambda: 1
    cpu.synchronize = lambda *a, **k: None
    cpu.get_device_name = lambda *a, **k: "cpu"
    cpu.get_device_properties = lambda *a, **k: types.SimpleNamespace(total_memory=1 << 40, name="cpu")
    cpu.memory_stats = lambda *a, **k: {}
    cpu.reset_peak_memory_stats = lambda *a, **k: None
    cpu.empty_cache = lambda *a, **k: None
    tt_utils.device_type, tt_utils.device_module = "cpu", cpu

    # 2. attention: dense, from the block mask's mask_mod
    from torchtitan.models.common.attention import FlexAttention

    def dense_flex_attn(q, k, v, *, score_mod, block_mask, scale, enable_gqa, return_aux, kernel_options):
        assert score_mod is None and not (return_aux is not None and return_aux.lse)
        mask = None
        if block_mask is not None:  # mask_mod on broadcasting index tensors: [B, H, Lq, Lk] booleans
            sizes = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
            idx = [torch.arange(n).view([-1 if d == i else 1 for d in range(4)]) for i, n in enumerate(sizes)]
            mask = block_mask.mask_mod(*idx).expand(sizes)
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=scale, enable_gqa=enable_gqa
        )
        return out, None

    FlexAttention.compiled_flex_attn = staticmethod(dense_flex_attn)

    # 3. set_timeout
    if not hasattr(dist, "set_timeout"):
        dist.set_timeout = lambda *a, **k: None

    # 4. sum reductions for FSDP2's gradients on gloo
    from torch.distributed.fsdp._fully_shard import _fsdp_collectives

    factors = _fsdp_collectives._get_gradient_divide_factors
    signature = inspect.signature(factors)

    def summed(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.arguments["force_sum_reduction_for_comms"] = True
        return factors(*bound.args, **bound.kwargs)

    _fsdp_collectives._get_gradient_divide_factors = summed


def make_assets(root) -> None:
    """``root/tests/assets/tokenizer`` (200 words and 3 special tokens) and ``root/tests/assets/c4_test``
    (200 lines of text)."""
    import random
    from pathlib import Path

    from tokenizers import Tokenizer, models, pre_tokenizers

    assets = Path(root) / "tests" / "assets"
    (assets / "tokenizer").mkdir(parents=True, exist_ok=True)
    (assets / "c4_test").mkdir(parents=True, exist_ok=True)
    words = [f"w{i}" for i in range(200)]
    special = {"unk_token": "<unk>", "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
    vocab = {tok: i for i, tok in enumerate(special.values())} | {w: i + 3 for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(assets / "tokenizer" / "tokenizer.json"))
    (assets / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(special))
    rng = random.Random(0)
    with open(assets / "c4_test" / "data.json", "w") as f:
        for _ in range(200):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(20, 80)))}) + "\n")


def _counted(module, name: str, calls: dict) -> None:
    """``module.name`` counted in ``calls["memops"]`` (memops' torchtitan loss looks both up at each call)."""
    inner = getattr(module, name)

    def counted(*args, **kwargs):
        calls["memops"] += 1
        return inner(*args, **kwargs)

    setattr(module, name, counted)


def main() -> None:
    out, args = sys.argv[1], sys.argv[2:]
    if out == "--assets":
        make_assets(args[0])
        return
    _cpu_workarounds()
    import torch
    import torchtitan.distributed.utils as dist_utils
    from torchtitan.config import ConfigManager
    from torchtitan.tools.logging import init_logger

    import memops
    import memops.distributed
    from memops.bench.worker import status_kib

    init_logger()
    calls = {"memops": 0}
    _counted(memops, "linear_cross_entropy", calls)
    _counted(memops.distributed, "vocab_parallel_cross_entropy", calls)
    _counted(memops, "linear_mtp_cross_entropy", calls)
    grad_norms = []
    clip = dist_utils.clip_grad_norm_

    def clip_recorded(*a, **k):
        norm = clip(*a, **k)
        grad_norms.append(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))
        return norm

    dist_utils.clip_grad_norm_ = clip_recorded  # the trainer looks it up at each step
    trainer = ConfigManager().parse_args(args).build()
    losses, seconds = [], []
    step = trainer.forward_backward_step

    def recorded(**kwargs):
        start = time.perf_counter()
        loss = step(**kwargs)
        seconds.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
        return loss

    trainer.forward_backward_step = recorded
    try:
        trainer.train()
    finally:
        trainer.close()
    record = {
        "losses": losses,
        "grad_norms": grad_norms,
        "step_seconds": seconds,
        "memops_calls": calls["memops"],
        "loss_class": type(trainer.loss_fn).__qualname__,
        "peak_rss_mib": status_kib("VmHWM") / 1024,
    }
    with open(f"{out}.rank{torch.distributed.get_rank()}.json", "w") as f:
        json.dump(record, f)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
