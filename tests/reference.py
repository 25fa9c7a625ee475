"""The one unfused reference every test compares against: logits are built in full."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ref_logits(input, weight, bias=None, *, softcap=None, logit_scale=1.0):
    logits = logit_scale * F.linear(input, weight, bias)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits if logits.dtype == torch.float64 else logits.float()


def ref_linear_cross_entropy(
    input,
    weight,
    target,
    bias=None,
    *,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    logit_scale=1.0,
    num_items=None,
    class_weight=None,
):
    """``F.cross_entropy`` of the full logits (``weight=class_weight``; a float ``target [..., V]`` holds
    probabilities), plus ``z_loss * lse**2`` per non-ignored token weighted like the token (its target's
    class weight; 1 for probability targets) and divided like the loss."""
    vocab = weight.shape[0]
    logits = ref_logits(input, weight, bias, softcap=softcap, logit_scale=logit_scale)
    flat = logits.reshape(-1, vocab)
    probs = target.is_floating_point()
    t = target.reshape(-1, vocab).to(flat.dtype) if probs else target.reshape(-1).long()
    cw = None if class_weight is None else class_weight.to(flat.dtype)
    red = "sum" if num_items is not None else reduction
    kw = {} if probs else {"ignore_index": ignore_index}
    loss = F.cross_entropy(flat, t, weight=cw, reduction=red, label_smoothing=label_smoothing, **kw)
    if z_loss:
        valid = torch.ones(flat.shape[0], dtype=torch.bool) if probs else t != ignore_index
        zz = torch.logsumexp(flat, dim=-1) ** 2
        wt = None if probs or cw is None else cw[torch.where(valid, t, 0)]
        zz = torch.where(valid, zz if wt is None else wt * zz, 0.0)
        if red == "none":
            loss = loss + z_loss * zz
        elif red == "sum":
            loss = loss + z_loss * zz.sum()
        else:
            loss = loss + z_loss * zz.sum() / (valid.sum() if wt is None else torch.where(valid, wt, 0.0).sum())
    if num_items is not None:
        loss = loss / num_items
    shape = target.shape[:-1] if probs else target.shape
    return loss.reshape(shape) if reduction == "none" else loss


def ref_linear_loss(
    input,
    weight,
    target,
    fn,
    bias=None,
    *,
    extras=(),
    reduction="mean",
    ignore_index=-100,
    num_items=None,
    softcap=None,
    logit_scale=1.0,
    **options,
):
    """``fn`` on the full logits, ignored rows zeroed, then reduced."""
    logits = ref_logits(input, weight, bias, softcap=softcap, logit_scale=logit_scale)
    n = target.numel()
    t = target.reshape(n).long()
    valid = t != ignore_index
    rows = [e.reshape((n,) + tuple(e.shape[target.dim() :])) for e in extras]
    out = fn(logits.reshape(n, weight.shape[0]), torch.where(valid, t, 0), *rows, **options)
    out = torch.where(valid, out, 0.0)
    if reduction == "none":
        return out.reshape(target.shape)
    if reduction == "sum":
        return out.sum()
    return out.sum() / (num_items if num_items is not None else valid.sum())


def ref_kept(sampling_mask, target, vocab):
    """The dense ``[..., V]`` kept set of a sampling mask (ids, -1 padding), with each token's target."""
    ids = sampling_mask.long()
    keep = torch.zeros((*ids.shape[:-1], vocab + 1), dtype=torch.bool, device=ids.device)
    keep.scatter_(-1, torch.where(ids >= 0, ids, vocab), True)
    keep = keep[..., :vocab].clone()
    keep.scatter_(-1, target.long().unsqueeze(-1), True)
    return keep


