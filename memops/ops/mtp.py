"""``memops::linear_mtp_ce``: multi-token prediction, every depth's cross-entropy against one head in one pass.

The family is declared in ``memops/meta/mtp.py``.  The ``D`` depths' hidden states are the rows of one chunk
loop (``[D * N, H]``, depth-major), each row with its depth's shifted target and its depth's factor, so every
chunk of logits is one pass of cross-entropy's head (:func:`linear_ce.chunks`: label smoothing, z-loss,
soft-capping, class weights, the Triton head on GPUs), the weight is read once per chunk for every depth and
one fp32 weight-gradient accumulator takes all of them.  A trained scalar loss gets its gradients in the same
pass: three projection matmuls per depth's rows, as the unfused code's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .. import config, validation
from ..contract import Args
from ..meta.mtp import SPEC
from ..meta.vocab_parallel import Layout, resolve
from . import engine, family, linear_ce, plan
from .reducer import LOCAL, reducer_of


def depth_targets(target: Tensor, shifts: Sequence[int], ignore_index: int, position_ids: Tensor | None) -> Tensor:
    """``[D, *tokens]``: depth ``k``'s target at position ``t`` is ``target[..., t + shifts[k]]``, or
    ``ignore_index`` where that position is past the sequence's end or (with ``position_ids``) in another
    document.  A document starts at a position whose id is not its predecessor's plus one."""
    length = target.shape[-1]
    doc = None
    if position_ids is not None:
        pos = position_ids.long()
        start = torch.ones_like(pos, dtype=torch.bool)
        start[..., 1:] = pos[..., 1:] != pos[..., :-1] + 1
        doc = start.cumsum(-1)
    out = []
    for s in shifts:
        k = min(s, length)
        pad = target.new_full((*target.shape[:-1], k), ignore_index)
        t = torch.cat([target[..., k:], pad], dim=-1)
        if doc is not None and k:
            same = torch.cat([doc[..., k:] == doc[..., :-k], torch.zeros_like(pad, dtype=torch.bool)], dim=-1)
            t = torch.where(same, t, ignore_index)
        out.append(t)
    return torch.stack(out)


