"""``memops::linear_distill``: knowledge distillation without the logits of either model.

Per chunk of tokens the engine builds the student's logits ``z`` (``x @ W.T + b``) and, once per chunk,
the teacher's logits ``u`` of the same rows (``chunk_start``), each in one buffer.  The head then takes,
per row and in fp32, ``q = softmax(z / T)``, ``p = softmax(u / T)`` and

* ``beta == 0``: forward KL(p || q) = ``sum p (log p - log q)``;          d/d(z/T) = ``q - p``
* ``beta == 1``: reverse KL(q || p) = ``sum q (log q - log p)``;          d/d(z/T) = ``q (log q - log p - KL)``
* otherwise, with ``m = beta p + (1 - beta) q``: ``beta KL(p || m) + (1 - beta) KL(q || m)``;
  d/d(z/T) = ``q (g - sum q g)`` with ``g = (1 - beta)(log q - log m)``

(TRL's ``GKDTrainer.generalized_jsd_loss``, ``beta`` 0 and 1 being its special cases), plus
``hard_label_weight`` times the cross-entropy of ``z`` (temperature 1) at the target.  An offline
teacher gives log-probs on its top-k tokens only: ``p`` is their tempered softmax over those k tokens
(renormalised to sum to 1) and the forward KL runs over that support, ``d/d(z/T) = q - p`` (``p`` 0
off the support).  A scalar loss being trained costs four projection-sized matmuls (student and teacher
logits, the student's input and weight gradients), gradients in the forward pass; ``reduction="none"``
recomputes in backward.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import config, validation
from ..contract import Args
from ..meta.distill import SPEC, check_frozen_teacher
from ..meta.vocab_parallel import Layout, resolve
from ..rules import placeholder
from . import engine, family, plan
from .reducer import LOCAL, reducer_of

# several chunk-sized intermediates per head call: bound each step (as for transforms)
_SUB_BLOCK_BYTES = {"cpu": 4 << 20, "other": 256 << 20}


def _divergence(lq: Tensor, q: Tensor, lp: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """Per-row divergence and its derivative with respect to the tempered student logits."""
    if beta == 0:
        p = lp.exp()
        return (p * (lp - lq)).sum(1), q - p
    if beta == 1:
        diff = lq - lp
        div = (q * diff).sum(1)
        return div, q * (diff - div.unsqueeze(1))
    lm = torch.logaddexp(lq + math.log(1 - beta), lp + math.log(beta))
    div = beta * (lp.exp() * (lp - lm)).sum(1) + (1 - beta) * (q * (lq - lm)).sum(1)
    g = (1 - beta) * (lq - lm)
    return div, q * (g - (q * g).sum(1, keepdim=True))


def _teacher_logits(u: Tensor, a: Args, cdt) -> Tensor:
    """The teacher's final logits of a sub-block in the compute dtype: scaled, then soft-capped."""
    u = u.to(cdt)
    if a.teacher_logit_scale != 1.0:
        u = u * a.teacher_logit_scale
    if a.teacher_softcap is not None:
        u = torch.tanh(u / a.teacher_softcap) * a.teacher_softcap
    return u


