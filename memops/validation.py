"""Argument checks shared by every op's real and fake kernels.

Shape, dtype, device and option checks run wherever an op runs (eager, fake
tensors under torch.compile / torch.export); value checks on tensor data
(``check_target_range``) run in the real kernels only.
"""

from __future__ import annotations

import torch

REDUCTIONS = ("mean", "sum", "none")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INDEX = (torch.int32, torch.int64)


def _fail(msg: str) -> None:
    raise ValueError(msg)


def check_projection(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """``input [..., D]``, ``weight [V, D]``, ``bias [V]``: same float dtype and device."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a Tensor, got {type(input).__name__}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a Tensor, got {type(weight).__name__}")
    if input.dtype not in _FLOATS:
        _fail(f"input must be a float16/bfloat16/float32/float64 tensor, got {input.dtype}")
    if input.dim() < 1:
        _fail("input must have shape [..., D], got a 0-dim tensor")
    if weight.dim() != 2:
        _fail(f"weight must be 2-D [V, D], got shape {tuple(weight.shape)}")
    if weight.dtype != input.dtype:
        _fail(f"weight dtype {weight.dtype} must match input dtype {input.dtype}")
    if weight.shape[0] < 1:
        _fail("weight must have at least one row (V >= 1)")
    if weight.shape[1] != input.shape[-1]:
        _fail(
            f"input's last dim (D={input.shape[-1]}) must equal weight.shape[1] ({weight.shape[1]}): "
            f"input {tuple(input.shape)}, weight {tuple(weight.shape)}"
        )
    if weight.device != input.device:
        _fail(f"weight is on {weight.device} but input is on {input.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a Tensor or None, got {type(bias).__name__}")
        if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            _fail(f"bias must have shape [V]=[{weight.shape[0]}], got {tuple(bias.shape)}")
        if bias.dtype != input.dtype:
            _fail(f"bias dtype {bias.dtype} must match input dtype {input.dtype}")
        if bias.device != input.device:
            _fail(f"bias is on {bias.device} but input is on {input.device}")


def check_target(input: torch.Tensor, target: torch.Tensor, name: str = "target") -> None:
    """Class indices (int32/int64) shaped like ``input.shape[:-1]`` on input's device."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(target).__name__}")
    if target.dtype not in _INDEX:
        _fail(f"{name} must hold int64 or int32 class indices, got {target.dtype}")
    if target.shape != input.shape[:-1]:
        _fail(
            f"{name} shape {tuple(target.shape)} must equal input's leading shape "
            f"{tuple(input.shape[:-1])} (input {tuple(input.shape)})"
        )
    if target.device != input.device:
        _fail(f"{name} is on {target.device} but input is on {input.device}")


def check_target_range(target: torch.Tensor, vocab: int, ignore_index: int | None, name: str = "target") -> None:
    """Every entry is in ``[0, vocab)`` or equals ``ignore_index`` when there is one (reads tensor data)."""
    if target.numel() == 0:
        return
    bad = (target < 0) | (target >= vocab)
    if ignore_index is not None:
        bad &= target != ignore_index
    if bool(bad.any()):
        value = int(target[bad].flatten()[0])
        also = "" if ignore_index is None else f" and is not ignore_index ({ignore_index})"
        _fail(f"{name} value {value} is out of range [0, {vocab}){also}")


def check_finite(name: str, value: float) -> None:
    # ``x - x == 0`` is False exactly for nan and +-inf; unlike math.isfinite it traces under torch.compile
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (value - value) == 0:
        _fail(f"{name} must be a finite number, got {value!r}")


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        _fail(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_chunk_size(chunk_size: int) -> None:
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 0:
        _fail(f"chunk_size must be a positive int, or None/0 for automatic, got {chunk_size!r}")


def check_num_items(num_items: torch.Tensor | None, reduction: str) -> None:
    if num_items is None:
        return
    if reduction != "mean":
        _fail(f"num_items only applies to reduction='mean', got reduction={reduction!r}")
    if num_items.dim() != 0:
        _fail(f"num_items must be an int or a 0-dim tensor, got shape {tuple(num_items.shape)}")
    if num_items.dtype == torch.bool or num_items.is_complex():
        _fail(f"num_items must be a real number, got dtype {num_items.dtype}")


def check_ce_options(
    reduction: str, label_smoothing: float, z_loss: float, softcap: float | None, logit_scale: float, chunk_size: int
) -> None:
    check_reduction(reduction)
    check_finite("label_smoothing", label_smoothing)
    if not 0.0 <= label_smoothing <= 1.0:
        _fail(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    check_finite("z_loss", z_loss)
    check_softcap(softcap)
    check_finite("logit_scale", logit_scale)
    check_chunk_size(chunk_size)


def check_linear_ce(
    input, weight, target, bias, num_items, reduction, label_smoothing, z_loss, softcap, logit_scale, chunk_size
) -> None:
    """Everything ``memops::linear_ce`` and its backward check without reading tensor data."""
    check_projection(input, weight, bias)
    check_target(input, target)
    check_ce_options(reduction, label_smoothing, z_loss, softcap, logit_scale, chunk_size)
    check_num_items(num_items, reduction)


def check_softcap(softcap: float | None) -> None:
    if softcap is None:
        return
    check_finite("softcap", softcap)
    if softcap <= 0:
        _fail(f"softcap must be > 0 (or None), got {softcap}")


def as_num_items(num_items) -> torch.Tensor | None:
    """Front-end conversion: ``int``/``float``/0-dim tensor -> 0-dim tensor (or None)."""
    if num_items is None or isinstance(num_items, torch.Tensor):
        return num_items
    if isinstance(num_items, bool) or not isinstance(num_items, (int, float)):
        raise TypeError(f"num_items must be an int, a float or a 0-dim tensor, got {type(num_items).__name__}")
    return torch.tensor(float(num_items), dtype=torch.float64)


def as_chunk_size(chunk_size) -> int:
    if chunk_size is None:
        return 0
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        _fail(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return chunk_size


_OPTION_TYPES = (bool, int, float, str, type(None))


def check_extras(target: torch.Tensor, extras) -> None:
    """Per-token tensors: leading shape equal to ``target``'s, on its device."""
    for i, e in enumerate(extras):
        if not isinstance(e, torch.Tensor):
            raise TypeError(f"extras[{i}] must be a Tensor, got {type(e).__name__}")
        if e.shape[: target.dim()] != target.shape:
            _fail(f"extras[{i}] shape {tuple(e.shape)} must start with target's shape {tuple(target.shape)}")
        if e.device != target.device:
            _fail(f"extras[{i}] is on {e.device} but target is on {target.device}")


def check_options(name: str, options: dict) -> None:
    """Transform options: Python scalars and strings only; floats finite."""
    for key, value in options.items():
        if not isinstance(value, _OPTION_TYPES):
            raise TypeError(
                f"option {key}={value!r} of transform {name!r} must be a bool, int, float, str "
                f"or None, got {type(value).__name__}"
            )
        if isinstance(value, float):
            check_finite(f"option {key} of transform {name!r}", value)


def check_linear_transform(
    input, weight, target, bias, extras, num_items, reduction, softcap, logit_scale, chunk_size
) -> None:
    """Everything ``memops::linear_transform`` and its backward check without reading tensor data."""
    check_projection(input, weight, bias)
    check_target(input, target)
    check_extras(target, extras)
    check_reduction(reduction)
    check_softcap(softcap)
    check_finite("logit_scale", logit_scale)
    check_chunk_size(chunk_size)
    check_num_items(num_items, reduction)


GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def check_temperature(temperature: float) -> None:
    check_finite("temperature", temperature)
    if temperature <= 0:
        _fail(f"temperature must be > 0, got {temperature}")


def check_linear_logprobs(input, weight, target, bias, temperature, chunk_size) -> None:
    """Everything ``memops::linear_logprobs`` and its backward check without reading tensor data."""
    check_projection(input, weight, bias)
    check_target(input, target)
    check_temperature(temperature)
    check_chunk_size(chunk_size)


def _check_like(name: str, t: torch.Tensor, ref: torch.Tensor, ref_name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.shape != ref.shape:
        _fail(f"{name} shape {tuple(t.shape)} must equal {ref_name} shape {tuple(ref.shape)}")
    if t.device != ref.device:
        _fail(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def check_per_token_float(name: str, t: torch.Tensor, target: torch.Tensor) -> None:
    _check_like(name, t, target, "completion_ids")
    if t.dtype not in _FLOATS:
        _fail(f"{name} must be a float tensor, got {t.dtype}")


def check_linear_grpo(
    input,
    weight,
    target,
    bias,
    token_weight,
    advantages,
    old_logprobs,
    ref_logprobs,
    beta,
    epsilon_low,
    epsilon_high,
    temperature,
    chunk_size,
) -> None:
    """Everything ``memops::linear_grpo`` and its backward check without reading tensor data
    (``token_weight`` and ``advantages`` are per token here, shaped like ``target``)."""
    check_projection(input, weight, bias)
    check_target(input, target, "completion_ids")
    check_per_token_float("token_weight", token_weight, target)
    check_per_token_float("advantages", advantages, target)
    for name, t in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
        if t is not None:
            check_per_token_float(name, t, target)
    for name, v in (("beta", beta), ("epsilon_low", epsilon_low), ("epsilon_high", epsilon_high)):
        check_finite(name, v)
    if beta != 0 and ref_logprobs is None:
        _fail("beta != 0 needs ref_logprobs (the reference model's per-token log-probabilities)")
    if not 0 <= epsilon_low < 1 or epsilon_high < 0:
        _fail(f"need 0 <= epsilon_low < 1 and epsilon_high >= 0, got {epsilon_low}, {epsilon_high}")
    check_temperature(temperature)
    check_chunk_size(chunk_size)


def check_grpo_front(input, completion_ids, completion_mask, advantages, loss_type, max_completion_length) -> None:
    """The shapes ``memops.linear_grpo_loss`` takes: ``input [B, T, D]``, ids/mask ``[B, T]``, advantages ``[B]``."""
    if not isinstance(input, torch.Tensor) or input.dim() != 3:
        _fail(
            f"input must be the completion hidden states [B, T, D], got shape "
            f"{tuple(input.shape) if isinstance(input, torch.Tensor) else type(input).__name__}"
        )
    check_target(input, completion_ids, "completion_ids")
    _check_like("completion_mask", completion_mask, completion_ids, "completion_ids")
    if not isinstance(advantages, torch.Tensor) or advantages.shape != completion_ids.shape[:1]:
        got = tuple(advantages.shape) if isinstance(advantages, torch.Tensor) else type(advantages).__name__
        _fail(f"advantages must have shape [B]=[{completion_ids.shape[0]}] (one per completion), got {got}")
    if advantages.device != input.device:
        _fail(f"advantages is on {advantages.device} but input is on {input.device}")
    if loss_type not in GRPO_LOSS_TYPES:
        _fail(f"loss_type must be one of {GRPO_LOSS_TYPES}, got {loss_type!r}")
    if max_completion_length is not None and (
        not isinstance(max_completion_length, int)
        or isinstance(max_completion_length, bool)
        or max_completion_length < 1
    ):
        _fail(f"max_completion_length must be a positive int or None, got {max_completion_length!r}")


def check_vocab_parallel_ce(
    input,
    weight,
    target,
    bias,
    num_items,
    vocab_start,
    vocab_size,
    reduction,
    label_smoothing,
    z_loss,
    softcap,
    logit_scale,
    chunk_size,
) -> None:
    """``memops::vocab_parallel_ce``: the CE checks, with ``weight`` holding rows
    ``[vocab_start, vocab_start + V_local)`` of a ``vocab_size``-row weight."""
    check_linear_ce(
        input, weight, target, bias, num_items, reduction, label_smoothing, z_loss, softcap, logit_scale, chunk_size
    )
    for name, v in (("vocab_start", vocab_start), ("vocab_size", vocab_size)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if not (0 <= vocab_start and vocab_start + weight.shape[0] <= vocab_size):
        _fail(
            f"this rank's weight shard rows [{vocab_start}, {vocab_start + weight.shape[0]}) must lie in "
            f"[0, vocab_size={vocab_size})"
        )