class _Depths:
    """One call's rows and per-depth facts: the ``[D * N, H]`` rows, their targets, which count, the class
    weights, and each depth's divisor of ``reduction="mean"``."""

    def __init__(self, a: Args, reducer=LOCAL):
        self.depths = a.input.shape[0]
        self.cdt = engine.compute_dtype(a.input.dtype)
        targets = depth_targets(a.target, a.shifts, a.ignore_index, a.position_ids)
        self.x2d = a.input.reshape(-1, a.input.shape[-1])
        self.t1d = targets.reshape(-1)
        self.valid = self.t1d != a.ignore_index
        self.weights = linear_ce.target_weights(a, self.t1d, self.valid, reducer)
        self.dw = a.depth_weight.to(self.cdt)
        self.den = None
        if a.reduction == "mean":
            valid, wt = self.valid.view(self.depths, -1), self.weights[1]
            self.den = torch.stack(
                [
                    linear_ce.mean_divisor(a, valid[k], None if wt is None else wt.view(self.depths, -1)[k], self.cdt)
                    for k in range(self.depths)
                ]
            )

    def upstream(self, a: Args, grad: Tensor | None) -> Tensor:
        """Each row's factor on its d loss / d logits: depth ``k``'s weight (over its divisor for ``"mean"``),
        times the incoming gradient (``None``: 1; per position for ``"none"``)."""
        per_depth = self.dw if self.den is None else self.dw / self.den
        rows = per_depth.unsqueeze(1).expand(self.depths, self.t1d.numel() // self.depths)
        if grad is None:
            return rows.reshape(-1)
        g = grad.to(self.cdt)
        return (rows * (g.reshape(1, -1) if a.reduction == "none" else g)).reshape(-1)

    def reduce(self, a: Args, loss_rows: Tensor) -> tuple[Tensor, Tensor]:
        """``(loss, per_depth)`` from the rows' losses: each depth's sum in float64, over its divisor, and the
        depths' weighted total, each rounded once."""
        rows = loss_rows.view(self.depths, -1)
        if a.reduction == "none":
            tokens = a.target.shape
            total = (rows.double() * self.dw.double().unsqueeze(1)).sum(0).to(self.cdt)
            return total.view(tokens), rows.view(self.depths, *tokens)
        sums = rows.sum(1, dtype=torch.float64)
        per_depth = sums if self.den is None else sums / self.den.double()
        total = (per_depth * self.dw.double()).sum()
        return total.to(self.cdt), per_depth.to(self.cdt)


def _chunks(a: Args, d: _Depths, up: Tensor | None, need, reducer):
    # the rows whose result reaches nothing (ignored at their depth) are skipped in one process
    rows = plan.plan(d.x2d, a.weight, a.bias, a.logit_scale, needed=d.valid).full if reducer is LOCAL else None
    loss_rows, _, gx, gw, gb, _ = linear_ce.chunks(
        d.x2d, a.weight, d.t1d, a.bias, up, need, a, rows, reducer, valid=d.valid, weights=d.weights
    )
    return loss_rows, engine.grads_out(gx, gw, gb, a.input, a.weight, a.bias)


def forward(a: Args, need: list) -> tuple:
    reducer = reducer_of(a)
    validation.check_target_range(a.target, reducer.vocab_of(a.weight), a.ignore_index)
    d = _Depths(a, reducer)
    up = d.upstream(a, None) if any(need) else None
    loss_rows, (gx, gw, gb) = _chunks(a, d, up, need, reducer)
    return d.reduce(a, loss_rows), [gx, gw, None, gb]


def gradients(a: Args, grad_outputs: list, need: list) -> list:
    reducer = reducer_of(a)
    d = _Depths(a, reducer)
    _, (gx, gw, gb) = _chunks(a, d, d.upstream(a, grad_outputs[0]), need, reducer)
    return [gx, gw, None, gb]


family.implement(SPEC, forward, gradients)


def linear_mtp_cross_entropy(
    hiddens: Tensor | Sequence[Tensor],
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    *,
    shifts: Sequence[int] | None = None,
    depth_weights: Sequence[float] | Tensor | None = None,
    position_ids: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    num_items: int | float | Tensor | None = None,
    class_weight: Tensor | None = None,
    chunk_size: int | None = None,
    precision: str | None = None,
    _parallel: Layout | None = None,
) -> tuple[Tensor, Tensor]:
    """Multi-token prediction: the cross-entropy of every depth's hidden states against one output head, in one
    call, without the logits.  Returns ``(loss, per_depth)``.

    ``hiddens``: the ``D`` depths' hidden states, a ``[D, *tokens, H]`` tensor or a list of ``D`` tensors
    ``[*tokens, H]`` (stacked: one copy; pass the tensor to avoid it).  ``target``: ``[*tokens]`` class indices,
    unshifted (the input ids, or labels with ``ignore_index`` where nothing is predicted); depth ``k``
    predicts ``target[..., t + shifts[k]]`` from position ``t`` (default ``shifts = (1, 2, ..., D)``: the main
    head's next token, then each MTP module's one further).  Positions whose shifted target is past the end
    of the sequence, or with ``position_ids`` (packed sequences: a document starts where the id is not its
    predecessor's plus one, as the positions restart) in another document, are ignored at that depth.

    Per depth the loss is ``memops.linear_cross_entropy``'s with every option (``ignore_index``,
    ``label_smoothing``, ``z_loss``, ``softcap``, ``logit_scale``, ``class_weight``; ``"mean"`` over that
    depth's counted targets, or ``num_items``); ``per_depth`` holds them (``[D]``; ``[D, *tokens]`` for
    ``reduction="none"``), detached, and ``loss = sum_k depth_weights[k] * per_depth[k]`` (default weights
    1; a tensor may change between steps without a recompile).  Gradients flow to ``hiddens``, ``weight`` and
    ``bias``; a trained scalar loss gets them in the same pass.
    """
    if isinstance(hiddens, (list, tuple)):
        if not hiddens:
            raise ValueError("hiddens must hold at least one depth's hidden states")
        hiddens = torch.stack(list(hiddens))
    if not isinstance(hiddens, Tensor):
        raise TypeError(f"hiddens must be a Tensor or a list of Tensors, got {type(hiddens).__name__}")
    depths = hiddens.shape[0] if hiddens.dim() else 0
    if shifts is None:
        shifts = tuple(range(1, depths + 1))
    if depth_weights is None:
        depth_weights = torch.ones(depths, dtype=torch.float64, device=hiddens.device)
    elif not isinstance(depth_weights, Tensor):
        # float64 (Python floats exactly; the op rounds to its dtype), filled on the device: no host-to-device
        # copy, so the call stays capturable in a CUDA graph
        depth_weights = torch.stack(
            [engine.scalar_on(float(w), torch.float64, hiddens.device) for w in depth_weights]
            or [hiddens.new_zeros((), dtype=torch.float64)]
        )
    spec, layout = resolve(SPEC, _parallel)
    loss, per_depth, _ = spec.call(
        **layout,
        input=hiddens,
        weight=weight,
        target=target,
        bias=bias,
        num_items=num_items,
        class_weight=class_weight,
        depth_weight=depth_weights,
        position_ids=position_ids,
        shifts=shifts,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        logit_scale=logit_scale,
        chunk_size=chunk_size,
        precision=config.precision_of(precision),
    )
    family.donate(loss)
    return loss, per_depth
