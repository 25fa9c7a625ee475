"""memops as verl's fused log-prob head (verl 0.9.1: ``use_fused_kernels=True``).

verl computes the actor's log-probs and entropy from the hidden states and the output weight without the full
logits in two places, both looked up by name when they run:

* the FSDP engine's patched model forwards (``verl/models/transformers/dense_common.py``, ``qwen2_vl.py``,
  ``qwen3_vl.py``, ``glm4v.py``, ``qwen3_5.py``, installed by ``monkey_patch.patch_forward_with_backends``)
  build ``verl.utils.experimental.torch_functional.FusedLinearForPPO`` (``impl_backend`` "torch" or
  "liger") or call ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy`` (``impl_backend``
  "triton");
* the Megatron engine (``verl/models/mcore/model_forward_fused.py``, and ``model_forward_1f1b_overlap.py``
  for its overlapped 1F1B schedule) calls that same ``linear_cross_entropy``
  with its tensor-parallel group, on hidden states Megatron's ``gather_from_sequence_parallel_region`` has
  gathered when sequence parallelism is on (verl turns it on whenever TP > 1).

Importing this module (what ``VERL_USE_EXTERNAL_MODULES=memops.integrations.verl`` does in every verl process,
workers included) puts memops in those three places, whichever backend is configured; a plain ``import memops``
changes nothing.  :func:`uninstall` restores verl's own.

What memops computes is verl's (log-probs fp32 shaped like the labels; the entropy in the hidden states' dtype
for ``FusedLinearForPPO``, fp32 for ``linear_cross_entropy``, as verl's kernels return them), with exact
gradients of both outputs, for any hidden and vocabulary size, and:

* a per-sample or per-token ``temperature`` tensor (broadcastable to the labels), which verl's fused path
  refuses; in the FSDP engine (``FSDPEngineWithLMHead``) a per-sample temperature and
  ``calculate_sum_pi_squared`` (Σπ², from the same chunk pass: ``extras=("log_sum_sq_probs",)``) reach the head
  through wrappers of its ``prepare_model_inputs`` / ``prepare_model_outputs`` (the engine otherwise refuses
  both with fused kernels), with ``use_remove_padding=True`` (verl's default; refused by name without it);
* on a tensor-parallel group, the input gradient each caller needs: hidden states that came through
  Megatron's sequence-parallel gather (whose backward sums the ranks' gradients) get each rank's part
  (``input_grad="partial"``), replicated hidden states the group's sum (``"reduced"``), so the hidden-state
  gradients are exact with sequence parallelism on and off (verl's Triton kernel returns the part in both).
"""

from __future__ import annotations

import contextlib
import functools
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
    ("verl.models.mcore.model_forward_1f1b_overlap", "linear_cross_entropy"),
)
_ORIGINALS: dict[tuple[str, str], object] = {}

# the FSDP engine's methods wrapped (per-sample temperature, Σπ²), and verl's originals while installed
_ENGINE = ("verl.workers.engine.fsdp.transformer_impl", "FSDPEngineWithLMHead")
_ENGINE_ORIGINALS: dict[str, object] = {}
# one forward's request from the engine to the head, and the head's answer: Σπ² per token (the engine's
# prepare_model_inputs sets it, the head fills it, prepare_model_outputs takes it)
_SUM_PI_SQUARED: dict[str, object] = {"wanted": False, "value": None}

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
    input_grad: str | None = None,
) -> tuple[Tensor, Tensor]:
    """``(log p(labels), entropy)`` of ``softmax(hidden_states @ vocab_weights.T / temperature)``, fp32, shaped
    like ``labels``; with ``group`` ``vocab_weights`` is this rank's equal share of the vocabulary rows (rank
    ``r`` holds rows ``[r * V_local, (r + 1) * V_local)``, Megatron's layout) and ``hidden_states`` every
    rank's same tokens; ``input_grad`` the vocabulary-parallel ops' convention (default: ``"partial"`` when the
    hidden states came straight out of a Megatron op whose backward sums the group's gradients, else
    ``"reduced"``)."""
    labels = labels.long()
    wanted = bool(_SUM_PI_SQUARED["wanted"])
    extras = ("log_sum_sq_probs",) if wanted else ()
    if group is None:
        out = linear_logprobs(
            hidden_states, vocab_weights, labels, temperature=temperature, return_entropy=True, extras=extras
        )
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
            input_grad=input_grad or ("partial" if _summed_by_caller(hidden_states) else "reduced"),
            extras=extras,
        )
    if isinstance(out, dict):  # Σπ² = exp(log Σπ²), no gradient (verl computes it for the advantage estimator)
        _SUM_PI_SQUARED["value"] = out["log_sum_sq_probs"].detach().exp()
        return out["log_probs"], out["entropy"]
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
    tokens = hidden.numel() // max(hidden.shape[-1], 1) if hidden.dim() else -1
    if labels.numel() != tokens:
        # verl's kernel flattens both (Megatron's [S, 1, D] hidden states come with [1, S] labels)
        raise ValueError(
            f"linear_cross_entropy: labels {tuple(labels.shape)} must hold one id per row of hidden "
            f"{tuple(hidden.shape)} ({tokens})"
        )
    if isinstance(temperature, Tensor):
        try:
            temperature = temperature.expand(labels.shape)
        except RuntimeError:
            raise ValueError(
                f"temperature shape {tuple(temperature.shape)} must broadcast to labels' {tuple(labels.shape)}"
            ) from None
    input_grad = "partial" if _summed_by_caller(hidden) else "reduced"  # read before the reshape's own node
    log_probs, entropy = log_probs_and_entropy(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        labels.reshape(-1),
        temperature.reshape(-1) if isinstance(temperature, Tensor) else temperature,
        dist_process_group,
        input_grad,
    )
    if reduction == "sum":
        log_probs = log_probs.sum()
    elif reduction == "mean":
        log_probs = log_probs.mean()
    return log_probs, entropy


