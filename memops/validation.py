"""Argument checks shared by every op's real and fake kernels: the projection, targets, ``num_items``, option
values.  Each family's own cross-argument check (its ``Spec.check``) sits beside its declaration in
``memops/meta/<family>.py`` and is built from these.

Shape, dtype, device and option checks run wherever an op runs (eager, fake
tensors under torch.compile / torch.export); value checks on tensor data
(``check_target_range``) run in the real kernels only.
"""

from __future__ import annotations

from typing import NoReturn

import torch

from . import config

REDUCTIONS = ("mean", "sum", "none")
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX = (torch.int32, torch.int64)


def fail(msg: str) -> NoReturn:
    raise ValueError(msg)


def is_dtensor(t) -> bool:
    """Whether ``t`` is a DTensor (``torch.distributed.tensor`` imported only for a tensor subclass)."""
    if type(t) is torch.Tensor or t is None or not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def check_projection(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, prefix: str = "") -> None:
    """``input [..., D]``, ``weight [V, D]``, ``bias [V]``: same float dtype and device (``prefix`` names
    another projection's arguments: ``teacher_input``, ...)."""
    i, w, b = (prefix + "input", prefix + "weight", prefix + "bias") if prefix else ("input", "weight", "bias")
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{i} must be a Tensor, got {type(input).__name__}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{w} must be a Tensor, got {type(weight).__name__}")
    plain = type(input) is type(weight) is torch.Tensor and (bias is None or type(bias) is torch.Tensor)
    for name, t in () if plain else ((i, input), (w, weight), (b, bias)):
        if is_dtensor(t):
            fail(
                f"{name} is a DTensor (placements {tuple(getattr(t, 'placements', ()))}): this op takes local "
                "tensors.  A head "
                "sharded over the vocabulary goes through memops.distributed.vocab_parallel_cross_entropy / "
                "vocab_parallel_logprobs / vocab_parallel_grpo_loss / vocab_parallel_distillation_loss; a "
                "transform (memops.linear_loss) needs whole logit rows and is not offered vocabulary-parallel: "
                f"give it {name}.full_tensor() (the whole head on every rank)"
            )
    if input.dtype not in FLOATS:
        fail(f"{i} must be a float16/bfloat16/float32/float64 tensor, got {input.dtype}")
    if input.dim() < 1:
        fail(f"{i} must have shape [..., D], got a 0-dim tensor")
    if weight.dim() != 2 and weight.numel() == 0:
        fail(
            f"{w} has no elements (shape {tuple(weight.shape)}): it is a partitioned parameter (DeepSpeed ZeRO-3 "
            "leaves lm_head.weight empty outside its module's forward) that was not gathered for this call; gather "
            "it around the call (deepspeed.zero.GatheredParameters(model.lm_head.weight)) or compute the loss "
            "inside the head module's forward (memops.integrations.transformers.apply, "
            "memops.distributed.LinearCrossEntropyHead)"
        )
    if weight.dim() != 2:
        fail(f"{w} must be 2-D [V, D], got shape {tuple(weight.shape)}")
    if weight.dtype != input.dtype:
        fail(f"{w} dtype {weight.dtype} must match {i} dtype {input.dtype}")
    if weight.shape[0] < 1:
        fail(f"{w} must have at least one row (V >= 1)")
    if weight.shape[1] != input.shape[-1]:
        fail(
            f"{i}'s last dim (D={input.shape[-1]}) must equal {w}.shape[1] ({weight.shape[1]}): "
            f"{i} {tuple(input.shape)}, {w} {tuple(weight.shape)}"
        )
    if weight.device != input.device:
        fail(f"{w} is on {weight.device} but {i} is on {input.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"{b} must be a Tensor or None, got {type(bias).__name__}")
        if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            fail(f"{b} must have shape [V]=[{weight.shape[0]}], got {tuple(bias.shape)}")
        if bias.dtype != input.dtype:
            fail(f"{b} dtype {bias.dtype} must match {i} dtype {input.dtype}")
        if bias.device != input.device:
            fail(f"{b} is on {bias.device} but {i} is on {input.device}")


def check_target(input: torch.Tensor, target: torch.Tensor, name: str = "target") -> None:
    """Class indices (int32/int64) shaped like ``input.shape[:-1]`` on input's device."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(target).__name__}")
    if target.dtype not in INDEX:
        fail(f"{name} must hold int64 or int32 class indices, got {target.dtype}")
    if target.shape != input.shape[:-1]:
        fail(
            f"{name} shape {tuple(target.shape)} must equal input's leading shape "
            f"{tuple(input.shape[:-1])} (input {tuple(input.shape)})"
        )
    if target.device != input.device:
        fail(f"{name} is on {target.device} but input is on {input.device}")


def check_target_range(
    target: torch.Tensor, vocab: int, ignore_index: int | None, name: str = "target", ignored_as: str = "ignore_index"
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Every entry is in ``[0, vocab)`` or equals ``ignore_index`` when there is one (reads tensor data).
    Returns ``(valid, index)``: ``target != ignore_index`` (None without an ignore index) and the target
    with 0 at ignored entries, a row index into the weight that every entry may use.

    The check reads the index's minimum and maximum in one device-to-host copy.  Sync-free
    (``memops.set_sync_free``, CUDA-graph capture) it is a device-side assert: on CPU it raises at once, on
    CUDA at the next call that synchronizes (the CUDA context is then unusable, as after
    ``F.cross_entropy``'s own device assert), with the same message less the offending value."""
    valid = None if ignore_index is None else target != ignore_index
    index = target if valid is None else target * valid  # an integer product: 0 where ignored
    if target.numel() == 0:
        return valid, index
    lo, hi = torch.aminmax(index)
    also = "" if ignore_index is None else f" and is not {ignored_as} ({ignore_index})"
    if config.is_sync_free(target):
        torch._assert_async((lo >= 0) & (hi < vocab), f"memops: a {name} value is out of range [0, {vocab}){also}")
        return valid, index
    lo, hi = torch.stack((lo, hi)).tolist()
    if lo < 0 or hi >= vocab:
        bad = (target < 0) | (target >= vocab)
        if valid is not None:
            bad &= valid
        value = int(target[bad].flatten()[0])
        fail(f"{name} value {value} is out of range [0, {vocab}){also}")
    return valid, index


def check_finite(name: str, value: float) -> None:
    # ``x - x == 0`` is False exactly for nan and +-inf; unlike math.isfinite it traces under torch.compile
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (value - value) == 0:
        fail(f"{name} must be a finite number, got {value!r}")


def check_num_items(num_items: torch.Tensor | None, reduction: str) -> None:
    if num_items is None:
        return
    if reduction != "mean":
        fail(f"num_items only applies to reduction='mean', got reduction={reduction!r}")
    if num_items.dim() != 0:
        fail(f"num_items must be an int or a 0-dim tensor, got shape {tuple(num_items.shape)}")
    if num_items.dtype == torch.bool or num_items.is_complex():
        fail(f"num_items must be a real number, got dtype {num_items.dtype}")


# ---- options: ``check(name, value)`` after the schema-type check ------------------------------------------


def check_option(name: str, kind: str, value) -> None:
    """``value`` fits the schema type ``kind`` (``int``, ``int[]``, ``float``, ``float?``, ``bool``, ``str``)."""
    if kind == "float?" and value is None:
        return
    if kind == "int[]":
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{name} must be a sequence of ints, got {type(value).__name__}")
        for v in value:
            check_option(name, "int", v)
        return
    if kind in ("float", "float?"):
        check_finite(name, value)
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    elif kind == "bool":
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    elif kind == "str":
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a string, got {type(value).__name__}")
    else:
        raise AssertionError(f"unknown option type {kind!r}")


def as_schema_type(kind: str, value):
    """A checked option as the Python type its schema takes (``float`` for an int given as a float)."""
    if value is None:
        return None
    if kind == "int[]":
        return tuple(int(v) for v in value)
    return {"int": int, "float": float, "float?": float, "bool": bool, "str": str}[kind](value)


def reduction(name: str, value: str) -> None:
    if value not in REDUCTIONS:
        fail(f"{name} must be one of {REDUCTIONS}, got {value!r}")


def unit_interval(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        fail(f"{name} must be in [0, 1], got {value}")


def positive(name: str, value: float | None) -> None:
    if value is not None and value <= 0:
        fail(f"{name} must be > 0{' (or None)' if name == 'softcap' else ''}, got {value}")


def chunk_rows(name: str, value: int) -> None:
    if value < 0:
        fail(f"{name} must be a positive int, or None/0 for automatic, got {value!r}")


def non_negative(name: str, value: float) -> None:
    if value < 0:
        fail(f"{name} must be >= 0, got {value}")


def epsilon_low(name: str, value: float) -> None:
    if not 0 <= value < 1:
        fail(f"need 0 <= {name} < 1, got {value}")


def one_of(*choices):
    def check(name: str, value) -> None:
        if value not in choices:
            fail(f"{name} must be one of {choices}, got {value!r}")

    return check


# ---- front-end conversions ----------------------------------------------------------------------------


def as_num_items(num_items) -> torch.Tensor | None:
    """Front-end conversion: ``int``/``float``/0-dim tensor -> 0-dim tensor (or None)."""
    if num_items is None or isinstance(num_items, torch.Tensor):
        return num_items
    if isinstance(num_items, bool) or not isinstance(num_items, (int, float)):
        raise TypeError(f"num_items must be an int, a float or a 0-dim tensor, got {type(num_items).__name__}")
    return torch.tensor(float(num_items), dtype=torch.float64)


def as_shift(shift, target) -> int:
    """``shift`` (``True``/``False`` or an int >= 0) as a position offset; class-index targets ``[..., T]``."""
    if isinstance(shift, bool):
        k = int(shift)
    elif isinstance(shift, int) and shift >= 0:
        k = shift
    else:
        raise ValueError(f"shift must be a bool or an int >= 0, got {shift!r}")
    if k and isinstance(target, torch.Tensor) and (target.is_floating_point() or target.dim() < 1):
        fail("shift needs class-index targets with a position dimension ([..., T])")
    return k


def as_chunk_size(chunk_size) -> int:
    if chunk_size is None:
        return 0
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        fail(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return chunk_size


# ---- the families' cross-argument checks (``Spec.check``; ``a`` holds the op's arguments by name) ----------


def check_class_weight(class_weight: torch.Tensor | None, weight: torch.Tensor) -> None:
    """``class_weight [V]`` (one per row of ``weight``): a float tensor on weight's device."""
    if class_weight is None:
        return
    if not isinstance(class_weight, torch.Tensor):
        raise TypeError(f"class_weight must be a Tensor or None, got {type(class_weight).__name__}")
    if class_weight.dtype not in FLOATS:
        fail(f"class_weight must be a float tensor, got {class_weight.dtype}")
    if class_weight.shape != (weight.shape[0],):
        fail(
            f"class_weight must have shape [V]=[{weight.shape[0]}] (one weight per class of this weight's rows), "
            f"got {tuple(class_weight.shape)}"
        )
    if class_weight.device != weight.device:
        fail(f"class_weight is on {class_weight.device} but weight is on {weight.device}")


def check_probability_target(input: torch.Tensor, target: torch.Tensor, vocab: int) -> None:
    """Class probabilities ``[..., V]``, a float tensor on input's device."""
    if target.shape != (*input.shape[:-1], vocab):
        fail(
            f"probability target (a float target) must have shape input.shape[:-1] + (V,) = "
            f"{(*input.shape[:-1], vocab)}, got {tuple(target.shape)}"
        )
    if target.device != input.device:
        fail(f"target is on {target.device} but input is on {input.device}")


def check_like(name: str, t: torch.Tensor, ref: torch.Tensor, ref_name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.shape != ref.shape:
        fail(f"{name} shape {tuple(t.shape)} must equal {ref_name} shape {tuple(ref.shape)}")
    if t.device != ref.device:
        fail(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
