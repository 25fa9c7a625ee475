"""2 gloo ranks (``torchrun``): verl's Megatron engine head, ``verl.models.mcore.model_forward_fused.
fused_output_processor`` itself, on megatron-core 0.16.1's tensor-parallel group (TP=2), with memops loaded
through ``VERL_USE_EXTERNAL_MODULES``: sequence parallelism on (each rank's ``[S / 2, 1, D]`` hidden states,
gathered by Megatron's ``gather_from_sequence_parallel_region`` inside verl's function) and off (replicated
``[S, 1, D]``), tied (``output_weight``: the embedding's shard) and untied (``output_layer.weight``) output
weights.  Log-probs, entropy, the weight shard's and the hidden states' gradients against the single-process
float64 reference.  Prints "ok".

Stand-ins, because megatron-core allocates its gathered buffers on ``torch.cuda.current_device()``: that lookup
points at the CPU; ``config`` (a ``TransformerConfig``) and ``context`` are namespaces holding the two fields the
function reads (``sequence_parallel``, no config logger; ``temperature``)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.distributed as dist
import verl  # noqa: F401  (imports memops.integrations.verl through VERL_USE_EXTERNAL_MODULES)
from megatron.core import parallel_state
from verl.models.mcore import model_forward_fused as mff


def main():
    dist.init_process_group("gloo")
    torch.cuda.current_device = lambda: "cpu"
    from memops.integrations import verl as mv

    assert mff.linear_cross_entropy is mv.linear_cross_entropy
    from megatron.core.tensor_parallel import mappings

    # the autograd nodes memops reads to tell a caller that sums the input gradients: this release's names
    for cls in (mappings._GatherFromSequenceParallelRegion, mappings._CopyToModelParallelRegion):
        assert cls.__name__ + "Backward" in mv._SUMMING_NODES, cls
    rank, world = dist.get_rank(), dist.get_world_size()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    S, D, V, temperature = 12, 16, 2 * 37, 0.8  # V / TP = 37 rows a rank: not a multiple of 128
    rows = V // world
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(S, 1, D, generator=g, dtype=torch.float64)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (1, S), generator=g)
    a, b = torch.randn(S, generator=g, dtype=torch.float64), torch.randn(S, generator=g, dtype=torch.float64)
    hx, wx = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp_all = ((hx.reshape(S, D) @ wx.T) / temperature).log_softmax(-1)
    want_logp = logp_all.gather(-1, labels.reshape(S, 1)).squeeze(-1)
    want_ent = -(logp_all.exp() * logp_all).sum(-1)
    want_gh, want_gw = torch.autograd.grad((a * want_logp + b * want_ent).sum(), (hx, wx))
    mine = slice(rank * rows, (rank + 1) * rows)
    seq = slice(rank * S // world, (rank + 1) * S // world)
    try:
        for sp in (False, True):
            for tied in (False, True):
                h = (hidden[seq] if sp else hidden).clone().requires_grad_()
                w = weight[mine].clone().requires_grad_()
                out = mff.fused_output_processor(
                    hidden_states=h,
                    output_layer=None if tied else SimpleNamespace(weight=w),
                    output_weight=w if tied else None,
                    labels=labels,
                    context=SimpleNamespace(temperature=temperature),
                    config=SimpleNamespace(sequence_parallel=sp, config_logger_dir=""),
                )
                gh, gw = torch.autograd.grad((a * out.log_probs + b * out.entropy).sum(), (h, w))
                what = f"sp={sp} tied={tied}"
                for got, exp, name in (
                    (out.log_probs, want_logp, "log-probs"),
                    (out.entropy, want_ent, "entropy"),
                    (gw, want_gw[mine], "weight-shard gradient"),
                    (gh, want_gh[seq] if sp else want_gh, "hidden gradient"),
                ):
                    torch.testing.assert_close(
                        got, exp, rtol=1e-10, atol=1e-12, msg=lambda m, n=f"{what} {name}": f"rank {rank} {n}: {m}"
                    )
    finally:
        parallel_state.destroy_model_parallel()
    if rank == 0:
        print("megatron: ok", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
