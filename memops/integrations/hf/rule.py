"""Which Hugging Face causal LMs memops reproduces exactly, decided from each class's own forward.

A class is accepted by the rule when its forward's loss path is the standard one, read from its source
(``ast``), step by step:

1. **backbone**: ``outputs = self.<backbone>(...)`` and the hidden states are ``outputs.last_hidden_state``
   (or ``outputs[0]``), not transformed before the head;
2. **kept positions**: ``slice_logits_to_keep(hidden_states, logits_to_keep)`` (or the ``[:, slice(-k, None)
   if isinstance(k, int) else k, :]`` idiom it replaced);
3. **head**: ``logits = self.lm_head(hidden_states)`` (a ``.float()`` on it changes nothing memops computes),
   or a **delegated head**: ``logits = outputs[0]`` / ``outputs.logits`` of ``outputs = self.<language model>(...)``
   called without labels and given ``logits_to_keep=logits_to_keep`` (a vision-language model whose inner causal
   LM computes the logits: Llama 4's); that inner model's own forward must then pass steps 1-4 (checked on the
   instance: :func:`delegated`) and the outer forward may transform its logits no further;
4. **logit transforms**, only these: final soft-capping by ``config.final_logit_softcapping``
   (``/ cap``, ``tanh``, ``* cap``), a logit scale (``* self.logit_scale``, ``/ config.logits_scaling``,
   ``* config.logits_scaling``);
5. **loss**: ``loss = self.loss_function(logits, labels, <vocab size>, **kwargs)`` under ``if labels is not
   None`` (``labels`` used nowhere else), the model's ``loss_function`` being transformers' ``ForCausalLM``
   loss (checked on the instance);
6. **router auxiliary loss**, if any: ``aux_loss = load_balancing_loss_func(...)`` and ``loss +=
   self.router_aux_loss_coef * aux_loss.to(loss.device)``, the aux loss returned as ``aux_loss=``.

Anything else that reads or writes the logits or the loss refuses the class, naming the step and the
statement.  The rule alone does not accept a model: it must also have passed the float64 equivalence test
(``memops.integrations.hf.tested``; ``tests/test_hf_models.py``).
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LossPath:
    """A class's standard loss path as the rule read it.  Paths are attribute chains on the model
    (:func:`resolve`); ``None``: not present."""

    softcap: str | None = None  # the final soft-cap's value
    scale: str | None = None  # the logit scale's value ...
    scale_op: str = "*"  # ... multiplied or divided by
    aux_coef: str | None = None  # the router auxiliary loss's coefficient, when one is added
    vocab: str = ""  # the loss call's vocabulary-size expression
    backbone_labels: str | None = None  # the backbone module given ``labels=`` (it must ignore them)
    delegate: str | None = None  # the inner causal LM whose logits the forward takes (a delegated head)


class Refused(ValueError):
    """The class's forward is not the standard loss path (``step``: which step differs)."""

    def __init__(self, step: str, why: str):
        super().__init__(f"{step}: {why}")
        self.step, self.why = step, why


def _src(node) -> str:
    return ast.unparse(node).replace("\n", " ")


def self_path(node) -> str | None:
    """``self.a.b`` -> ``"a.b"`` (a ``get_text_config()`` call kept as a segment), else None."""
    parts = []
    while True:
        if isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        elif isinstance(node, ast.Call) and not (node.args or node.keywords) and isinstance(node.func, ast.Attribute):
            if node.func.attr != "get_text_config":
                return None
            parts.append("get_text_config()")
            node = node.func.value
        else:
            break
    if isinstance(node, ast.Name) and node.id == "self" and parts:
        return ".".join(reversed(parts))
    return None


def resolve(model, path: str):
    """The value of ``self_path``'s ``path`` on ``model``."""
    value = model
    for part in path.split("."):
        value = value.get_text_config() if part == "get_text_config()" else getattr(value, part)
    return value


