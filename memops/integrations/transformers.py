"""Hugging Face ``transformers`` causal LMs that train without building logits.

``apply(model)`` patches one model instance, ``apply("llama")`` (a ``model_type``, a model class, or an
instance) patches the class; ``revert(...)`` undoes either.  A class is accepted when its forward's loss
path is the standard one, read from its own code (``hf_rule``: backbone, kept positions, ``lm_head``, the
model's soft-cap / logit scale, ``loss_function``, router auxiliary loss) and a tiny instance of it has
passed the float64 equivalence test (``hf_tested``); everything else is refused naming the reason.
A patched model called with ``labels`` (or
``shift_labels``) while training computes its loss with ``memops.linear_cross_entropy`` from the last
hidden states and ``lm_head`` (weight and bias), with the original's label shifting, ``ignore_index``,
``num_items_in_batch`` normalization and ``logits_to_keep`` slicing, and returns ``logits=None``.  Without
labels, or in eval mode (unless ``apply(..., eval=True)``), the original forward runs unchanged.

The loss is computed as ``lm_head``'s own forward (under PEFT's ``modules_to_save``, as that of whichever
module PEFT picks) and is that call's output as the head's forward hooks see it: FSDP2 and DeepSpeed ZeRO-3
gather the weight before it and attach their pre-backward re-gather to it, so memops' backward reads the
gathered weight too.  The model's forward then sees an empty stand-in for the logits.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

import torch

from ._module_call import output_taken
from .hf import rule as hf_rule
from .hf import tested as hf_tested

_PATCHED = "_memops_original_forward"


@dataclass(frozen=True)
class _Verified:
    """What a verified causal LM's own forward does between ``lm_head`` and its loss (read from its code by
    ``hf_rule``): final-logit soft-capping, a logit scale, a router auxiliary loss added to the loss."""

    path: hf_rule.LossPath

    def softcap(self, model) -> float | None:
        model, path = hf_rule.delegated(model, self.path)  # a delegated head: the inner model's soft-cap
        if path.softcap is None:
            return None
        cap = hf_rule.resolve(model, path.softcap)
        return float(cap) if cap else None

    def logit_scale(self, model) -> float:
        model, path = hf_rule.delegated(model, self.path)
        if path.scale is None:
            return 1.0
        value = float(hf_rule.resolve(model, path.scale))
        return value if path.scale_op == "*" else 1.0 / value

    @property
    def aux_loss(self) -> bool:
        return self.path.aux_coef is not None

    def aux_coef(self, model) -> float:
        assert self.path.aux_coef is not None, "aux_coef is read only when aux_loss"
        return hf_rule.resolve(model, self.path.aux_coef)


def _causal_lm_class(model_type: str):
    try:
        return hf_rule.model_class(model_type)
    except ValueError:
        raise ValueError(f"memops.integrations.transformers: unknown causal LM model_type {model_type!r}") from None


def _refuse(cls, why: str):
    owner = next(k for k in cls.__mro__ if "forward" in k.__dict__)
    where = f"{owner.__module__}.{owner.__qualname__}.forward"
    raise ValueError(
        f"memops.integrations.transformers: {cls.__name__} is not supported: {why} (its forward: {where}); a "
        "model that would train differently is refused (docs/models.md: the rule, python -m memops models: "
        "every installed type)"
    )


def _verified(cls, tested: bool = True) -> _Verified:
    """The verified behaviour of ``cls``'s forward, else a ValueError naming the step of the standard loss
    path that differs (``hf_rule``), or saying that the class has no float64 equivalence test
    (``hf_tested.TESTED``; ``tested=False``: the rule alone, for that test itself)."""
    try:
        path = hf_rule.read(cls)
    except hf_rule.Refused as exc:
        _refuse(cls, f"its loss path is not the standard one at the {exc.step!r} step: {exc.why}")
    owner = next(k for k in cls.__mro__ if "forward" in k.__dict__)  # the class whose forward runs
    if tested and owner.__name__ not in hf_tested.TESTED:
        _refuse(cls, "its forward follows the standard loss path, but no tiny instance of it has passed memops' "
                "float64 equivalence test (tests/test_hf_models.py)")  # fmt: skip
    return _Verified(path)


def _check_instance(model, spec: _Verified) -> None:
    """What the class's code leaves to the instance: transformers' ForCausalLM loss, a vocabulary size equal
    to lm_head's, and a backbone that ignores the ``labels`` its forward is given."""
    from transformers.loss.loss_utils import LOSS_MAPPING

    cls = type(model)
    if model.loss_function is not LOSS_MAPPING["ForCausalLM"]:
        _refuse(cls, f"its loss_function is {getattr(model.loss_function, '__name__', model.loss_function)!r}, "
                "not transformers' ForCausalLMLoss")  # fmt: skip
    try:
        owner, _ = hf_rule.delegated(model, spec.path)
    except hf_rule.Refused as exc:
        _refuse(cls, f"its loss path is not the standard one at the {exc.step!r} step: {exc.why}")
    head = model.get_output_embeddings()
    if head is None or head is not getattr(owner, "lm_head", None):
        _refuse(cls, "its output embeddings are not " + ("its lm_head" if owner is model else
                f"the lm_head of {spec.path.delegate}, the inner model computing its logits"))  # fmt: skip
    vocab = spec.path.vocab
    if vocab.startswith("self."):
        size = hf_rule.resolve(model, vocab.removeprefix("self."))
        weight = getattr(head, "weight", None)
        out = getattr(head, "out_features", None) if weight is None else weight.shape[0]
        if out is not None and weight is not None and weight.numel() and int(size) != int(out):
            _refuse(cls, f"its loss reads a vocabulary of {size} ({vocab}) but lm_head has {out} rows")
    if spec.path.backbone_labels is not None:
        backbone = hf_rule.resolve(model, spec.path.backbone_labels)
        backbone_cls: Any = type(backbone)
        if not hf_rule.ignores_labels(backbone_cls):
            _refuse(cls, f"its backbone ({type(backbone).__name__}) is given the labels and reads them")


