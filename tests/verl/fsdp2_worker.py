"""2 gloo ranks (``torchrun``), FSDP2 on a tiny Llama patched by verl's ``patch_forward_with_backends`` (torch
backend): 4 AdamW steps of verl's ``compute_policy_loss`` (token-mean over both ranks' tokens) minus an entropy
bonus (``agg_loss`` of the entropy), with verl's own head (``argv[1] == "verl"``) or memops' (``"memops"``,
loaded through ``VERL_USE_EXTERNAL_MODULES``). Rank 0 writes each step's loss and gradient norm to ``argv[2]``
as JSON."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
import transformers
from torch.distributed.fsdp import fully_shard
from verl.models.transformers.monkey_patch import patch_forward_with_backends
from verl.trainer.ppo.core_algos import agg_loss, compute_policy_loss


def main():
    head, out_path = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from verl.utils.experimental import torch_functional as tf

    memops_on = tf.FusedLinearForPPO.__module__.startswith("memops")
    assert memops_on == (head == "memops"), (head, tf.FusedLinearForPPO)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=293,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config)
    patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend="torch")
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    B, T, temperature, entropy_coeff = 2, 9, 0.9, 0.01
    g = torch.Generator().manual_seed(1 + rank)  # each rank its own batch
    records = []
    for _ in range(4):
        ids = torch.randint(0, config.vocab_size, (B, T), generator=g)
        mask = (torch.rand(B, T, generator=g) > 0.2).float()
        adv = torch.randn(B, T, generator=g)
        old = -torch.rand(B, T, generator=g) * 5
        out = model(input_ids=ids, temperature=temperature, return_dict=True)
        logp, ent = out.log_probs.reshape(B, T), out.entropy.reshape(B, T)
        # verl's PPO policy loss (token-mean over this rank's tokens; FSDP2 averages the ranks' gradients) minus
        # the entropy bonus aggregated the same way
        pg_loss, _, _, _ = compute_policy_loss(old, logp, adv, mask, cliprange=0.2, loss_agg_mode="token-mean")
        loss = pg_loss - entropy_coeff * agg_loss(ent, mask, "token-mean")
        opt.zero_grad()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e9)
        opt.step()
        whole = loss.detach().clone()
        dist.all_reduce(whole)
        records.append({"loss": whole.item() / world, "grad_norm": norm.full_tensor().item()})
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(records, f)
        print(f"{head}: {records}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