def _names(node) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _flat(body, guards=()):
    """Every simple statement of ``body`` in order, with the ``if`` tests that enclose it."""
    for stmt in body:
        if isinstance(stmt, ast.If):
            yield from _flat(stmt.body, (*guards, stmt.test))
            yield from _flat(stmt.orelse, (*guards, ast.UnaryOp(ast.Not(), stmt.test)))
        elif isinstance(stmt, (ast.With, ast.For, ast.While, ast.Try)):
            yield stmt, guards  # compound statements are judged whole
        else:
            yield stmt, guards


def _target(stmt) -> str | None:
    if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
        return stmt.targets[0].id
    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value is not None:
        return stmt.target.id
    if isinstance(stmt, ast.AugAssign) and isinstance(stmt.target, ast.Name):
        return stmt.target.id
    return None


def _legacy_tuple_branch(guards) -> bool:
    """Inside ``if not return_dict:`` (the tuple output, which the patched forward never takes)."""
    return any(
        isinstance(g, ast.UnaryOp) and isinstance(g.op, ast.Not) and _names(g.operand) == {"return_dict"}
        for g in guards
    )


_BACKBONE_SKIP = ("lm_head", "loss_function", "get_output_embeddings")
_ALLOWED_CAST = ("self.lm_head.weight.dtype",)


def _head_arg(value):
    """``self.lm_head(x)`` (``.float()`` / ``.contiguous()`` after it, ``x.to(self.lm_head.weight.dtype)``
    inside): ``x``, else None."""
    while (
        isinstance(value, ast.Call)
        and isinstance(value.func, ast.Attribute)
        and value.func.attr in ("float", "contiguous")
        and not value.args
    ):
        value = value.func.value
    if not (isinstance(value, ast.Call) and self_path(value.func) == "lm_head" and len(value.args) == 1):
        return None
    arg = value.args[0]
    if isinstance(arg, ast.Call) and isinstance(arg.func, ast.Attribute) and arg.func.attr == "to":
        cast = [_src(a) for a in arg.args] + [_src(k.value) for k in arg.keywords if k.arg == "dtype"]
        if len(cast) == 1 and cast[0] in _ALLOWED_CAST and len(arg.args) + len(arg.keywords) == 1:
            return arg.func.value
    return arg


def _scaled(value, name_ok):
    """``<x> * <self path>`` / ``<x> / <self path>`` with ``name_ok(x)``: (x, path, op), else None."""
    if isinstance(value, ast.BinOp) and isinstance(value.op, (ast.Mult, ast.Div)):
        path = self_path(value.right)
        if path is not None and name_ok(value.left):
            return value.left, path, "*" if isinstance(value.op, ast.Mult) else "/"
    return None


def _is_logits(node) -> bool:
    return isinstance(node, ast.Name) and node.id == "logits"


_CAPS = ("final_logit_softcapping", "logits_soft_cap", "logit_softcapping")
_TANH = ("torch.tanh", "nn.functional.tanh", "torch.nn.functional.tanh", "F.tanh")


@functools.cache
def read(cls) -> LossPath:
    """The loss path of ``cls``'s forward (the class in its MRO that defines it), or :class:`Refused`."""
    owner = next(k for k in cls.__mro__ if "forward" in k.__dict__)
    forward = owner.__dict__.get("_memops_original_forward", owner.__dict__["forward"])
    if not getattr(forward, "__module__", "").startswith("transformers."):
        raise Refused("forward", f"{owner.__qualname__}.forward is not transformers' own ({forward.__module__})")
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(forward)))
    except (OSError, TypeError, SyntaxError) as exc:
        raise Refused("forward", f"its source cannot be read ({exc})") from None
    return _Reader(tree.body[0]).path()