def chunks(a: Args, x2d, t1d, teacher, upstream: Tensor | None, need, rows, reducer=LOCAL):
    """Per-row losses (and student entropies); gradients of the student's input/weight/bias when
    ``upstream`` is given.  ``teacher``: ``("online", xt2d)`` or ``("offline", ids2d, logprobs2d)``.  With a
    group ``reducer`` the head is :func:`_group_head`'s."""
    n, vocab = x2d.shape[0], reducer.rows_max or a.weight.shape[0]
    cdt = engine.compute_dtype(x2d.dtype)
    outs = engine.RowOutputs(n, cdt, x2d.device, zeroed=("loss", "entropy"))
    entropy = a.return_entropy
    T, beta, h, ignore = a.temperature, a.beta, a.hard_label_weight, a.ignore_index
    state: dict = {}
    accurate = a.precision == "accurate" and x2d.dtype != cdt
    if teacher[0] == "online" and accurate:  # the teacher's logits in fp32 too: its projection upcast once
        tw, tb = a.teacher_weight.to(cdt), None if a.teacher_bias is None else a.teacher_bias.to(cdt)
    elif teacher[0] == "online":
        tw, tb = a.teacher_weight, a.teacher_bias

    def chunk_start(sel):
        state["offset"] = 0
        if teacher[0] == "online":
            xt = teacher[1]
            if getattr(xt, "gathered", False):  # sequence-parallel teacher rows: this chunk's, gathered
                rows_t = xt.rows(sel.start, sel.stop, size)
            else:
                rows_t = xt[sel] if isinstance(sel, slice) else xt.index_select(0, sel)
            state["u"] = F.linear(engine.padded_to(rows_t.to(tw.dtype), size), tw, tb)

    def head(z: Tensor, sel):
        lo = state["offset"]
        state["offset"] = lo + z.shape[0]
        t = t1d[sel].long()
        valid = t != ignore
        safe = torch.where(valid, t, 0).unsqueeze(1)
        loss = torch.zeros(z.shape[0], dtype=cdt, device=z.device)
        dz: Any = None  # d loss / d z, once a term gives one
        if h != 1 or entropy:
            lq = torch.log_softmax(z / T, dim=1)
            q = lq.exp()
            if entropy:
                outs.put("entropy", sel, torch.where(valid, -(q * lq).sum(1), 0.0))
        if h != 1:
            if teacher[0] == "online":
                u = _teacher_logits(state["u"][lo : lo + z.shape[0]], a, cdt)
                lp = torch.log_softmax(u / T, dim=1)
                div, d_div = _divergence(lq, q, lp, beta)
            else:
                ids = teacher[1][sel].long()
                lpk = torch.log_softmax(teacher[2][sel].to(cdt) / T, dim=1)  # the top-k renormalised
                pk = lpk.exp()
                div = torch.where(pk > 0, pk * (lpk - lq.gather(1, ids)), 0.0).sum(1)
                d_div = q.scatter_add_(1, ids, -pk)
            loss = loss + (1 - h) * div
            dz = d_div.mul_((1 - h) / T)
        if h:
            lse = torch.logsumexp(z, dim=1)
            loss = loss + h * (lse - z.gather(1, safe).squeeze(1))
            if upstream is not None:
                hard = torch.softmax(z, dim=1).mul_(h).scatter_add_(1, safe, torch.full_like(lse, -h).unsqueeze(1))
                dz = hard if dz is None else dz.add_(hard)
        outs.put("loss", sel, torch.where(valid, loss, 0.0))
        if upstream is None:
            return None
        return dz.mul_(engine.row_coef(upstream, sel, valid).unsqueeze(1))

    if reducer is not LOCAL:
        head = _group_head(a, t1d, teacher, state, upstream, reducer, outs)
    d = x2d.shape[1] + (teacher[1].shape[1] if teacher[0] == "online" else 0)
    m = n if rows is None else rows.numel()
    size = config.chunk_rows(m, vocab, d, x2d.dtype, x2d.device, a.chunk_size, logit_rows=2)
    sub = _SUB_BLOCK_BYTES["cpu" if x2d.device.type == "cpu" else "other"]
    gx, gw, gb = engine.run(
        x2d,
        a.weight,
        a.bias,
        head,
        logit_scale=a.logit_scale,
        softcap=a.softcap,
        chunk_size=size,
        grad_input=need[0],
        grad_weight=need[1],
        grad_bias=need[2] and a.bias is not None,
        sub_block_bytes=sub,
        rows=rows,
        chunk_start=chunk_start,
        reducer=reducer,
        accurate=accurate,
    )
    ent_rows = outs["entropy"] if entropy else None
    return outs["loss"], ent_rows, engine.grads_out(gx, gw, gb, a.input, a.weight, a.bias)