def ref_linear_logprobs(
    input,
    weight,
    target,
    bias=None,
    *,
    temperature=1.0,
    logit_scale=1.0,
    softcap=None,
    sampling_mask=None,
    entropy_over="full",
):
    """Per-token ``log p(target)`` and entropy of ``softmax(logits / temperature)``; with ``sampling_mask``
    the log-probability of the softmax over the kept ids (and the target), the entropy the full vocabulary's
    or (``entropy_over="kept"``) the kept set's."""
    if isinstance(temperature, torch.Tensor):  # one per token (broadcast to the targets), after soft-capping
        temperature = temperature.expand(target.shape).unsqueeze(-1).to(input.dtype)
    logits = ref_logits(input, weight, bias, softcap=softcap, logit_scale=logit_scale) / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    if sampling_mask is not None:
        keep = ref_kept(sampling_mask, target, logits.shape[-1])
        logp_all = torch.log_softmax(logits.masked_fill(~keep, -torch.inf), dim=-1)
        if entropy_over == "kept":  # 0 * -inf kept out of the backward too
            kept_logp = logp_all.masked_fill(~keep, 0.0)
            entropy = -torch.where(keep, kept_logp.exp() * kept_logp, 0.0).sum(-1)
    logp = logp_all.gather(-1, target.long().unsqueeze(-1)).squeeze(-1)
    return logp, entropy


def ref_logprob_extras(input, weight, target, bias=None, *, temperature=1.0, logit_scale=1.0, softcap=None):
    """TRL's extra per-token outputs of its fused LM head: ``log sum_v p_v^2``, the mean tempered logit, and
    whether the target is the first most likely token."""
    logits = ref_logits(input, weight, bias, softcap=softcap, logit_scale=logit_scale) / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    return {
        "log_sum_sq_probs": torch.logsumexp(2 * logp_all, dim=-1),
        "mean_logits": logits.mean(-1),
        "is_top1": logits.argmax(-1) == target.long(),
    }


def ref_grpo_loss(
    input,
    weight,
    completion_ids,
    completion_mask,
    advantages,
    *,
    bias=None,
    old_logprobs=None,
    ref_logprobs=None,
    beta=0.0,
    epsilon_low=0.2,
    epsilon_high=0.2,
    temperature=1.0,
    loss_type="grpo",
    max_completion_length=None,
    sampling_mask=None,
):
    """TRL's GRPOTrainer loss, written from its published formulas, on full logits (log-probs over the kept set
    of ``sampling_mask`` when given)."""
    logp, _ = ref_linear_logprobs(
        input, weight, completion_ids, bias, temperature=temperature, sampling_mask=sampling_mask
    )
    old = logp.detach() if old_logprobs is None else old_logprobs
    coef_1 = torch.exp(logp - old)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    per_token_loss = -torch.min(coef_1 * advantages.unsqueeze(1), coef_2 * advantages.unsqueeze(1))
    if beta != 0.0:
        per_token_kl = torch.exp(ref_logprobs - logp) - (ref_logprobs - logp) - 1
        per_token_loss = per_token_loss + beta * per_token_kl
    mask = completion_mask.to(per_token_loss.dtype)
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * (max_completion_length or mask.size(1)))
    else:  # bnpo; dapo with the batch's own active-token count as num_items_in_batch
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    return loss, logp