def verify(target: Any) -> _Verified:
    """Whether memops reproduces a Hugging Face causal LM exactly: ``target`` a model type (``"llama"``,
    ``"qwen3_5:image-text"``), a model class, or a model instance (its class, and what the class leaves to the
    instance: transformers' ForCausalLM loss, the vocabulary size, the backbone's ``labels``).  Returns the
    verified loss path (its logit scale, soft-cap and delegated head); otherwise raises a ValueError naming the
    step of the class's forward that differs, or saying that no tiny instance of it has passed memops' float64
    equivalence test.  The one seam every integration (Axolotl, TRL, the training demo) refuses models through."""
    if target is None:
        raise ValueError("memops.integrations.transformers.verify: target is None (give a model, a class or a type)")
    if isinstance(target, str):
        return _verified(_causal_lm_class(target))
    if isinstance(target, type):
        return _verified(target)
    spec = _verified(type(target))
    _check_instance(target, spec)
    return spec


class _Loss:
    """What one patched call needs inside ``lm_head``'s forward, and the loss it leaves there."""

    def __init__(self, labels, shift_labels, num_items, ignore_index, softcap, logit_scale, logits_to_keep):
        self.labels, self.shift_labels, self.num_items = labels, shift_labels, num_items
        self.ignore_index, self.softcap, self.logit_scale = ignore_index, softcap, logit_scale
        self.logits_to_keep = logits_to_keep
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


