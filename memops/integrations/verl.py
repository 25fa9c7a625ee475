"""memops as verl's fused log-prob head (verl 0.9.1: ``use_fused_kernels=True``).

verl computes the actor's log-probs and entropy from the hidden states and the output weight without the full
logits in two places, both looked up by name when they run:

* the FSDP engine's patched model forwards (``verl/models/transformers/dense_common.py``, ``qwen2_vl.py``,
  ``qwen3_vl.py``, ``glm4v.py``, ``qwen3_5.py``, installed by ``monkey_patch.patch_forward_with_backends``)
  build ``verl.utils.experimental.torch_functional.FusedLinearForPPO`` (``impl_backend`` "torch" or
  "liger") or call ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy`` (``impl_backend``
  "triton");
* the Megatron engine (``verl/models/mcore/model_forward_fused.py``) calls that same ``linear_cross_entropy``
  with its tensor-parallel group, on hidden states Megatron's ``gather_from_sequence_parallel_region`` has
  gathered when sequence parallelism is on (verl turns it on whenever TP > 1).

Importing this module (what ``VERL_USE_EXTERNAL_MODULES=memops.integrations.verl`` does in every verl process,
workers included) puts memops in those three places, whichever backend is configured; a plain ``import memops``
changes nothing.  :func:`uninstall` restores verl's own.

What memops computes is verl's (log-probs fp32 shaped like the labels; the entropy in the hidden states' dtype
for ``FusedLinearForPPO``, fp32 for ``linear_cross_entropy``, as verl's kernels return them), with exact
gradients of both outputs, for any hidden and vocabulary size, and:

* a per-sample or per-token ``temperature`` tensor (broadcastable to the labels), which verl's fused path
  refuses;
* on a tensor-parallel group, the input gradient each caller needs: hidden states that came through
  Megatron's sequence-parallel gather (whose backward sums the ranks' gradients) get each rank's part
  (``input_grad="partial"``), replicated hidden states the group's sum (``"reduced"``), so the hidden-state
  gradients are exact with sequence parallelism on and off (verl's Triton kernel returns the part in both).
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from ..distributed import vocab_parallel_logprobs
from ..ops.logprobs import linear_logprobs

TESTED_VERSION = "0.9.1"

# (module, attribute) pairs this module replaces, and verl's originals while installed
_TARGETS = (
    ("verl.utils.experimental.torch_functional", "FusedLinearForPPO"),
    ("verl.utils.kernel.linear_cross_entropy", "linear_cross_entropy"),
    ("verl.models.mcore.model_forward_fused", "linear_cross_entropy"),
)
_ORIGINALS: dict[tuple[str, str], object] = {}

# the autograd nodes of Megatron's ops whose backward sums the tensor-parallel ranks' input gradients
_SUMMING_NODES = ("_GatherFromSequenceParallelRegionBackward", "_CopyToModelParallelRegionBackward")


def _summed_by_caller(hidden: Tensor) -> bool:
    """Whether ``hidden`` came straight out of a Megatron op whose backward sums the group's gradients."""
    node = hidden.grad_fn
    return node is not None and type(node).__name__ in _SUMMING_NODES


def log_probs_and_entropy(
    hidden_states: Tensor,
    vocab_weights: Tensor,
    labels: Tensor,
    temperature: float | Tensor = 1.0,
    group=None,
) -> tuple[Tensor, Tensor]:
    """``(log p(labels), entropy)`` of ``softmax(hidden_states @ vocab_weights.T / temperature)``, fp32, shaped
    like ``labels``; with ``group`` ``vocab_weights`` is this rank's equal share of the vocabulary rows (rank
    ``r`` holds rows ``[r * V_local, (r + 1) * V_local)``, Megatron's layout) and ``hidden_states`` every
    rank's same tokens."""
    labels = labels.long()
    if group is None:
        out = linear_logprobs(hidden_states, vocab_weights, labels, temperature=temperature, return_entropy=True)
    else:
        rows = vocab_weights.shape[0]
        rank, world = torch.distributed.get_rank(group), torch.distributed.get_world_size(group)
        out = vocab_parallel_logprobs(
            hidden_states,
            vocab_weights,
            labels,
            temperature=temperature,
            return_entropy=True,
            group=group,
            vocab_start=rank * rows,
            vocab_size=world * rows,
            input_grad="partial" if _summed_by_caller(hidden_states) else "reduced",
        )
    return out  # type: ignore[return-value]


