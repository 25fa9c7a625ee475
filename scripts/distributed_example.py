"""Vocab-parallel cross-entropy on 2 CPU processes (gloo):

    torchrun --nproc-per-node 2 scripts/distributed_example.py

Each rank holds half of the lm_head's rows; the loss and the input gradient equal the single-process
ones, each rank's weight gradient is its shard's.
"""

import torch
import torch.distributed as dist

import memops
from memops.distributed import vocab_parallel_cross_entropy

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)  # same hidden states, targets and full weight on every rank
hidden = torch.randn(512, 64, requires_grad=True)
full_weight = torch.randn(1000, 64) / 8
target = torch.randint(0, 1000, (512,))

rows = full_weight.shape[0] // world
shard = full_weight[rank * rows : (rank + 1) * rows].clone().requires_grad_()
loss = vocab_parallel_cross_entropy(hidden, shard, target, label_smoothing=0.1)
loss.backward()

reference = memops.linear_cross_entropy(hidden.detach(), full_weight, target, label_smoothing=0.1)
print(
    f"rank {rank}: loss {loss.item():.6f} (single process {reference.item():.6f}), "
    f"weight shard grad {tuple(shard.grad.shape)}, input grad norm {hidden.grad.norm():.4f}"
)
dist.destroy_process_group()