class _Reader:
    """One pass over a forward's statements, in order, keeping what the rule needs."""

    def __init__(self, fn):
        self.fn = fn
        params = {a.arg for a in fn.args.args + fn.args.kwonlyargs}
        if "labels" not in params or fn.args.kwarg is None:
            raise Refused("forward", "it takes no labels or no **kwargs (num_items_in_batch, shift_labels)")
        self.kwargs = fn.args.kwarg.arg
        self.keeps = "logits_to_keep" in params
        self.out: dict = {}
        self.outputs: dict[str, ast.Call] = {}  # names bound to a module's output -> that call
        self.hidden: str | None = None  # the hidden states' current name
        self.sliced = False
        self.slice_names: set[str] = set()
        self.head = False
        self.caps: dict[str, str] = {}  # locals holding a soft-cap -> its path
        self.cap_steps: list[str] = []
        self.aux: str | None = None
        self.loss = False
        self.aux_returned = False

    def path(self) -> LossPath:
        for stmt, guards in _flat(self.fn.body):
            self.statement(stmt, guards)
        if not self.head:
            raise Refused("head", "no logits = self.lm_head(...) in its forward")
        if not self.loss:
            raise Refused("loss", "no loss = self.loss_function(...) in its forward")
        if self.cap_steps and self.cap_steps not in (["div", "tanh", "mul"], ["capped"]):
            raise Refused("logit transforms", f"an incomplete soft-cap ({' '.join(self.cap_steps)})")
        if self.out.get("aux_coef") and not self.aux_returned:
            raise Refused("router auxiliary loss", "the auxiliary loss is not returned as aux_loss=")
        return LossPath(**self.out)

    def statement(self, stmt, guards) -> None:
        if _legacy_tuple_branch(guards):
            return
        for g in guards:  # ``if (cap := self.config....final_logit_softcapping) is not None:``
            for n in ast.walk(g):
                if isinstance(n, ast.NamedExpr) and (cap := self_path(n.value)) and cap.endswith(_CAPS):
                    self.caps[n.target.id] = cap
        names = _names(stmt)
        if isinstance(stmt, ast.Expr) and not names & {"logits", "loss", "labels"}:
            return  # a docstring, or a call that touches nothing the loss reads
        if isinstance(stmt, ast.Return):
            return self.returned(stmt)
        name, value = _target(stmt), getattr(stmt, "value", None)
        if name == "loss" and isinstance(value, ast.Constant) and value.value is None:
            return
        if name == "aux_loss" and isinstance(value, ast.Constant) and value.value is None:
            return
        if "labels" in names and not self.labels_ok(stmt, name, value):
            raise Refused("loss", f"labels are used outside the loss call: {_src(stmt)}")
        if name is None:
            if names & {"logits", "loss", self.hidden or "hidden_states"}:
                raise Refused("logits", f"an unrecognised statement on the logits or the loss: {_src(stmt)}")
            return
        path = self_path(value) if value is not None else None
        if path is not None and path.endswith(_CAPS):  # a local holding the soft-cap
            self.caps[name] = path
            return
        if not self.head:
            return self.before_head(stmt, name, value)
        return self.after_head(stmt, name, value, guards)

    def labels_ok(self, stmt, name, value) -> bool:
        if name == "loss" and isinstance(stmt, ast.Assign):
            return True  # the loss call, checked there
        # ``labels=labels`` into the backbone: allowed when that module ignores them (checked on the instance)
        if isinstance(value, ast.Call) and not self.head:
            path = self_path(value.func)
            passed = [k for k in value.keywords if k.arg == "labels"]
            others = _names(ast.Tuple([*value.args, *[k.value for k in value.keywords if k.arg != "labels"]]))
            if path and path not in _BACKBONE_SKIP and passed and _src(passed[0].value) == "labels":
                if "labels" not in others:
                    self.out["backbone_labels"] = path
                    return True
        return False

    def before_head(self, stmt, name, value) -> None:
        if name == "logits":
            return self.head_call(stmt, value)
        if isinstance(value, ast.Call) and self_path(value.func) not in (None, *_BACKBONE_SKIP):
            self.outputs[name] = value
            return
        if name == "slice_indices":
            self.slice_names.add(name)
            return
        if self.backbone_hidden(value):
            self.hidden = name
            return
        if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "slice_logits_to_keep":
            arg = value.args[0] if value.args else None
            ok = (isinstance(arg, ast.Name) and arg.id == self.hidden) or self.backbone_hidden(arg)
            if ok and len(value.args) == 2 and _names(value.args[1]) == {"logits_to_keep"}:
                self.hidden, self.sliced = name, True
                return
            raise Refused("kept positions", f"not the standard slicing: {_src(stmt)}")
        if self.hidden is not None and name == self.hidden:
            raise Refused("backbone", f"the hidden states are transformed before lm_head: {_src(stmt)}")
        if name in ("loss", "aux_loss"):
            raise Refused("loss", f"a loss term before the head: {_src(stmt)}")

    def backbone_hidden(self, node) -> bool:
        """``outputs.last_hidden_state`` or ``outputs[0]`` of the backbone's output."""
        if isinstance(node, ast.Attribute) and node.attr == "last_hidden_state":
            return isinstance(node.value, ast.Name) and node.value.id in self.outputs
        if isinstance(node, ast.Subscript) and _src(node.slice) == "0":
            return isinstance(node.value, ast.Name) and node.value.id in self.outputs
        return False

    def head_call(self, stmt, value) -> None:
        call = self.delegated_call(value)
        if call is not None:
            return self.delegation(stmt, call)
        arg, scaled = _head_arg(value), None
        if arg is None:
            scaled = _scaled(value, lambda x: _head_arg(x) is not None)
            arg = None if scaled is None else _head_arg(scaled[0])
        if arg is None:
            raise Refused("head", f"the logits are not self.lm_head(hidden states): {_src(stmt)}")
        if isinstance(arg, ast.Name) and arg.id == self.hidden and (self.sliced or not self.keeps):
            pass
        elif self.idiom(arg):
            pass
        else:
            raise Refused("kept positions", f"lm_head reads other than the kept hidden states: {_src(stmt)}")
        if scaled is not None:
            self.out["scale"], self.out["scale_op"] = scaled[1], scaled[2]
        self.head = True

    def delegated_call(self, value) -> ast.Call | None:
        """``outputs[0]`` / ``outputs.logits`` of a module call: that call."""
        first = isinstance(value, ast.Subscript) and _src(value.slice) == "0"
        if (first or (isinstance(value, ast.Attribute) and value.attr == "logits")) and isinstance(
            value.value, ast.Name
        ):
            return self.outputs.get(value.value.id)
        return None

    def delegation(self, stmt, call) -> None:
        """The logits of an inner causal LM: called without labels, with the kept positions passed through."""
        path = self_path(call.func)
        passed = {k.arg: _src(k.value) for k in call.keywords if k.arg is not None}
        if "labels" in passed or self.out.get("backbone_labels") == path:
            raise Refused("head", f"the inner model computing the logits is given the labels: {_src(stmt)}")
        if self.keeps and passed.get("logits_to_keep") != "logits_to_keep":
            raise Refused("kept positions", f"the inner model computing the logits is not given logits_to_keep: "
                          f"{_src(call)}")  # fmt: skip
        if call.args:
            raise Refused("head", f"the inner model computing the logits takes positional arguments: {_src(call)}")
        self.out["delegate"] = path
        self.head = True

    def idiom(self, arg) -> bool:
        """``hidden[:, slice_indices, :]``, ``slice_indices`` the standard ``slice(-k, None)`` idiom."""
        if not (isinstance(arg, ast.Subscript) and isinstance(arg.value, ast.Name) and arg.value.id == self.hidden):
            return False
        parts = arg.slice.elts if isinstance(arg.slice, ast.Tuple) else []
        return (
            len(parts) == 3
            and _src(parts[0]) == ":"
            and _src(parts[2]) == ":"
            and bool(_names(parts[1]))
            and _names(parts[1]) <= self.slice_names
        )

    def after_head(self, stmt, name, value, guards) -> None:
        if name == "logits":
            if self.out.get("delegate"):
                raise Refused("logit transforms", f"the inner model's logits are transformed again: {_src(stmt)}")
            return self.transform(stmt, value)
        if name == "loss":
            if isinstance(stmt, ast.AugAssign):
                coef = self.aux_term(stmt)
                if coef is None:
                    raise Refused("router auxiliary loss", f"an added loss term memops cannot reproduce: {_src(stmt)}")
                self.out["aux_coef"] = coef
                return
            if self.loss:
                raise Refused("loss", f"the loss is changed after the loss call: {_src(stmt)}")
            self.out["vocab"] = _loss_call(value, self.kwargs, guards)
            self.loss = True
            return
        if name == "aux_loss":
            if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "load_balancing_loss_func":
                self.aux = name
                return
            raise Refused("router auxiliary loss", f"not transformers' load-balancing loss: {_src(stmt)}")
        if {"logits", "loss"} & _names(stmt):
            raise Refused("logits", f"the logits or the loss reach another value: {_src(stmt)}")

    def cap_of(self, node) -> str | None:
        if isinstance(node, ast.Name) and node.id in self.caps:
            return self.caps[node.id]
        path = self_path(node)
        if path is not None and path.endswith(_CAPS):
            return path
        return None

    def transform(self, stmt, value) -> None:
        """One of the logit transforms memops reproduces (soft-cap steps, a logit scale)."""
        cap = self.out.get("softcap")
        if isinstance(value, ast.BinOp) and _is_logits(value.left) and not self.cap_steps[-1:] == ["mul"]:
            c = self.cap_of(value.right)
            if c is not None and (cap is None or cap == c):
                step = "div" if isinstance(value.op, ast.Div) else "mul" if isinstance(value.op, ast.Mult) else None
                if (
                    step
                    and (self.cap_steps + [step])[: len(self.cap_steps) + 1]
                    == ["div", "tanh", "mul"][: len(self.cap_steps) + 1]
                ):
                    self.cap_steps.append(step)
                    self.out["softcap"] = c
                    return
        if (
            isinstance(value, ast.Call)
            and _src(value.func) in _TANH
            and len(value.args) == 1
            and _is_logits(value.args[0])
            and self.cap_steps == ["div"]
        ):
            self.cap_steps.append("tanh")
            return
        # tanh(logits / cap) * cap in one statement
        if (
            isinstance(value, ast.BinOp)
            and isinstance(value.op, ast.Mult)
            and isinstance(value.left, ast.Call)
            and _src(value.left.func) in _TANH
            and len(value.left.args) == 1
            and isinstance(value.left.args[0], ast.BinOp)
            and isinstance(value.left.args[0].op, ast.Div)
            and _is_logits(value.left.args[0].left)
            and not self.cap_steps
        ):
            c1, c2 = self.cap_of(value.left.args[0].right), self.cap_of(value.right)
            if c1 is not None and c1 == c2:
                self.cap_steps, self.out["softcap"] = ["capped"], c1
                return
        scaled = _scaled(value, _is_logits)
        if scaled is not None and "scale" not in self.out and not self.cap_steps:
            self.out["scale"], self.out["scale_op"] = scaled[1], scaled[2]
            return
        raise Refused("logit transforms", f"not a soft-cap or logit scale memops reproduces: {_src(stmt)}")

    def aux_term(self, stmt) -> str | None:
        """``loss += <self path> * aux_loss.to(loss.device)``: the coefficient's path."""
        v = stmt.value
        if self.aux is None or not isinstance(stmt.op, ast.Add):
            return None
        if isinstance(v, ast.BinOp) and isinstance(v.op, ast.Mult):
            coef = self_path(v.left)
            if coef is not None and _src(v.right) in (f"{self.aux}.to(loss.device)", self.aux):
                return coef
        return None

    def returned(self, stmt) -> None:
        """The output: ``loss=loss`` and ``logits=logits`` (and ``aux_loss=aux_loss``), nothing computed there."""
        value = stmt.value
        if not isinstance(value, ast.Call) or value.args:
            raise Refused("output", f"not an output dataclass: {_src(stmt)}")
        kw = {k.arg: k.value for k in value.keywords if k.arg is not None}
        if _src(kw.get("loss", ast.Constant(None))) != "loss" or _src(kw.get("logits", ast.Constant(None))) != "logits":
            raise Refused("output", f"its output does not carry loss=loss, logits=logits: {_src(stmt)}")
        if "aux_loss" in kw and _src(kw["aux_loss"]) == "aux_loss":
            self.aux_returned = True
        for k, v in kw.items():
            if k not in ("loss", "logits", "aux_loss") and {"logits", "loss", "labels"} & _names(v):
                raise Refused("output", f"{k}={_src(v)} reads the logits or the loss")


