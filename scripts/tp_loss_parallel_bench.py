"""The loss alone at torchtitan's TP=2 shape: memops' vocabulary-parallel cross-entropy vs PyTorch's
``loss_parallel`` (what torchtitan's own loss runs under TP: the head's output as vocabulary-sharded logits
``DTensor``, ``F.cross_entropy`` inside ``loss_parallel()``), forward + backward, summed loss.

    OMP_NUM_THREADS=1 python -m torch.distributed.run --nproc_per_node 2 scripts/tp_loss_parallel_bench.py OUT.json

Rank 0 writes the median and minimum milliseconds of REPS alternating steps (after one warm-up each) and both
losses (N tokens, D=256, V=2048: torchtitan's llama3 debug model; the head sharded by rows over 2 ranks, the
hidden states replicated)."""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import loss_parallel

import memops.distributed


def main(out: str) -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    n, d, v, reps = int(os.environ.get("N", 8192)), 256, 2048, int(os.environ.get("REPS", 5))
    g = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(distribute_tensor(torch.randn(v, d, generator=g) * 0.02, mesh, [Shard(0)]))
    hidden = torch.randn(4, n // 4, d, generator=g)
    target = torch.randint(0, v, (4, n // 4), generator=g)

    def step(kind: str) -> tuple[float, float]:
        h = DTensor.from_local(hidden.clone().requires_grad_(), mesh, [Replicate()])
        start = time.perf_counter()
        if kind == "memops":
            loss = memops.distributed.vocab_parallel_cross_entropy(h, weight, target, reduction="sum")
            loss = loss.to_local() if isinstance(loss, DTensor) else loss
            loss.backward()
        else:
            logits = torch.matmul(h, weight.t())  # Shard(-1): each rank its vocabulary rows' logits
            labels = DTensor.from_local(target.flatten(), mesh, [Replicate()])
            with loss_parallel():
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels, reduction="sum")
                loss.backward()
            loss = loss.full_tensor()
        dist.barrier()
        return time.perf_counter() - start, loss.item()

    kinds = ("loss_parallel", "memops")
    times: dict[str, list[float]] = {k: [] for k in kinds}
    losses = {k: step(k)[1] for k in kinds}  # warm-up
    for _ in range(reps):
        for k in kinds:
            times[k].append(step(k)[0] * 1000)
    if dist.get_rank() == 0:
        result = {"tokens": n, "hidden": d, "vocab": v, "ranks": dist.get_world_size(), "torch": torch.__version__}
        for k in kinds:
            ts = sorted(times[k])
            result[k] = {"median_ms": ts[len(ts) // 2], "min_ms": ts[0], "loss": losses[k]}
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