def _flag(micro_batch, key: str, default):
    from verl.utils import tensordict_utils as tu

    return tu.get_non_tensor_data(data=micro_batch, key=key, default=default)


@contextlib.contextmanager
def _flag_set(micro_batch, key: str, value):
    """``micro_batch``'s non-tensor flag ``key`` set to ``value`` for the block, then put back."""
    from verl.utils import tensordict_utils as tu

    before = _flag(micro_batch, key, None)
    tu.assign_non_tensor_data(micro_batch, key, value)
    try:
        yield
    finally:
        tu.assign_non_tensor_data(micro_batch, key, before)


def _wrap_prepare_model_inputs(original):
    """The FSDP engine's ``prepare_model_inputs`` with a per-sample temperature reaching a fused head: verl's
    own unfused preparation (which expands it to every packed token, pads and slices it as it does the labels),
    then the fused path's extra arguments with that per-token temperature; and the request for Σπ²."""

    @functools.wraps(original)
    def prepare_model_inputs(self, micro_batch):
        fused = bool(_flag(micro_batch, "use_fused_kernels", False))
        wants_sq = fused and bool(_flag(micro_batch, "calculate_sum_pi_squared", False))
        per_sample = fused and isinstance(micro_batch["temperature"], Tensor)
        if (per_sample or wants_sq) and not _flag(micro_batch, "use_remove_padding", True):
            raise NotImplementedError(
                "memops.integrations.verl: a per-sample temperature or calculate_sum_pi_squared with "
                "use_fused_kernels=True needs use_remove_padding=True (verl's default)"
            )
        _SUM_PI_SQUARED.update(wanted=False, value=None)
        if not per_sample:
            model_inputs, output_args = original(self, micro_batch)
        else:
            with _flag_set(micro_batch, "use_fused_kernels", False):
                model_inputs, output_args = original(self, micro_batch)
            model_inputs["temperature"] = output_args["temperature_rmpad"].unsqueeze(0)
            model_inputs["return_dict"] = True
            model_inputs["shift_labels"] = output_args["input_ids_rmpad_rolled"].unsqueeze(0)
        _SUM_PI_SQUARED["wanted"] = wants_sq
        return model_inputs, output_args

    return prepare_model_inputs


def _wrap_prepare_model_outputs(original):
    """The FSDP engine's ``prepare_model_outputs`` with Σπ² taken from the fused head's pass (verl's own refuses
    ``calculate_sum_pi_squared`` with fused kernels), unpadded and nested as verl's unfused path does."""

    @functools.wraps(original)
    def prepare_model_outputs(self, output, output_args, micro_batch, logits_processor_func):
        wanted = bool(_SUM_PI_SQUARED["wanted"])
        _SUM_PI_SQUARED["wanted"] = False
        if not wanted:
            return original(self, output, output_args, micro_batch, logits_processor_func)
        with _flag_set(micro_batch, "calculate_sum_pi_squared", False):
            model_output = original(self, output, output_args, micro_batch, logits_processor_func)
        value, _SUM_PI_SQUARED["value"] = _SUM_PI_SQUARED["value"], None
        if not isinstance(value, Tensor):
            raise RuntimeError(
                "memops.integrations.verl: calculate_sum_pi_squared was asked, but the model's forward did not "
                "call verl's fused head (FusedLinearForPPO / linear_cross_entropy), so there is no Σπ² to return"
            )
        rows = self._gather_and_unpad_packed(value.reshape(-1), output_args["pad_size"])
        model_output["sum_pi_squared"] = torch.nested.nested_tensor_from_jagged(
            rows, micro_batch["input_ids"].offsets()
        )
        return model_output

    return prepare_model_outputs


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
    try:
        engine = getattr(importlib.import_module(_ENGINE[0]), _ENGINE[1])
    except ImportError:
        engine = None
    if engine is not None and not _ENGINE_ORIGINALS:
        for name, wrap in (
            ("prepare_model_inputs", _wrap_prepare_model_inputs),
            ("prepare_model_outputs", _wrap_prepare_model_outputs),
        ):
            _ENGINE_ORIGINALS[name] = engine.__dict__[name]
            setattr(engine, name, wrap(engine.__dict__[name]))
            done.append(f"{_ENGINE[0]}.{_ENGINE[1]}.{name}")
    return done


def uninstall() -> None:
    """Give verl its own fused head back."""
    for (module_name, attr), original in list(_ORIGINALS.items()):
        setattr(importlib.import_module(module_name), attr, original)
        del _ORIGINALS[module_name, attr]
    if _ENGINE_ORIGINALS:
        engine = getattr(importlib.import_module(_ENGINE[0]), _ENGINE[1])
        for name, original in list(_ENGINE_ORIGINALS.items()):
            setattr(engine, name, original)
            del _ENGINE_ORIGINALS[name]


INSTALLED = install()