def _group_head(a: Args, t1d, teacher, state: dict, upstream, reducer, outs: engine.RowOutputs):
    """The head with the vocabulary split over a group: the same per-row formulas (``_divergence``'s), each
    row's maxima, then its sums of exponentials and target logit, then the divergence's sums reduced across
    the group (three reductions per chunk)."""
    T, beta, h, ignore = a.temperature, a.beta, a.hard_label_weight, a.ignore_index
    local = a.weight.shape[0]
    cdt = engine.compute_dtype(a.input.dtype)
    online = teacher[0] == "online"

    def lse_of(v: Tensor, vmax: Tensor, vsum: Tensor) -> Tensor:
        return v - (vmax + vsum.log()).unsqueeze(1)

    def head(z: Tensor, sel):
        lo = state["offset"]
        state["offset"] = lo + z.shape[0]
        t = t1d[sel].long()
        valid = t != ignore
        mine, safe = reducer.owned(torch.where(valid, t, 0), local)
        soft = h != 1 or a.return_entropy
        # each statistic None unless its term is computed (soft: the divergence or entropy; h: the hard label)
        zs: Any = z / T if soft else None
        us: Any = None
        if h != 1 and online:
            us = _teacher_logits(state["u"][lo : lo + z.shape[0]], a, cdt) / T
        mq: Any = None if zs is None else zs.amax(1)
        mp: Any = None if us is None else us.amax(1)
        m1: Any = z.amax(1) if h else None
        reducer.max_(mq, mp, m1)
        sq: Any = None if zs is None else (zs - mq.unsqueeze(1)).exp().sum(1)
        sp: Any = None if us is None else (us - mp.unsqueeze(1)).exp().sum(1)
        s1: Any = (z - m1.unsqueeze(1)).exp().sum(1) if h else None
        z_t: Any = torch.where(mine, z.gather(1, safe.unsqueeze(1)).squeeze(1), 0.0) if h else None
        reducer.sum_(sq, sp, s1, z_t)
        loss = torch.zeros(z.shape[0], dtype=cdt, device=z.device)
        dz: Any = None  # d loss / d z, once a term gives one
        parts: dict = {}
        if soft:
            lq = lse_of(zs, mq, sq)
            q = lq.exp()
            if a.return_entropy:
                parts["ent"] = -(q * lq).sum(1)
        if h != 1:
            if online:
                lp = lse_of(us, mp, sp)
                if beta == 0:
                    p = lp.exp()
                    parts["div"] = (p * (lp - lq)).sum(1)
                    d_div = q - p
                elif beta == 1:
                    diff = lq - lp
                    parts["div"] = (q * diff).sum(1)
                else:
                    lm = torch.logaddexp(lq + math.log(1 - beta), lp + math.log(beta))
                    parts["div"] = beta * (lp.exp() * (lp - lm)).sum(1) + (1 - beta) * (q * (lq - lm)).sum(1)
                    g = (1 - beta) * (lq - lm)
                    parts["qg"] = (q * g).sum(1)
            else:
                ids = teacher[1][sel].long()
                lpk = torch.log_softmax(teacher[2][sel].to(cdt) / T, dim=1)  # the top-k renormalised
                pk = lpk.exp()
                own, idx = reducer.owned(ids, local)
                at = torch.where(own, lq.gather(1, idx), 0.0)
                parts["div"] = torch.where(pk > 0, torch.where(own, pk * -at, 0.0), 0.0).sum(1)
        reducer.sum_(*parts.values())
        if "ent" in parts:
            outs.put("entropy", sel, torch.where(valid, parts["ent"], 0.0))
        if h != 1:
            div = parts["div"]
            if online and beta == 1:
                d_div = q * (diff - div.unsqueeze(1))
            elif online and beta != 0:
                d_div = q * (g - parts["qg"].unsqueeze(1))
            elif not online:
                div = div + torch.where(pk > 0, pk * lpk, 0.0).sum(1)
                d_div = q.scatter_add_(1, idx, torch.where(own, -pk, 0.0))
            loss = loss + (1 - h) * div
            dz = d_div.mul_((1 - h) / T)
        if h:
            lse = m1 + s1.log()
            loss = loss + h * (lse - z_t)
            if upstream is not None:
                hard = (z - lse.unsqueeze(1)).exp_().mul_(h)
                hard.scatter_add_(1, safe.unsqueeze(1), mine.to(cdt).mul_(-h).unsqueeze(1))
                dz = hard if dz is None else dz.add_(hard)
        outs.put("loss", sel, torch.where(valid, loss, 0.0))
        if upstream is None:
            return None
        return dz.mul_(engine.row_coef(upstream, sel, valid).unsqueeze(1))

    return head