def generalized_jsd(student_logits, teacher_logits, beta=0.5, temperature=1.0):
    """TRL 1.16's ``GKDTrainer.generalized_jsd_loss`` per token (before its masking and reduction), on full
    ``[n, V]`` logits: ``beta=0`` forward KL(teacher || student), ``beta=1`` reverse KL(student || teacher),
    else ``beta KL(teacher || m) + (1 - beta) KL(student || m)`` with ``m = beta p_t + (1 - beta) p_s``."""
    s = F.log_softmax(student_logits / temperature, dim=-1)
    t = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(s, t, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(t, s, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=s.dtype)
        mixture = torch.logsumexp(torch.stack([s + torch.log(1 - b), t + torch.log(b)]), dim=0)
        jsd = b * F.kl_div(mixture, t, reduction="none", log_target=True) + (1 - b) * F.kl_div(
            mixture, s, reduction="none", log_target=True
        )
    return jsd.sum(-1)


def topk_forward_kl(student_logits, ids, logprobs, temperature=1.0):
    """Forward KL over the teacher's top-k support, its tempered probabilities renormalised over it."""
    s = F.log_softmax(student_logits / temperature, dim=-1)
    p = torch.softmax(logprobs.to(s.dtype) / temperature, dim=-1)
    return torch.xlogy(p, p).sum(-1) - (p * s.gather(-1, ids.long())).sum(-1)


def ref_distillation(
    x,
    w,
    target,
    xt=None,
    wt=None,
    *,
    b=None,
    bt=None,
    ids=None,
    lps=None,
    beta=0.5,
    temperature=1.0,
    hard_label_weight=0.0,
    ignore_index=-100,
    reduction="batchmean",
    num_items=None,
    logit_scale=1.0,
    softcap=None,
    teacher_logit_scale=1.0,
    teacher_softcap=None,
    return_entropy=False,
):
    """``h * CE + (1 - h) * D`` per token over full logits; TRL's masking (selection) and reductions
    ("batchmean" over no unmasked token is 0: TRL clamps its divisor to 1).  With ``return_entropy``
    also the student's tempered entropy per token (0 at masked tokens)."""
    n = target.numel()
    z = ref_logits(x, w, b, softcap=softcap, logit_scale=logit_scale).reshape(n, w.shape[0])
    t = target.reshape(n)
    mask = t != ignore_index
    loss = torch.zeros(n, dtype=z.dtype)
    h = hard_label_weight
    if h != 1:
        if wt is not None:
            u = ref_logits(xt, wt, bt, softcap=teacher_softcap, logit_scale=teacher_logit_scale)
            div = generalized_jsd(z[mask], u.reshape(n, w.shape[0]).to(z.dtype)[mask], beta, temperature)
        else:
            k = ids.shape[-1]
            div = topk_forward_kl(z[mask], ids.reshape(n, k)[mask], lps.reshape(n, k)[mask], temperature)
        loss = loss.index_put((mask,), (1 - h) * div, accumulate=True)
    if h:
        ce = F.cross_entropy(z, t, ignore_index=ignore_index, reduction="none")
        loss = loss + h * ce
    if reduction == "none":
        out = loss.view(target.shape)
    elif reduction == "sum":
        out = loss.sum()
    else:
        out = loss.sum() / (mask.sum().clamp(min=1) if num_items is None else num_items)
    if not return_entropy:
        return out
    lq = F.log_softmax(z.detach() / temperature, dim=-1)
    entropy = torch.where(mask, -(lq.exp() * lq).sum(-1), 0.0)
    return out, entropy.view(target.shape)


def ref_mtp_cross_entropy(
    hiddens, weight, target, bias=None, *, shifts=None, depth_weights=None, position_ids=None, **ce_options
):
    """Multi-token prediction as ``D`` separate cross-entropies: depth ``k`` pairs position ``t`` of
    ``hiddens[k]`` with ``target[..., t + shifts[k]]``, found position by position (ignored past the end and,
    with ``position_ids``, across a document start: an id that is not its predecessor's plus one); returns
    ``(sum_k depth_weights[k] * loss_k, stacked loss_k)``."""
    ignore = ce_options.get("ignore_index", -100)
    depths, length = hiddens.shape[0], target.shape[-1]
    shifts = list(range(1, depths + 1)) if shifts is None else list(shifts)
    weights = [1.0] * depths if depth_weights is None else [float(w) for w in depth_weights]
    rows_t = target.reshape(-1, length)
    rows_p = None if position_ids is None else position_ids.reshape(-1, length)
    losses = []
    for k, s in enumerate(shifts):
        shifted = torch.full_like(rows_t, ignore)
        for r in range(rows_t.shape[0]):
            for t in range(length - s):
                crosses = rows_p is not None and any(
                    int(rows_p[r, u]) != int(rows_p[r, u - 1]) + 1 for u in range(t + 1, t + s + 1)
                )
                if not crosses:
                    shifted[r, t] = rows_t[r, t + s]
        losses.append(ref_linear_cross_entropy(hiddens[k], weight, shifted.view(target.shape), bias, **ce_options))
    per_depth = torch.stack(losses)
    total = sum(w * loss for w, loss in zip(weights, losses))
    return total, per_depth
