"""Argument checks shared by every op's real and fake kernels.

Shape, dtype, device and option checks run wherever an op runs (eager, fake
tensors under torch.compile / torch.export); value checks on tensor data
(``check_target_range``) run in the real kernels only.
"""

from __future__ import annotations

import torch

from . import config
from .registry import get_transform

REDUCTIONS = ("mean", "sum", "none")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INDEX = (torch.int32, torch.int64)


def _fail(msg: str) -> None:
    raise ValueError(msg)


def _is_dtensor(t) -> bool:
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
        if _is_dtensor(t):
            _fail(
                f"{name} is a DTensor (placements {tuple(t.placements)}): this op takes local tensors.  A head "
                "sharded over the vocabulary goes through memops.distributed.vocab_parallel_cross_entropy / "
                "vocab_parallel_logprobs / vocab_parallel_grpo_loss / vocab_parallel_distillation_loss; a "
                "transform (memops.linear_loss) needs whole logit rows and is not offered vocabulary-parallel: "
                f"give it {name}.full_tensor() (the whole head on every rank)"
            )
    if input.dtype not in _FLOATS:
        _fail(f"{i} must be a float16/bfloat16/float32/float64 tensor, got {input.dtype}")
    if input.dim() < 1:
        _fail(f"{i} must have shape [..., D], got a 0-dim tensor")
    if weight.dim() != 2 and weight.numel() == 0:
        _fail(
            f"{w} has no elements (shape {tuple(weight.shape)}): it is a partitioned parameter (DeepSpeed ZeRO-3 "
            "leaves lm_head.weight empty outside its module's forward) that was not gathered for this call; gather "
            "it around the call (deepspeed.zero.GatheredParameters(model.lm_head.weight)) or compute the loss "
            "inside the head module's forward (memops.integrations.transformers.apply, "
            "memops.distributed.LinearCrossEntropyHead)"
        )
    if weight.dim() != 2:
        _fail(f"{w} must be 2-D [V, D], got shape {tuple(weight.shape)}")
    if weight.dtype != input.dtype:
        _fail(f"{w} dtype {weight.dtype} must match {i} dtype {input.dtype}")
    if weight.shape[0] < 1:
        _fail(f"{w} must have at least one row (V >= 1)")
    if weight.shape[1] != input.shape[-1]:
        _fail(
            f"{i}'s last dim (D={input.shape[-1]}) must equal {w}.shape[1] ({weight.shape[1]}): "
            f"{i} {tuple(input.shape)}, {w} {tuple(weight.shape)}"
        )
    if weight.device != input.device:
        _fail(f"{w} is on {weight.device} but {i} is on {input.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"{b} must be a Tensor or None, got {type(bias).__name__}")
        if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            _fail(f"{b} must have shape [V]=[{weight.shape[0]}], got {tuple(bias.shape)}")
        if bias.dtype != input.dtype:
            _fail(f"{b} dtype {bias.dtype} must match {i} dtype {input.dtype}")
        if bias.device != input.device:
            _fail(f"{b} is on {bias.device} but {i} is on {input.device}")


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


def check_target_range(
    target: torch.Tensor, vocab: int, ignore_index: int | None, name: str = "target"
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
    also = "" if ignore_index is None else f" and is not ignore_index ({ignore_index})"
    if config.is_sync_free(target):
        torch._assert_async((lo >= 0) & (hi < vocab), f"memops: a {name} value is out of range [0, {vocab}){also}")
        return valid, index
    lo, hi = torch.stack((lo, hi)).tolist()
    if lo < 0 or hi >= vocab:
        bad = (target < 0) | (target >= vocab)
        if valid is not None:
            bad &= valid
        value = int(target[bad].flatten()[0])
        _fail(f"{name} value {value} is out of range [0, {vocab}){also}")
    return valid, index


def check_finite(name: str, value: float) -> None:
    # ``x - x == 0`` is False exactly for nan and +-inf; unlike math.isfinite it traces under torch.compile
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (value - value) == 0:
        _fail(f"{name} must be a finite number, got {value!r}")


def check_num_items(num_items: torch.Tensor | None, reduction: str) -> None:
    if num_items is None:
        return
    if reduction != "mean":
        _fail(f"num_items only applies to reduction='mean', got reduction={reduction!r}")
    if num_items.dim() != 0:
        _fail(f"num_items must be an int or a 0-dim tensor, got shape {tuple(num_items.shape)}")
    if num_items.dtype == torch.bool or num_items.is_complex():
        _fail(f"num_items must be a real number, got dtype {num_items.dtype}")


# ---- options: ``check(name, value)`` after the schema-type check ------------------------------------------


def check_option(name: str, kind: str, value) -> None:
    """``value`` fits the schema type ``kind`` (``int``, ``float``, ``float?``, ``bool``, ``str``)."""
    if kind == "float?" and value is None:
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
    return {"int": int, "float": float, "float?": float, "bool": bool, "str": str}[kind](value)


def reduction(name: str, value: str) -> None:
    if value not in REDUCTIONS:
        _fail(f"{name} must be one of {REDUCTIONS}, got {value!r}")


def unit_interval(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        _fail(f"{name} must be in [0, 1], got {value}")


def positive(name: str, value: float | None) -> None:
    if value is not None and value <= 0:
        _fail(f"{name} must be > 0{' (or None)' if name == 'softcap' else ''}, got {value}")


def chunk_rows(name: str, value: int) -> None:
    if value < 0:
        _fail(f"{name} must be a positive int, or None/0 for automatic, got {value!r}")


def non_negative(name: str, value: float) -> None:
    if value < 0:
        _fail(f"{name} must be >= 0, got {value}")


def epsilon_low(name: str, value: float) -> None:
    if not 0 <= value < 1:
        _fail(f"need 0 <= {name} < 1, got {value}")


def one_of(*choices):
    def check(name: str, value) -> None:
        if value not in choices:
            _fail(f"{name} must be one of {choices}, got {value!r}")

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
        _fail("shift needs class-index targets with a position dimension ([..., T])")
    return k


def as_chunk_size(chunk_size) -> int:
    if chunk_size is None:
        return 0
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        _fail(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return chunk_size


# ---- the families' cross-argument checks (``Spec.check``; ``a`` holds the op's arguments by name) ----------


def check_class_weight(class_weight: torch.Tensor | None, weight: torch.Tensor) -> None:
    """``class_weight [V]`` (one per row of ``weight``): a float tensor on weight's device."""
    if class_weight is None:
        return
    if not isinstance(class_weight, torch.Tensor):
        raise TypeError(f"class_weight must be a Tensor or None, got {type(class_weight).__name__}")
    if class_weight.dtype not in _FLOATS:
        _fail(f"class_weight must be a float tensor, got {class_weight.dtype}")
    if class_weight.shape != (weight.shape[0],):
        _fail(
            f"class_weight must have shape [V]=[{weight.shape[0]}] (one weight per class of this weight's rows), "
            f"got {tuple(class_weight.shape)}"
        )
    if class_weight.device != weight.device:
        _fail(f"class_weight is on {class_weight.device} but weight is on {weight.device}")


def check_probability_target(input: torch.Tensor, target: torch.Tensor, vocab: int) -> None:
    """Class probabilities ``[..., V]``, a float tensor on input's device."""
    if target.shape != (*input.shape[:-1], vocab):
        _fail(
            f"probability target (a float target) must have shape input.shape[:-1] + (V,) = "
            f"{(*input.shape[:-1], vocab)}, got {tuple(target.shape)}"
        )
    if target.device != input.device:
        _fail(f"target is on {target.device} but input is on {input.device}")


def check_linear_ce(a) -> None:
    """``memops::linear_ce``: projection, target (class indices, or probabilities when float), class weights,
    ``num_items`` (options are checked one by one before)."""
    check_projection(a.input, a.weight, a.bias)
    if isinstance(a.target, torch.Tensor) and a.target.is_floating_point():
        check_probability_target(a.input, a.target, a.weight.shape[0])
        if getattr(a, "return_is_top1", False):
            _fail("return_is_top1 needs class-index targets, not probabilities")
    else:
        check_target(a.input, a.target)
    check_class_weight(a.class_weight, a.weight)
    check_num_items(a.num_items, a.reduction)


def check_vocab_shard(a) -> None:
    """This rank's weight rows ``[vocab_start, vocab_start + V_local)`` lie in ``[0, vocab_size)``."""
    if not (0 <= a.vocab_start and a.vocab_start + a.weight.shape[0] <= a.vocab_size):
        _fail(
            f"this rank's weight shard rows [{a.vocab_start}, {a.vocab_start + a.weight.shape[0]}) must lie in "
            f"[0, vocab_size={a.vocab_size})"
        )


def check_vocab_parallel_ce(a) -> None:
    """``memops::vocab_parallel_ce``: the CE checks, with ``weight`` (and ``class_weight``) holding rows
    ``[vocab_start, vocab_start + V_local)`` of a ``vocab_size``-row weight; class-index targets."""
    if isinstance(a.target, torch.Tensor) and a.target.is_floating_point():
        _fail("vocab_parallel_cross_entropy takes class-index targets (int64/int32), not probabilities")
    check_linear_ce(a)


def vocab_parallel_check(base):
    """A single-process family's checks for its vocabulary-parallel op: ``weight`` (and ``bias``) this rank's
    rows of a ``vocab_size``-row projection; an online distillation teacher sharded the same way or whole
    (replicated: every rank passes all ``vocab_size`` rows)."""

    def check(a) -> None:
        tw = getattr(a, "teacher_weight", None)
        local = a.weight.shape[0] if isinstance(a.weight, torch.Tensor) and a.weight.dim() == 2 else None
        if isinstance(tw, torch.Tensor) and tw.dim() == 2 and local is not None and tw.shape[0] == a.vocab_size:
            tb = a.teacher_bias
            a = a.replace(teacher_weight=tw[:local], teacher_bias=None if tb is None else tb[:local])
        base(a)
        check_vocab_shard(a)
        if a.sequence_parallel and getattr(a, "importance_sampling_level", "token") == "sequence":
            _fail(
                "importance_sampling_level='sequence' (GSPO) is not offered with sequence_parallel=True: a "
                "sequence's importance weight needs all of its log-probabilities in one chunk pass; use "
                "sequence_parallel=False (hidden states replicated over the group)"
            )

    return check


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


def check_transform_options(name: str, options: dict) -> None:
    """Transform options: Python scalars and strings only; floats finite."""
    for key, value in options.items():
        if not isinstance(value, _OPTION_TYPES):
            raise TypeError(
                f"option {key}={value!r} of transform {name!r} must be a bool, int, float, str "
                f"or None, got {type(value).__name__}"
            )
        if isinstance(value, float):
            check_finite(f"option {key} of transform {name!r}", value)


def check_linear_transform(a) -> None:
    """``memops::linear_transform``: projection, target, extras, ``num_items``, the transform's name, and
    one ``grad_mask`` entry per input, weight, bias and extra."""
    check_projection(a.input, a.weight, a.bias)
    check_target(a.input, a.target)
    check_extras(a.target, a.extras)
    check_num_items(a.num_items, a.reduction)
    get_transform(a.transform)
    mask = getattr(a, "grad_mask", None)
    if mask is None:
        mask = getattr(a, "need", None)
    if mask is not None and len(mask) != 3 + len(a.extras):
        _fail(f"grad_mask must have 3 + len(extras) = {3 + len(a.extras)} entries, got {len(mask)}")


# the per-token formulas of TRL 1.16's GRPOTrainer (its loss_type, vespo aside); the normalization is the
# token weights'
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo")


def check_linear_logprobs(a) -> None:
    """``memops::linear_logprobs``: projection and target."""
    check_projection(a.input, a.weight, a.bias)
    check_target(a.input, a.target)


def _check_like(name: str, t: torch.Tensor, ref: torch.Tensor, ref_name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.shape != ref.shape:
        _fail(f"{name} shape {tuple(t.shape)} must equal {ref_name} shape {tuple(ref.shape)}")
    if t.device != ref.device:
        _fail(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def check_per_token_float(
    name: str, t: torch.Tensor, target: torch.Tensor, target_name: str = "completion_ids"
) -> None:
    _check_like(name, t, target, target_name)
    if t.dtype not in _FLOATS:
        _fail(f"{name} must be a float tensor, got {t.dtype}")


def check_linear_grpo(a) -> None:
    """``memops::linear_grpo`` (``token_weight`` and ``advantages`` are per token here, shaped like the
    completion ids)."""
    check_projection(a.input, a.weight, a.bias)
    check_target(a.input, a.target, "completion_ids")
    check_per_token_float("token_weight", a.token_weight, a.target)
    check_per_token_float("advantages", a.advantages, a.target)
    for name in ("old_logprobs", "ref_logprobs", "entropy_weight"):
        if getattr(a, name) is not None:
            check_per_token_float(name, getattr(a, name), a.target)
    if a.importance_sampling_level == "sequence" and a.target.dim() != 2:
        _fail(f"importance_sampling_level='sequence' needs [B, T] completion_ids, got {tuple(a.target.shape)}")
    if a.beta != 0 and a.ref_logprobs is None:
        _fail("beta != 0 needs ref_logprobs (the reference model's per-token log-probabilities)")


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


DISTILL_REDUCTIONS = ("batchmean", "sum", "none")


def check_linear_distill(a) -> None:
    """``memops::linear_distill``: the student projection and target; exactly one teacher (online: its own
    projection of the same tokens over the same vocabulary; offline: top-k ids and log-probs per token)."""
    check_projection(a.input, a.weight, a.bias, "student_")
    check_target(a.input, a.target)
    online = [x is not None for x in (a.teacher_input, a.teacher_weight, a.teacher_bias)]
    offline = [x is not None for x in (a.teacher_topk_ids, a.teacher_topk_logprobs)]
    if any(online) and any(offline):
        _fail(
            "give one teacher: teacher_input/teacher_weight (online) or teacher_topk_ids/teacher_topk_logprobs "
            "(offline), not both"
        )
    if not any(online) and not all(offline):
        if any(offline):
            _fail("an offline teacher needs both teacher_topk_ids and teacher_topk_logprobs")
        _fail(
            "give a teacher: teacher_input and teacher_weight (online), or teacher_topk_ids and "
            "teacher_topk_logprobs (offline)"
        )
    if any(online):
        if a.teacher_input is None or a.teacher_weight is None:
            _fail("an online teacher needs both teacher_input and teacher_weight")
        check_projection(a.teacher_input, a.teacher_weight, a.teacher_bias, "teacher_")
        if a.teacher_weight.shape[0] != a.weight.shape[0]:
            _fail(
                f"teacher_weight has {a.teacher_weight.shape[0]} vocabulary rows but weight has "
                f"{a.weight.shape[0]}: student and teacher must share the vocabulary"
            )
        if a.teacher_input.shape[:-1] != a.target.shape:
            _fail(
                f"teacher_input's leading shape {tuple(a.teacher_input.shape[:-1])} must equal target's shape "
                f"{tuple(a.target.shape)}"
            )
        if a.teacher_input.device != a.input.device:
            _fail(f"teacher_input is on {a.teacher_input.device} but input is on {a.input.device}")
    else:
        ids, lp = a.teacher_topk_ids, a.teacher_topk_logprobs
        if ids.dtype not in _INDEX:
            _fail(f"teacher_topk_ids must hold int64 or int32 token ids, got {ids.dtype}")
        if ids.dim() != a.target.dim() + 1 or ids.shape[:-1] != a.target.shape or ids.shape[-1] < 1:
            _fail(
                f"teacher_topk_ids must have shape [..., k] with [...] = target's shape {tuple(a.target.shape)} "
                f"and k >= 1, got {tuple(ids.shape)}"
            )
        vocab = getattr(a, "vocab_size", None) or a.weight.shape[0]  # a vocabulary-parallel op: the whole one
        if ids.shape[-1] > vocab:
            _fail(f"teacher_topk_ids has k={ids.shape[-1]} ids per token, more than the vocabulary ({vocab})")
        _check_like("teacher_topk_logprobs", lp, ids, "teacher_topk_ids")
        if lp.dtype not in _FLOATS:
            _fail(f"teacher_topk_logprobs must be a float tensor, got {lp.dtype}")
        if ids.device != a.input.device:
            _fail(f"teacher_topk_ids is on {ids.device} but input is on {a.input.device}")
        if a.beta != 0:
            _fail(f"an offline (top-k) teacher supports the forward KL only (beta=0), got beta={a.beta}")
    if a.num_items is not None:
        if a.reduction != "batchmean":
            _fail(f"num_items only applies to reduction='batchmean', got reduction={a.reduction!r}")
        check_num_items(a.num_items, "mean")


def check_frozen_teacher(**tensors) -> None:
    """The teacher gets no gradient: a teacher tensor that requires one (with grad mode on) is an error."""
    if torch.is_grad_enabled():
        for name, t in tensors.items():
            if isinstance(t, torch.Tensor) and t.requires_grad:
                _fail(f"{name} requires grad, but the teacher is frozen here: pass {name}.detach()")