def _sharded_teacher(a: Args, reducer) -> Args:
    """With a group ``reducer``, a whole (replicated) online teacher's rows of this rank's vocabulary slice."""
    tw = a.teacher_weight
    if reducer is LOCAL or tw is None or tw.shape[0] == a.weight.shape[0]:
        return a
    rows = slice(reducer.start, reducer.start + a.weight.shape[0])
    return a.replace(teacher_weight=tw[rows], teacher_bias=None if a.teacher_bias is None else a.teacher_bias[rows])


def _prepare(a: Args, reducer):
    """Rows, the teacher as rows, the mask, the engine's reduction and divisor, the row plan."""
    x2d, t1d, _ = engine.flatten(a.input, a.target)
    n = t1d.numel()
    teacher: tuple  # ("online", teacher rows) or ("offline", top-k ids, top-k log-probs)
    finite: tuple[Tensor, ...]
    if a.teacher_weight is not None:
        xt = a.teacher_input.reshape(n, a.teacher_input.shape[-1])
        teacher = ("online", xt)
        scale_t = a.teacher_logit_scale / a.temperature
        also = plan.bounded(xt, a.teacher_weight, a.teacher_bias, scale_t, reducer=reducer)
        finite = ()
    else:
        k = a.teacher_topk_ids.shape[-1]
        lp = a.teacher_topk_logprobs.reshape(n, k)
        teacher = ("offline", a.teacher_topk_ids.reshape(n, k), lp)
        also, finite = None, (lp,)
    valid = t1d != a.ignore_index
    # ignored tokens reach nothing: skipped where exact (student and teacher logits certainly finite)
    scale = abs(a.logit_scale) / a.temperature
    rows = plan.plan(x2d, a.weight, a.bias, scale, needed=valid, finite=finite, bounded_too=also, reducer=reducer).full
    reduction = "mean" if a.reduction == "batchmean" else a.reduction
    # "batchmean" over no unmasked token is 0, as in TRL (its divisor is clamped to 1)
    divisor = a.num_items if a.num_items is not None or reduction != "mean" else valid.sum().clamp(min=1)
    return x2d, t1d, teacher, valid, reduction, divisor, rows


def forward(a: Args, need: list) -> tuple:
    reducer = reducer_of(a)
    vocab = reducer.vocab_of(a.weight)
    validation.check_target_range(a.target, vocab, a.ignore_index)
    if a.teacher_topk_ids is not None:
        validation.check_target_range(a.teacher_topk_ids, vocab, None, "teacher_topk_ids")
    a = _sharded_teacher(a, reducer)
    x2d, t1d, teacher, valid, reduction, divisor, rows = _prepare(a, reducer)
    cdt = engine.compute_dtype(a.input.dtype)
    up = engine.upstream(None, reduction, valid, divisor, cdt) if any(need) else None
    loss_rows, ent_rows, grads = chunks(a, x2d, t1d, teacher, up, need, rows, reducer)
    loss = engine.reduce_rows(loss_rows, reduction, valid, divisor, a.target.shape)
    return (loss, placeholder(loss) if ent_rows is None else ent_rows.view(a.target.shape)), grads