def _head_forward(ctx: _Loss):
    def make(head):
        def forward(hidden_states):
            from .. import linear_cross_entropy

            # read on every call: a trained copy (PEFT modules_to_save) is used as it is now; a partitioned
            # weight (ZeRO-3 outside its gather) is refused by the op's argument check
            return linear_cross_entropy(
                hidden_states,
                head.weight,
                ctx.targets().to(hidden_states.device),
                getattr(head, "bias", None),
                ignore_index=ctx.ignore_index,
                num_items=ctx.num_items,
                softcap=ctx.softcap,
                logit_scale=ctx.logit_scale,
            )

        return forward

    return make


def _take_loss(ctx: _Loss):
    def sink(loss):
        ctx.loss = loss

    return sink


def _no_logits(hidden_states, *args):
    return hidden_states.new_zeros(hidden_states.shape[:-1] + (0,))  # stands in for the logits


def _linear_heads(head) -> list[torch.nn.Linear]:
    """The ``nn.Linear`` modules one of which computes the logits when ``head`` is called: the head itself,
    or under PEFT's ``modules_to_save`` the original module and every trained copy (PEFT's wrapper picks one
    per call: the active adapter's copy, or the original when adapters are disabled)."""
    if type(head).__name__ == "ModulesToSaveWrapper":
        leaves = [head.original_module, *head.modules_to_save.values()]
    else:
        leaves = [head]
    for leaf in leaves:
        if isinstance(leaf, torch.nn.Linear) and (
            type(leaf).forward is not torch.nn.Linear.forward
            or {n for n, _ in leaf.named_parameters()} - {"weight", "bias"}
        ):
            raise ValueError(
                f"memops: lm_head is a {type(leaf).__module__}.{type(leaf).__qualname__}, an nn.Linear with a forward "
                "or parameters of its own: its output is not lm_head.weight's logits, so memops' loss would differ"
            )
        if not isinstance(leaf, torch.nn.Linear):
            adapters = getattr(leaf, "lora_A", None)
            named = f" LoRA adapter(s) {sorted(adapters.keys())}" if adapters is not None else ""
            raise ValueError(
                f"memops: lm_head is a {type(leaf).__module__}.{type(leaf).__qualname__}{named}, not an nn.Linear: "
                "its output is not lm_head.weight's logits, so memops' loss would leave the adapter's term out. "
                "Merge the adapter "
                "(merge_and_unload), train lm_head through modules_to_save, or leave lm_head out of the adapter."
            )
    return leaves


def _loss_in_head(head, ctx: _Loss):
    """The loss is ``lm_head``'s output as its forward hooks see it; the model's forward gets a stand-in."""
    return output_taken(_linear_heads(head), _head_forward(ctx), _take_loss(ctx), _no_logits)


def _wrap(orig):
    sig = inspect.signature(orig)
    var_kw = next((p.name for p in sig.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD), "kwargs")
    takes_return_dict = "return_dict" in sig.parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()
    )

    @functools.wraps(orig)
    def forward(self, *args, **kwargs):
        bound = sig.bind(self, *args, **kwargs)
        arguments = dict(bound.arguments)
        extra = dict(arguments.pop(var_kw, {}) or {})
        labels = arguments.get("labels")
        shift_labels = extra.get("shift_labels")
        if (labels is None and shift_labels is None) or not (self.training or getattr(self, "_memops_eval", False)):
            return orig(self, *args, **kwargs)
        spec = _verified(type(self), getattr(self, "_memops_tested", True))
        _check_instance(self, spec)
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
            spec.softcap(self),
            spec.logit_scale(self),
            arguments.get("logits_to_keep", 0) or 0,
        )
        head = self.get_output_embeddings()
        with _loss_in_head(head, ctx):
            if takes_return_dict:
                extra["return_dict"] = True
            out = orig(self, **arguments, **extra)
        if ctx.loss is None:
            raise RuntimeError(f"memops: {type(self).__name__}.forward did not call its lm_head")
        loss = ctx.loss
        aux = out.get("aux_loss") if spec.aux_loss else None
        if aux is not None:  # as the model's own forward: loss + router_aux_loss_coef * load-balancing loss
            loss = loss + spec.aux_coef(self) * aux.to(loss.device)
        fields = {k: v for k, v in out.items() if k not in ("loss", "logits")}
        out = type(out)(loss=loss, **fields)  # logits left at None
        if return_dict is False or (return_dict is None and not getattr(self.config, "return_dict", True)):
            return out.to_tuple()
        return out

    forward._memops_patched = True
    return forward