def _loss_call(value, kwargs: str, guards) -> str:
    """The vocabulary-size expression of ``self.loss_function(logits, labels, vocab, **kwargs)``."""
    if not (isinstance(value, ast.Call) and self_path(value.func) == "loss_function"):
        raise Refused("loss", f"the loss is not self.loss_function(...): {_src(value)}")
    args = list(value.args)
    kw = {k.arg: k.value for k in value.keywords if k.arg is not None}
    spread = [k.value for k in value.keywords if k.arg is None]
    logits = args[0] if args else kw.get("logits")
    labels = args[1] if len(args) > 1 else kw.get("labels")
    vocab = args[2] if len(args) > 2 else kw.get("vocab_size")
    extra = set(kw) - {"logits", "labels", "vocab_size"}
    if (
        logits is None
        or labels is None
        or _src(logits) != "logits"
        or _src(labels) != "labels"
        or vocab is None
        or len(args) > 3
        or extra
        or [_src(s) for s in spread] != [kwargs]
    ):
        raise Refused("loss", f"not loss_function(logits, labels, vocab_size, **{kwargs}): {_src(value)}")
    if not any(_src(g) == "labels is not None" for g in guards):
        raise Refused("loss", "the loss call is not under `if labels is not None`")
    return _src(vocab)