class FusedLinearForPPO(torch.nn.Module):
    """verl's ``FusedLinearForPPO`` (same constructor and ``forward``) computed by memops: ``chunk_size`` and
    ``impl_backend`` are accepted and ignored (memops sizes its chunks itself; any backend gets memops)."""

    def __init__(self, chunk_size: int = 512, impl_backend: str = "torch"):
        super().__init__()
        self.chunk_size = chunk_size
        self.impl_backend = impl_backend

    def forward(
        self,
        hidden_states: Tensor,
        vocab_weights: Tensor,
        input_ids: Tensor,
        temperature: float | Tensor = 1.0,
    ) -> tuple[Tensor, Tensor]:
        if hidden_states.dim() not in (2, 3) or tuple(input_ids.shape) != tuple(hidden_states.shape[:-1]):
            raise ValueError(
                f"FusedLinearForPPO: hidden_states must be [T, D] or [B, T, D] and input_ids its leading shape, got "
                f"hidden_states {tuple(hidden_states.shape)} and input_ids {tuple(input_ids.shape)}"
            )
        log_probs, entropy = log_probs_and_entropy(hidden_states, vocab_weights, input_ids, temperature)
        return log_probs, entropy.to(hidden_states.dtype)


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    temperature: float | Tensor = 1.0,
    reduction: str = "none",
    dist_process_group=None,
) -> tuple[Tensor, Tensor]:
    """verl's ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy`` computed by memops: per-token
    log-probs (``reduction="none"``; ``"sum"`` / ``"mean"`` their sum / mean over the tokens) and per-token
    entropy, both fp32 and flattened to ``[N]``, as verl's kernel returns them; with ``dist_process_group``
    ``weight`` is this rank's vocabulary shard (see :func:`log_probs_and_entropy`)."""
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"linear_cross_entropy: labels shape {tuple(labels.shape)} must be hidden's leading shape "
            f"{tuple(hidden.shape[:-1])}"
        )
    log_probs, entropy = log_probs_and_entropy(hidden, weight, labels, temperature, dist_process_group)
    log_probs, entropy = log_probs.reshape(-1), entropy.reshape(-1)
    if reduction == "sum":
        log_probs = log_probs.sum()
    elif reduction == "mean":
        log_probs = log_probs.mean()
    return log_probs, entropy


_REPLACEMENTS = {
    "FusedLinearForPPO": FusedLinearForPPO,
    "linear_cross_entropy": linear_cross_entropy,
}


def install() -> list[str]:
    """Put memops in verl's fused head (the modules of it that import here: the Megatron one needs
    megatron-core); returns the ``module.attribute`` names replaced.  Refuses a verl release other than
    :data:`TESTED_VERSION` (its fused path's names and contracts are what this module replaces)."""
    import verl

    if getattr(verl, "__version__", None) != TESTED_VERSION:
        raise RuntimeError(
            f"memops.integrations.verl replaces verl {TESTED_VERSION}'s fused log-prob head; this is verl "
            f"{getattr(verl, '__version__', '?')}: its fused path may differ, so memops is not installed in it"
        )
    done = []
    for module_name, attr in _TARGETS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # megatron-core not installed: verl's Megatron engine cannot run either
            continue
        key = (module_name, attr)
        if key not in _ORIGINALS:
            _ORIGINALS[key] = getattr(module, attr)
        setattr(module, attr, _REPLACEMENTS[attr])
        done.append(f"{module_name}.{attr}")
    return done


def uninstall() -> None:
    """Give verl its own fused head back."""
    for (module_name, attr), original in list(_ORIGINALS.items()):
        setattr(importlib.import_module(module_name), attr, original)
        del _ORIGINALS[module_name, attr]


INSTALLED = install()