def gradients(a: Args, grad_outputs: list, need: list) -> list:
    reducer = reducer_of(a)
    a = _sharded_teacher(a, reducer)
    x2d, t1d, teacher, valid, reduction, divisor, rows = _prepare(a, reducer)
    up = engine.upstream(grad_outputs[0], reduction, valid, divisor, engine.compute_dtype(a.input.dtype))
    return chunks(a, x2d, t1d, teacher, up, need, rows, reducer)[2]


family.implement(SPEC, forward, gradients)


def linear_distillation_loss(
    student_input: Tensor,
    student_weight: Tensor,
    target: Tensor,
    teacher_input: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    *,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    teacher_topk_ids: Tensor | None = None,
    teacher_topk_logprobs: Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    hard_label_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    num_items: int | float | Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    teacher_logit_scale: float = 1.0,
    teacher_softcap: float | None = None,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    precision: str | None = None,
    _parallel: Layout | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Teacher-student distillation loss of ``student_input @ student_weight.T (+ bias)`` without the logits.

    Per token: ``hard_label_weight * CE(student logits, target) + (1 - hard_label_weight) * D``, where
    ``D`` is TRL's generalized JSD between ``softmax(student / temperature)`` and ``softmax(teacher /
    temperature)`` (``beta=0`` forward KL(teacher || student), ``beta=1`` reverse KL(student || teacher),
    else the ``beta``-skewed JSD).  The teacher is either online (``teacher_input [..., Dt]`` and
    ``teacher_weight [V, Dt]``, any hidden size, the same vocabulary) or offline (``teacher_topk_ids``
    and ``teacher_topk_logprobs``, ``[..., k]`` each: the forward KL over those k tokens, the teacher's
    tempered probabilities renormalised over them; ``beta`` must be 0).  Tokens whose target is
    ``ignore_index`` are masked; ``"batchmean"`` divides by the unmasked token count (or ``num_items``),
    ``"sum"`` sums, ``"none"`` returns per-token losses shaped like ``target``.  Gradients reach the
    student's input, weight and bias; the teacher is frozen (a teacher tensor requiring grad is an error).
    Each model's logits may be scaled (``logit_scale``, ``teacher_logit_scale``) and then soft-capped
    (``softcap``, ``teacher_softcap``: ``c * tanh(logits / c)``) before the temperature, as TRL does for
    Cohere/Granite and Gemma heads.  ``return_entropy=True`` also returns the student's per-token entropy
    of ``softmax(student / temperature)`` (detached; 0 at masked tokens), from the same pass.
    """
    check_frozen_teacher(
        teacher_input=teacher_input,
        teacher_weight=teacher_weight,
        teacher_bias=teacher_bias,
        teacher_topk_logprobs=teacher_topk_logprobs,
    )
    spec, parallel = resolve(SPEC, _parallel)
    loss, entropy, _ = spec.call(
        **parallel,
        input=student_input,
        weight=student_weight,
        target=target,
        bias=student_bias,
        teacher_input=teacher_input,
        teacher_weight=teacher_weight,
        teacher_bias=teacher_bias,
        teacher_topk_ids=teacher_topk_ids,
        teacher_topk_logprobs=teacher_topk_logprobs,
        num_items=num_items,
        beta=beta,
        temperature=temperature,
        hard_label_weight=hard_label_weight,
        ignore_index=ignore_index,
        reduction=reduction,
        logit_scale=logit_scale,
        softcap=softcap,
        teacher_logit_scale=teacher_logit_scale,
        teacher_softcap=teacher_softcap,
        return_entropy=bool(return_entropy),
        chunk_size=chunk_size,
        precision=config.precision_of(precision),
    )
    family.donate(loss)
    return (loss, entropy) if return_entropy else loss
