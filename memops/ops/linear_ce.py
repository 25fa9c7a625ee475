"""``memops::linear_ce``: chunked projection + cross-entropy (label smoothing, z-loss, soft-capping).

The family is declared in ``memops/meta/linear_ce.py``; this module gives it its per-chunk head
(:func:`chunks`), its forward and recompute functions and its front end.  With a scalar reduction
the forward pass also computes the loss's gradients (three projection-sized matmuls in all, as in the
unfused baseline); with ``reduction="none"`` the backward op recomputes the chunks with the per-token
``grad_output``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import config, validation
from ..contract import Args
from ..meta.linear_ce import SPEC, token_shape
from ..rules import placeholder
from . import engine, family, plan, triton_heads
from .reducer import LOCAL, Reducer

NO_WEIGHTS = (None, None, None)


def target_weights(a: Args, t1d: Tensor, valid: Tensor, reducer: Reducer = LOCAL):
    """``(class weights, per-row class weight of the target [N] (0 at ignored rows), the weights' total)`` in
    the compute dtype, or ``NO_WEIGHTS`` without ``class_weight``.  ``class_weight`` holds the classes of this
    process's weight rows; with a group ``reducer`` the last two are summed across the group (one all-reduce
    per call)."""
    if a.class_weight is None:
        return NO_WEIGHTS
    cw = a.class_weight.to(engine.compute_dtype(a.input.dtype))
    if t1d is None:  # probability targets: the weights enter per class, not per row
        return cw, None, None
    mine, idx = reducer.owned_valid(t1d.long(), valid, cw.shape[0])
    rows = torch.where(mine, cw[idx], 0.0)
    total = cw.sum()
    if reducer is not LOCAL:
        both = torch.cat([rows, total.reshape(1)])
        reducer.sum_(both)
        rows, total = both[:-1], both[-1]
    return cw, rows, total


class _Head:
    """One call's cross-entropy head: the per-call facts every block reads, computed once, and the per-block
    math (:meth:`classes` for class-index targets, :meth:`probabilities` for probability targets).  Formulas:
    :func:`chunks`."""

    def __init__(
        self, x2d, weight, t1d, upstream, need, a: Args, rows, reducer, top1, valid, weights, probs, lse_up, index
    ):
        n = x2d.shape[0]
        self.a, self.reducer, self.top1, self.probs, self.lse_upstream = a, reducer, top1, probs, lse_up
        self.vocab = reducer.vocab_of(weight)
        self.cdt = cdt = engine.compute_dtype(x2d.dtype)
        # the per-row outputs "loss" (0 where the plan skips rows) and "lse"
        self.outs = engine.RowOutputs(n, cdt, x2d.device, rows, zeroed=("loss",))
        self.cw, self.wt_all, self.w_total = weights
        self.gt = None  # the probability target's gradient [N, V], when asked for
        if probs is not None:
            valid_all = torch.ones(n, dtype=torch.bool, device=x2d.device)
            if upstream is not None and need[2]:
                self.gt = torch.empty(probs.shape, dtype=cdt, device=x2d.device)
        else:  # per-row target facts (a block indexes them by its rows)
            self.t_all = t1d.long()
            valid_all = self.t_all != a.ignore_index if valid is None else valid
            # the target's row in this weight (targets were range-checked: in one process every valid one is)
            if reducer is LOCAL and index is not None:
                self.mine_all, safe = valid_all, index.long()
            else:
                self.mine_all, safe = reducer.owned_valid(self.t_all, valid_all, weight.shape[0])
            self.safe_all = safe.unsqueeze(1)
        self.valid_all = valid_all
        self.coef_all = None if upstream is None else engine.row_coef(upstream, slice(None), valid_all)
        if lse_up is not None and self.coef_all is None:  # only the lse's gradient: the loss's factor is 0
            self.coef_all = torch.zeros(n, dtype=cdt, device=x2d.device)

    def softmax_stats(self, z: Tensor) -> Tensor:
        """z <- exp(z - rowmax) in place (the max reduced across the group); returns the row max ``[n]``."""
        zmax = z.amax(dim=1, keepdim=True)
        self.reducer.max_(zmax)
        z.sub_(zmax).exp_()
        return zmax.squeeze(1)

    def finish(self, zmax: Tensor, total: Tensor, sel) -> Tensor:
        """The lse for the loss; the "lse" output gets the lse as torch.logsumexp gives it.  A row whose max
        is not finite (+-inf, NaN) has a NaN sum of exponentials (``inf - inf`` in ``z - zmax``): there
        log_softmax, hence the loss and its gradient, is NaN, while torch.logsumexp answers the row max.
        Elsewhere the sum is at least 1 (the max's own term), so the lse is at least the max: ``fmax`` (which
        takes the other operand for a NaN one) gives both cases in one op."""
        lse = zmax + total.log()
        self.outs.put("lse", sel, torch.fmax(lse, zmax))
        return lse

    def probabilities(self, z: Tensor, sel):
        cw, vocab, eps, zl = self.cw, self.vocab, self.a.label_smoothing, self.a.z_loss
        # this block's targets (a copy: the user's tensor is never written): q = (1 - eps) p + eps / V, times w
        u = self.probs[sel].to(self.cdt, copy=isinstance(sel, slice))
        if eps:
            u.mul_(1.0 - eps).add_(eps / vocab)
        if cw is not None:
            u.mul_(cw)
        u_sum, uz = u.sum(dim=1), (u * z).sum(dim=1)
        gt_block = None
        if self.gt is not None:  # d loss / d p = coef (1 - eps) w (lse - z): z kept first
            gt_block = self.gt[sel]
            gt_block.copy_(z)
        zmax = self.softmax_stats(z)
        total = z.sum(dim=1)
        lse = self.finish(zmax, total, sel)
        loss = lse * u_sum - uz
        if zl:
            loss = loss + zl * lse.square()
        self.outs.put("loss", sel, loss)
        if self.coef_all is None:
            return None
        coef = self.coef_all[sel]
        if gt_block is not None and self.gt is not None:
            gt_block.sub_(lse.unsqueeze(1)).mul_((coef * (eps - 1.0)).unsqueeze(1))
            if cw is not None:
                gt_block.mul_(cw)
            if not isinstance(sel, slice):
                self.gt[sel] = gt_block
        grow = u_sum + 2.0 * zl * lse if zl else u_sum
        srow = coef * grow if self.lse_upstream is None else coef * grow + self.lse_upstream[sel]
        z.mul_((srow / total).unsqueeze(1))
        return z.sub_(u.mul_(coef.unsqueeze(1)))

    def classes(self, z: Tensor, sel):
        a, cw, vocab, reducer, pick = self.a, self.cw, self.vocab, self.reducer, self.outs.pick
        eps, zl = a.label_smoothing, a.z_loss
        valid, safe = pick(self.valid_all, sel), pick(self.safe_all, sel)
        z_target = z.gather(1, safe).squeeze(1)
        if reducer is not LOCAL:  # summed over the group: the shards that do not hold the target add 0
            z_target = torch.where(self.mine_all[sel], z_target, 0.0)
        # the smoothing term's sum_c w_c z_c (w = 1 without class weights)
        z_sum = (z.sum(dim=1) if cw is None else z @ cw) if eps else None
        if self.top1 is not None:  # the first maximum, as argmax: a tie with an earlier token is not top-1
            self.top1[sel] = valid & (z.argmax(dim=1) == self.t_all[sel])
        zmax = self.softmax_stats(z)
        total = z.sum(dim=1)
        reducer.sum_(total, z_target, z_sum)
        lse = self.finish(zmax, total, sel)
        wt = None if self.wt_all is None else pick(self.wt_all, sel)
        loss = lse - z_target  # an ignored row's (a stand-in target's) is masked below
        if wt is not None:
            loss = wt * loss
        if eps:
            smooth = (lse - z_sum / vocab) if cw is None else (self.w_total * lse - z_sum) / vocab
            loss = (1.0 - eps) * loss + eps * smooth
        if zl:
            loss = loss + zl * (lse.square() if wt is None else wt * lse.square())
        self.outs.put("loss", sel, torch.where(valid, loss, 0.0))
        if self.coef_all is None:
            return None
        coef = pick(self.coef_all, sel)
        # d loss / d z = coef * [softmax * g - eps / V * w - (1 - eps) w_t onehot]
        if wt is None:
            g = 1.0 + 2.0 * zl * lse if zl else None
        else:
            g = (1.0 - eps) * wt + (eps / vocab) * self.w_total
            if zl:
                g = g + 2.0 * zl * wt * lse
        row = coef if g is None else coef * g
        if self.lse_upstream is not None:
            row = row + self.lse_upstream[sel]
        z.mul_((row / total).unsqueeze(1))
        if eps:
            if cw is None:
                z.sub_((coef * (eps / vocab)).unsqueeze(1))
            else:
                z.sub_((coef * (eps / vocab)).unsqueeze(1) * cw)
        onehot = coef * (eps - 1.0) if eps else coef.neg()  # 0 at ignored rows (coef is)
        if wt is not None:
            onehot = onehot * wt
        if reducer is not LOCAL:
            onehot = torch.where(self.mine_all[sel], onehot, 0.0)
        return z.scatter_add_(1, safe, onehot.unsqueeze(1))


def chunks(
    x2d,
    weight,
    t1d,
    bias,
    upstream: Tensor | None,
    need,
    a: Args,
    rows=None,
    reducer: Reducer = LOCAL,
    top1=None,
    valid: Tensor | None = None,
    weights: tuple = NO_WEIGHTS,
    probs: Tensor | None = None,
    lse_upstream: Tensor | None = None,
    index: Tensor | None = None,
):
    """Per-row loss and lse over the rows ``rows`` (``plan.plan``); gradients when ``upstream`` is given.

    ``upstream`` is the per-row (``[N]``) or shared (0-dim) factor that multiplies each non-ignored
    row's d(loss)/d(logits); ignored rows get factor 0.  ``a`` holds the CE options by name.  With a
    group ``reducer``, ``weight`` holds vocabulary rows ``reducer.start ...``: the row max, the sum of
    exponentials, the target logit and the logit sum are reduced across the group, and the gradients
    are this shard's (input gradient: its partial sum).  ``top1`` (bool ``[N]``), when given, gets whether
    each non-ignored row's target is its first most likely token (one process only).  ``valid``: the
    caller's ``t1d != ignore_index``, when it has it.  ``weights``: :func:`target_weights`' triple (class
    weights, ``a.class_weight``: F.cross_entropy's ``weight``).  ``probs`` (``[N, V]``, one process):
    probability targets in place of ``t1d`` (which is then unused), read one block of rows at a time.
    ``need``: gradients of (input, weight, target, bias); the target's, with ``probs``, comes back last as
    ``[N, V]`` in the compute dtype.  ``index`` (one process): the targets with 0 at ignored rows, as
    ``validation.check_target_range`` returns them, when the caller has them.  ``lse_upstream`` (``[N]``, 0
    where the lse output is a constant): the incoming gradient of the lse output, added to each row's
    gradient as ``lse_upstream * softmax`` (d lse / d z = softmax).

    Per row, with ``w`` the class weights (all 1 without them), ``w_t`` the target's, ``W = sum w``,
    ``eps`` the label smoothing, ``zl`` the z-loss and ``lse`` the logsumexp::

        loss = (1 - eps) w_t (lse - z_t) + eps / V (W lse - sum_c w_c z_c) + zl w_t lse^2
        d loss / d z = softmax ((1 - eps) w_t + eps W / V + 2 zl w_t lse) - eps / V w - (1 - eps) w_t onehot

    (torch's label smoothing with class weights; the z-loss weighted like its token).  Probability
    targets ``p``, smoothed to ``q = (1 - eps) p + eps / V`` and weighted ``u = w q``::

        loss = lse sum_c u_c - sum_c u_c z_c + zl lse^2
        d loss / d z = softmax (sum_c u_c + 2 zl lse) - u
    """
    ce = _Head(x2d, weight, t1d, upstream, need, a, rows, reducer, top1, valid, weights, probs, lse_upstream, index)
    head = ce.classes if probs is None else ce.probabilities
    fused = reducer is LOCAL and ce.cw is None and probs is None and lse_upstream is None and triton_heads.wanted(x2d)
    if fused:  # the same head in one Triton kernel per chunk
        head = triton_heads.ce(t1d, ce.coef_all, a, ce.outs.new("loss"), ce.outs.new("lse"), top1)
    gx, gw, gb = engine.run(
        x2d,
        weight,
        bias,
        head,
        logit_scale=a.logit_scale,
        softcap=a.softcap,
        chunk_size=a.chunk_size,
        grad_input=need[0],
        grad_weight=need[1],
        grad_bias=need[3] and bias is not None,
        rows=rows,
        fused=fused,
        reducer=reducer,
        accurate=a.precision == "accurate",
    )
    return ce.outs["loss"], ce.outs["lse"], gx, gw, gb, ce.gt


def _grads_out(gx, gw, gt, gb, a: Args) -> list:
    """The op's gradient outputs (input, weight, target, bias), None where not computed."""
    gx, gw, gb = engine.grads_out(gx, gw, gb, a.input, a.weight, a.bias)
    return [gx, gw, None if gt is None else gt.to(a.target.dtype).view(a.target.shape), gb]


def _rows(a: Args, checked: tuple | None = None):
    """``(x2d, t1d or None, probability targets [N, V] or None, valid [N], index [N] or None)`` of a call
    (``index``: :func:`validation.check_target_range`'s, given as ``checked``)."""
    if a.target.is_floating_point():
        vocab = a.target.shape[-1]
        x2d = a.input.reshape(-1, a.input.shape[-1])
        probs = a.target.reshape(-1, vocab)
        return x2d, None, probs, torch.ones(x2d.shape[0], dtype=torch.bool, device=x2d.device), None
    x2d, t1d, _ = engine.flatten(a.input, a.target)
    if checked is not None:
        n = t1d.shape[0]
        valid, index = checked
        return x2d, t1d, None, *(t if t.dim() == 1 else t.reshape(n) for t in (valid, index))
    return x2d, t1d, None, t1d != a.ignore_index, None


def mean_divisor(a: Args, valid, wt, cdt):
    """``reduction="mean"``'s divisor: ``num_items``, else the targets' class weights' sum (torch's weighted
    mean), else the non-ignored count; probability targets: the row count (torch's mean over rows)."""
    if a.num_items is not None or wt is None or a.target.is_floating_point():
        return engine.denominator(valid, a.num_items, cdt)
    # torch's weighted mean divides the nll part by the targets' weight sum: a zero sum makes that part 0 / 0,
    # so the loss (and every non-ignored row's gradient) is NaN, whatever the smoothing term adds
    total = wt.sum()
    return torch.where(total == 0, torch.nan, total)


def forward(a: Args, need: list) -> tuple:
    checked = None
    if not a.target.is_floating_point():
        checked = validation.check_target_range(a.target, a.weight.shape[0], a.ignore_index)
    x2d, t1d, probs, valid, index = _rows(a, checked)
    cdt = engine.compute_dtype(a.input.dtype)
    weights = target_weights(a, t1d, valid)
    den = mean_divisor(a, valid, weights[1], cdt) if a.reduction == "mean" else None
    up = engine.upstream(None, a.reduction, valid, a.num_items, cdt, den=den) if any(need) else None
    # ignored rows reach no output unless their lse was asked for
    needed = None if (a.all_lse or probs is not None) else valid
    rows = plan.plan(x2d, a.weight, a.bias, a.logit_scale, needed=needed).full
    top1 = torch.zeros(valid.shape, dtype=torch.bool, device=x2d.device) if a.return_is_top1 else None
    loss_rows, lse_rows, gx, gw, gb, gt = chunks(
        x2d,
        a.weight,
        t1d,
        a.bias,
        up,
        need,
        a,
        rows,
        top1=top1,
        valid=valid,
        weights=weights,
        probs=probs,
        index=index,
    )
    shape = token_shape(a)
    loss = engine.reduce_rows(loss_rows, a.reduction, valid, a.num_items, shape, den=den)
    top1 = placeholder(loss) if top1 is None else top1.view(shape)
    if not a.all_lse:  # an ignored row's lse is 0 then, whether the plan computed the row or not
        lse_rows = torch.where(valid, lse_rows, 0.0)
    return (loss, lse_rows if lse_rows.shape == shape else lse_rows.view(shape), top1), _grads_out(gx, gw, gt, gb, a)


def gradients(a: Args, grad_outputs: list, need: list) -> list:
    x2d, t1d, probs, valid, _ = _rows(a)
    cdt = engine.compute_dtype(a.input.dtype)
    weights = target_weights(a, t1d, valid)
    den = mean_divisor(a, valid, weights[1], cdt) if a.reduction == "mean" else None
    g_loss, g_lse = grad_outputs[0], grad_outputs[1] if (a.lse_grad and len(grad_outputs) > 1) else None
    if g_loss is None:  # only the lse's gradient came in
        g_loss = torch.zeros(token_shape(a) if a.reduction == "none" else (), dtype=cdt, device=x2d.device)
    up = engine.upstream(g_loss, a.reduction, valid, a.num_items, cdt, den=den)
    lse_up, needed = None, valid
    if g_lse is not None:
        # the lse output is 0 at ignored rows unless all_lse: a constant there
        lse_up = g_lse.reshape(-1).to(cdt)
        lse_up = lse_up if a.all_lse else torch.where(valid, lse_up, 0.0)
        needed = None if a.all_lse else valid
    rows = plan.plan(x2d, a.weight, a.bias, a.logit_scale, needed=None if probs is not None else needed).full
    *_, gx, gw, gb, gt = chunks(
        x2d, a.weight, t1d, a.bias, up, need, a, rows, valid=valid, weights=weights, probs=probs, lse_upstream=lse_up
    )
    return _grads_out(gx, gw, gt, gb, a)


family.implement(SPEC, forward, gradients)


def linear_cross_entropy(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    num_items: int | float | Tensor | None = None,
    chunk_size: int | None = None,
    precision: str | None = None,
    return_lse: bool = False,
    return_is_top1: bool = False,
    class_weight: Tensor | None = None,
    lse_grad: bool = False,
    shift: bool | int = False,
) -> Tensor | tuple[Tensor, ...]:
    """Cross-entropy of ``logit_scale * (input @ weight.T + bias)`` without materializing the logits.

    Equals ``F.cross_entropy(logits.float(), target, ignore_index=..., reduction=...,
    label_smoothing=...)`` plus ``z_loss * logsumexp(logits)**2`` per non-ignored token,
    where ``logits`` are soft-capped to ``softcap * tanh(logits / softcap)`` when ``softcap``
    is set.  ``num_items`` replaces the token count as the divisor of ``reduction="mean"``.
    With ``return_lse=True`` also returns the per-token logsumexp (shaped like
    ``target``, detached) from the same pass.  Otherwise tokens whose target is
    ``ignore_index`` are not computed at all (when that is exact: see ``ops/plan.py``),
    so padding and prompt tokens cost no matmul work.  With ``return_is_top1=True`` also returns, last,
    whether each token's target is its most likely token (bool, shaped like ``target``, False at ignored
    tokens; a tie with an earlier token does not count, as ``argmax``): the accuracy TRL's SFT logs.

    ``class_weight`` (``[V]``) is ``F.cross_entropy``'s ``weight``: each token's loss is scaled by its
    target's weight, label smoothing uses torch's weighted formula, ``reduction="mean"`` divides by the
    targets' weight sum (``num_items``, when given, replaces it), and the z-loss term is weighted like its
    token.  It gets no gradient (one that requires grad is refused).  A float ``target`` ``[..., V]`` holds
    class probabilities (torch's soft targets: ``ignore_index`` does not apply, ``"mean"`` divides by the
    token count, smoothing and class weights as ``F.cross_entropy``), read one chunk of rows at a time; its
    gradient (``-(1 - eps) w log_softmax`` times the row's incoming gradient) is computed in the same pass
    when it requires grad.

    ``lse_grad=True`` (with ``return_lse``) makes the returned lse differentiable, so a term of the user's
    own on it (a z-loss, an auxiliary loss) trains: its gradient joins the loss's in one backward pass
    (the forward then computes no gradients; the same three projection matmuls in all, plus the forward's
    logits).  ``shift=k`` (``True``: 1) pairs position ``i`` of ``input [..., T, D]`` with
    ``target[..., i + k]`` (the causal-LM shift) without copying the hidden states: the last ``k``
    positions are ignored, and per-token outputs have ``T - k`` positions.
    """
    k = validation.as_shift(shift, target)
    if k:
        pad = torch.full(
            (*target.shape[:-1], min(k, target.shape[-1])), ignore_index, dtype=target.dtype, device=target.device
        )
        target = torch.cat([target[..., k:], pad], dim=-1)
    if lse_grad and not return_lse:
        raise ValueError("lse_grad=True needs return_lse=True (it makes the returned lse differentiable)")
    loss, lse, top1, _ = SPEC.call(
        input=input,
        weight=weight,
        target=target,
        bias=bias,
        num_items=num_items,
        class_weight=class_weight,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        logit_scale=logit_scale,
        chunk_size=chunk_size,
        precision=config.precision_of(precision),
        all_lse=bool(return_lse),
        return_is_top1=bool(return_is_top1),
        lse_grad=bool(lse_grad),
    )
    family.donate(loss)
    if k:  # the per-token outputs of the positions that have a target
        keep = max(target.shape[-1] - k, 0)
        lse, top1 = lse[..., :keep], top1[..., :keep] if return_is_top1 else top1
        if reduction == "none":
            loss = loss[..., :keep]
    out = (loss,) + ((lse,) if return_lse else ()) + ((top1,) if return_is_top1 else ())
    return out if len(out) > 1 else loss