def _is_fused_head(forward) -> bool:
    """Whether ``forward`` is TRL's fused-LM-head forward (``trl.trainer.utils.add_fused_lm_head``), which
    takes ``fused_lm_head`` (its own signature, not the model forward's it wraps)."""
    try:
        return "fused_lm_head" in inspect.signature(forward, follow_wrapped=False).parameters
    except (TypeError, ValueError):
        return False


def _keeping_fused_head(wrapped, fused):
    """The memops forward for ordinary calls; TRL's fused head for ``fused_lm_head=True`` calls (so patching a
    model TRL already gave a fused head keeps that head, which ``memops.integrations.trl.apply`` moves onto
    memops too)."""

    @functools.wraps(wrapped)
    def forward(*args, fused_lm_head: bool = False, **kwargs):
        if fused_lm_head:
            return fused(*args, fused_lm_head=True, **kwargs)
        return wrapped(*args, **kwargs)

    forward._memops_patched = True
    return forward


def apply(target: Any, *, eval: bool = False, _tested: bool = True):
    """Patch a model instance, or a causal LM class given as a class or a ``model_type`` string.

    ``eval=True`` also uses memops when an instance is in eval mode (its ``logits`` are then ``None``).
    Returns ``target``.  (``_tested=False``: the structural rule alone, for the equivalence test itself.)
    """
    if isinstance(target, str):
        cls = _causal_lm_class(target)
        return apply(cls, eval=eval, _tested=_tested)
    if isinstance(target, type):
        patched: Any = target  # a class: its forward and memops' marks are set on it
        _verified(patched, _tested)
        patched._memops_tested = _tested
        if not getattr(patched.forward, "_memops_patched", False):
            setattr(patched, _PATCHED, patched.forward)
            patched.forward = _wrap(patched.forward)
        patched._memops_eval = eval
        return patched
    if isinstance(target, torch.nn.Module):
        model: Any = target  # an instance: its own forward and marks
        cls = type(model)
        _check_instance(model, _verified(cls, _tested))
        model._memops_tested = _tested
        head = model.get_output_embeddings()
        if head is None:
            raise ValueError(f"memops: {cls.__name__} has no output embeddings (lm_head)")
        _linear_heads(head)
        if not getattr(model.forward, "_memops_patched", False):
            previous = model.forward
            model.__dict__[_PATCHED] = previous
            wrapped = _wrap(cls.forward).__get__(model)
            model.forward = _keeping_fused_head(wrapped, previous) if _is_fused_head(previous) else wrapped
        model._memops_eval = eval
        return model
    raise TypeError(f"apply takes a model, a causal LM class or a model_type string, got {type(target).__name__}")


def revert(target: Any):
    """Undo ``apply`` on the same instance, class or ``model_type``."""
    if isinstance(target, str):
        return revert(_causal_lm_class(target))
    if isinstance(target, type):
        if _PATCHED in target.__dict__:
            setattr(target, "forward", target.__dict__[_PATCHED])  # noqa: B010  (a class: no declared forward)
            delattr(target, _PATCHED)
            for attr in ("_memops_eval", "_memops_tested"):
                if attr in target.__dict__:
                    delattr(target, attr)
        return target
    if isinstance(target, torch.nn.Module):
        if _PATCHED in target.__dict__:
            del target.__dict__[_PATCHED]
            del target.__dict__["forward"]
            target.__dict__.pop("_memops_eval", None)
            target.__dict__.pop("_memops_tested", None)
        return target
    raise TypeError(f"revert takes a model, a causal LM class or a model_type string, got {type(target).__name__}")
