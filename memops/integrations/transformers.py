"""Hugging Face ``transformers`` causal LMs that train without building logits.

``apply(model)`` patches one model instance, ``apply("llama")`` (a ``model_type``, a ``*ForCausalLM``
class, or an instance) patches the class; ``revert(...)`` undoes either.  A patched model called with
``labels`` (or ``shift_labels``) while training computes its loss with ``memops.linear_cross_entropy`` from
the last hidden states and ``lm_head`` (weight and bias), with the original's label shifting,
``ignore_index``, ``num_items_in_batch`` normalization, ``logits_to_keep`` slicing and final-logit
soft-capping, and returns ``logits=None``.  Without labels, or in eval mode (unless ``apply(...,
eval=True)``), the original forward runs unchanged.

The loss is computed inside ``lm_head``'s own forward call, so the head's forward hooks run around it:
a head wrapped by FSDP2 (``fully_shard``) has its full weight there.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any

import torch

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")
_PATCHED = "_memops_original_forward"


def _causal_lm_class(model_type: str):
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    cls = getattr(transformers, name, None) if name else None
    if cls is None:
        raise ValueError(f"memops.integrations.transformers: unknown causal LM model_type {model_type!r}")
    return cls


def _check_supported(cls) -> None:
    """Known families, or any forward that is ``self.model(...)`` then ``self.lm_head(...)`` with no other
    change to the logits than ``config.final_logit_softcapping``."""
    model_type = getattr(getattr(cls, "config_class", None), "model_type", None)
    if model_type in SUPPORTED:
        return
    try:
        src = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        src = ""
    generic = (
        "self.model(" in src
        and "self.lm_head(" in src
        and not any(k in src for k in ("logit_scale", "logits_scaling", "logits * ", "logits / self."))
    )
    if not generic:
        raise ValueError(
            f"memops.integrations.transformers: {cls.__name__} (model_type {model_type!r}) is not supported: "
            f"its forward does not compute logits as self.lm_head(self.model(...)) (supported: {SUPPORTED} and "
            "causal LMs of that shape)"
        )


class _Loss:
    """What one patched call needs inside ``lm_head``'s forward, and the loss it leaves there."""

    def __init__(self, labels, shift_labels, num_items, ignore_index, softcap, logits_to_keep):
        self.labels, self.shift_labels, self.num_items = labels, shift_labels, num_items
        self.ignore_index, self.softcap, self.logits_to_keep = ignore_index, softcap, logits_to_keep
        self.loss = None

    def targets(self) -> torch.Tensor:
        t = self.shift_labels
        if t is None:  # as transformers' ForCausalLMLoss: position i predicts label i + 1
            t = torch.nn.functional.pad(self.labels, (0, 1), value=self.ignore_index)[..., 1:]
        k = self.logits_to_keep
        if isinstance(k, int):
            return t if k == 0 else t[..., -k:]
        if k.dtype == torch.bool:
            return t[k]
        return t[..., k] if k.dim() == 1 else t.gather(-1, k)


def _head_forward(head, ctx: _Loss):
    def forward(hidden_states):
        from .. import linear_cross_entropy

        target = ctx.targets().to(hidden_states.device)
        ctx.loss = linear_cross_entropy(
            hidden_states,
            head.weight,
            target,
            getattr(head, "bias", None),
            ignore_index=ctx.ignore_index,
            num_items=ctx.num_items,
            softcap=ctx.softcap,
        )
        return hidden_states.new_zeros(hidden_states.shape[:-1] + (0,))  # stands in for the logits

    return forward


@contextlib.contextmanager
def _loss_in_head(head, ctx: _Loss):
    had = "forward" in head.__dict__
    old = head.__dict__.get("forward")
    head.forward = _head_forward(head, ctx)
    try:
        yield
    finally:
        if had:
            head.forward = old
        else:
            del head.forward


def _softcap(config) -> float | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    cap = getattr(text, "final_logit_softcapping", None)
    return float(cap) if cap else None


def _wrap(orig):
    sig = inspect.signature(orig)
    takes_return_dict = "return_dict" in sig.parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()
    )

    @functools.wraps(orig)
    def forward(self, *args, **kwargs):
        bound = sig.bind(self, *args, **kwargs)
        arguments = dict(bound.arguments)
        extra = dict(arguments.pop("kwargs", {}) or {})
        labels = arguments.get("labels")
        shift_labels = extra.get("shift_labels")
        if (labels is None and shift_labels is None) or not (self.training or getattr(self, "_memops_eval", False)):
            return orig(self, *args, **kwargs)
        arguments.pop("self")
        arguments["labels"] = None
        extra.pop("shift_labels", None)
        num_items = extra.pop("num_items_in_batch", None)
        ignore_index = extra.pop("ignore_index", -100)
        return_dict = arguments.pop("return_dict", extra.pop("return_dict", None))
        ctx = _Loss(
            labels,
            shift_labels,
            num_items,
            ignore_index,
            _softcap(self.config),
            arguments.get("logits_to_keep", 0) or 0,
        )
        head = self.get_output_embeddings()
        with _loss_in_head(head, ctx):
            if takes_return_dict:
                extra["return_dict"] = True
            out = orig(self, **arguments, **extra)
        if ctx.loss is None:
            raise RuntimeError(f"memops: {type(self).__name__}.forward did not call its lm_head")
        fields = {k: v for k, v in out.items() if k not in ("loss", "logits")}
        out = type(out)(loss=ctx.loss, **fields)  # logits left at None
        if return_dict is False or (return_dict is None and not getattr(self.config, "return_dict", True)):
            return out.to_tuple()
        return out

    forward._memops_patched = True
    return forward


def apply(target: Any, *, eval: bool = False):
    """Patch a model instance, or a causal LM class given as a class or a ``model_type`` string.

    ``eval=True`` also uses memops when an instance is in eval mode (its ``logits`` are then ``None``).
    Returns ``target``.
    """
    if isinstance(target, str):
        cls = _causal_lm_class(target)
        return apply(cls, eval=eval)
    if isinstance(target, type):
        _check_supported(target)
        if not getattr(target.forward, "_memops_patched", False):
            setattr(target, _PATCHED, target.forward)
            target.forward = _wrap(target.forward)
        target._memops_eval = eval
        return target
    if isinstance(target, torch.nn.Module):
        cls = type(target)
        _check_supported(cls)
        if target.get_output_embeddings() is None:
            raise ValueError(f"memops: {cls.__name__} has no output embeddings (lm_head)")
        if not getattr(target.forward, "_memops_patched", False):
            target.__dict__[_PATCHED] = target.forward
            target.forward = _wrap(cls.forward).__get__(target)
        target._memops_eval = eval
        return target
    raise TypeError(f"apply takes a model, a causal LM class or a model_type string, got {type(target).__name__}")


def revert(target: Any):
    """Undo ``apply`` on the same instance, class or ``model_type``."""
    if isinstance(target, str):
        return revert(_causal_lm_class(target))
    if isinstance(target, type):
        if _PATCHED in target.__dict__:
            target.forward = target.__dict__[_PATCHED]
            delattr(target, _PATCHED)
            if "_memops_eval" in target.__dict__:
                delattr(target, "_memops_eval")
        return target
    if isinstance(target, torch.nn.Module):
        if _PATCHED in target.__dict__:
            del target.__dict__[_PATCHED]
            del target.__dict__["forward"]
            target.__dict__.pop("_memops_eval", None)
        return target
    raise TypeError(f"revert takes a model, a causal LM class or a model_type string, got {type(target).__name__}")