def delegated(model, path: LossPath):
    """``(the module whose lm_head computes the logits, its loss path)``: the model itself, or for a delegated
    head the inner causal LM with its own forward's path (steps 1-4; it is called without labels, so its loss
    and auxiliary-loss steps do not run), else :class:`Refused`."""
    if path.delegate is None:
        return model, path
    inner = resolve(model, path.delegate)
    try:
        inner_cls: Any = type(inner)
        inner_path = read(inner_cls)
    except Refused as exc:
        raise Refused(exc.step, f"its inner model {path.delegate} ({type(inner).__name__}): {exc.why}") from None
    if inner_path.delegate is not None:
        raise Refused("head", f"its inner model {path.delegate} ({type(inner).__name__}) delegates its head again")
    return inner, inner_path


@functools.cache
def ignores_labels(module_cls) -> bool:
    """Whether ``module_cls``'s forward takes ``labels`` without reading them (a backbone given them)."""
    forward = module_cls.forward
    try:
        fn = ast.parse(textwrap.dedent(inspect.getsource(forward))).body[0]
    except (OSError, TypeError, SyntaxError):
        return False
    if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return False
    body = fn.body[1:] if fn.body and isinstance(fn.body[0], ast.Expr) else fn.body  # less the docstring
    return all("labels" not in _names(stmt) for stmt in body)


IMAGE_TEXT = ":image-text"  # an entry's suffix: the image-text-to-text class of a type whose causal LM is another


def model_class(entry: str) -> Any:  # a transformers model class
    """The causal-LM class transformers maps a model type to (image-text-to-text when it has none); for
    ``"<type>:image-text"`` the type's image-text-to-text class (a vision-language model whose text-only causal
    LM is another class, Qwen3.5's say)."""
    import transformers
    from transformers.models.auto import modeling_auto

    model_type, image_text = entry.removesuffix(IMAGE_TEXT), entry.endswith(IMAGE_TEXT)
    name = None if image_text else modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if name is None:
        name = modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(model_type)
    cls = getattr(transformers, name, None) if name else None
    if cls is None:
        raise ValueError(f"unknown causal LM model_type {model_type!r}")
    return cls
