"""``memops::linear_ce`` declared: inputs, options, outputs and their shape rules.

* ``target``: class indices shaped like ``input.shape[:-1]``, or probabilities ``[..., V]`` (float); the
  per-token shape is ``input.shape[:-1]`` either way.
* ``loss``: compute dtype (fp64 for fp64 inputs, else fp32); the per-token shape for ``reduction="none"``,
  else 0-dim.  ``lse``: compute dtype, the per-token shape (``all_lse`` changes values only); it takes a
  gradient when ``lse_grad`` (then the forward computes no gradients: backward computes the loss's and
  the lse's together), else it is returned detached.
  ``is_top1`` (no gradient): bool, the per-token shape when ``return_is_top1``, else an empty ``[0]`` tensor
  of the compute dtype.
* gradients (``Tensor[] grads``: input, weight, target, bias; the target's for probability targets only):
  contiguous, shaped and typed like their tensor when produced,
  else an empty ``[0]`` tensor of input's dtype.
"""

from __future__ import annotations

import torch

from .. import validation as V
from ..contract import Input, Option, Spec, register
from ..rules import compute_dtype


def check(a) -> None:
    """``memops::linear_ce``: projection, target (class indices, or probabilities when float), class weights,
    ``num_items`` (options are checked one by one before)."""
    V.check_projection(a.input, a.weight, a.bias)
    if isinstance(a.target, torch.Tensor) and a.target.is_floating_point():
        V.check_probability_target(a.input, a.target, a.weight.shape[0])
        if getattr(a, "return_is_top1", False):
            V.fail("return_is_top1 needs class-index targets, not probabilities")
    else:
        V.check_target(a.input, a.target)
    V.check_class_weight(a.class_weight, a.weight)
    V.check_num_items(a.num_items, a.reduction)


# the projection every family starts from
PROJECTION = (Input("input", grad=True), Input("weight", grad=True))
NUM_ITEMS = Input("num_items", "Tensor?", convert=V.as_num_items)
CHUNK_SIZE = Option("chunk_size", "int", None, V.chunk_rows, convert=V.as_chunk_size)
REDUCTION = Option("reduction", "str", "mean", V.reduction)
# "reference": logits rounded to the input dtype by the GEMM, as the unfused code; "accurate": kept in fp32
PRECISION = Option("precision", "str", "reference", V.one_of("reference", "accurate"))

# the cross-entropy options, shared with memops::vocab_parallel_ce
CE_OPTIONS = (
    Option("ignore_index", "int", -100),
    REDUCTION,
    Option("label_smoothing", "float", 0.0, V.unit_interval),
    Option("z_loss", "float", 0.0),
    Option("softcap", "float?", None, V.positive),
    Option("logit_scale", "float", 1.0),
    CHUNK_SIZE,
)
# class_weight: F.cross_entropy's ``weight`` (one per class of this process's weight rows), no derivative
CE_INPUTS = (
    *PROJECTION,
    Input("target", grad=True),  # a gradient for probability targets (class indices have none)
    Input("bias", "Tensor?", grad=True),
    NUM_ITEMS,
    Input("class_weight", "Tensor?", refuse_grad=True),
)


def token_shape(a):
    """The per-token shape: ``target``'s, less its class dimension for probability targets."""
    return a.target.shape[:-1] if a.target.is_floating_point() else a.target.shape


def loss_only(a):
    """The loss: compute dtype, ``target``'s shape for ``reduction="none"``, else 0-dim."""
    return (a.input.new_empty(token_shape(a) if a.reduction == "none" else (), dtype=compute_dtype(a.input.dtype)),)


def loss_and_rows(a):
    """A reduced (or per-token) loss and one per-token output, both in the compute dtype."""
    return (*loss_only(a), a.input.new_empty(token_shape(a), dtype=compute_dtype(a.input.dtype)))


def _ce_outputs(a):
    if a.return_is_top1:
        top1 = a.input.new_empty(token_shape(a), dtype=torch.bool)
    else:
        top1 = a.input.new_empty((0,), dtype=compute_dtype(a.input.dtype))
    return (*loss_and_rows(a), top1)


SPEC = register(
    Spec(
        name="linear_ce",
        inputs=CE_INPUTS,
        options=(
            *CE_OPTIONS,
            Option("all_lse", "bool", False),
            Option("return_is_top1", "bool", False),
            Option("lse_grad", "bool", False),
            PRECISION,
        ),
        outputs=("loss", "lse", "is_top1"),
        shapes=_ce_outputs,
        check=check,
        differentiable=("loss", "lse"),
        # a differentiable lse: the loss's gradients are computed with the lse's in backward, not in forward
        scalar=lambda a: a.reduction != "none" and not a.lse_grad,
        detached=lambda a: () if a.lse_grad else ("lse",),
    )
)
