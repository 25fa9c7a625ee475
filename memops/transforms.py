"""Built-in transforms for :func:`memops.linear_loss`.

Each is a plain PyTorch function of one chunk of fp32 logits ``[n, V]``, the
chunk's targets ``[n]`` and optional per-token extras, returning a per-row loss
``[n]``; memops derives the gradients.  Use them by name::

    memops.linear_loss(h, W, y, "focal", gamma=2.0)
    memops.linear_loss(h, W, y, "weighted_cross_entropy", extras=(token_weight,))

Built-in transforms (name: per-row value; options or extras):

* ``cross_entropy``: ``-log softmax(z)[y]`` (routed to the fused CE op when it has no extras);
  ``label_smoothing=0.0``
* ``z_loss``: cross-entropy ``+ z_loss * logsumexp(z)**2``; ``z_loss=1e-4``
* ``label_smoothing``: cross-entropy with label smoothing; ``label_smoothing=0.1``
* ``weighted_cross_entropy``: ``weight * cross-entropy``; for class weights pass ``class_weight[target]``
  and, to match ``F.cross_entropy(weight=...)``'s mean, ``num_items=`` the summed weight of the
  non-ignored tokens; extra: ``weight [*]``
* ``focal``: ``-alpha * (1 - p_y)**gamma * log p_y``; ``gamma=2.0``, ``alpha=1.0``
* ``target_logprob``: ``log softmax(z / temperature)[y]`` (a log-probability, not a loss: use
  ``reduction="none"``); ``temperature=1.0``
* ``entropy``: ``-sum softmax(z) * log softmax(z)``; ``temperature=1.0``
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import transform


@transform("cross_entropy")
def cross_entropy(logits, target, label_smoothing: float = 0.0):
    return F.cross_entropy(logits, target, reduction="none", label_smoothing=label_smoothing)


@transform("z_loss")
def z_loss(logits, target, z_loss: float = 1e-4):
    lse = torch.logsumexp(logits, dim=-1)
    return lse - logits.gather(-1, target.unsqueeze(-1)).squeeze(-1) + z_loss * lse.square()


@transform("label_smoothing")
def label_smoothing(logits, target, label_smoothing: float = 0.1):
    return F.cross_entropy(logits, target, reduction="none", label_smoothing=label_smoothing)


@transform("weighted_cross_entropy")
def weighted_cross_entropy(logits, target, weight):
    return weight.to(logits.dtype) * F.cross_entropy(logits, target, reduction="none")


@transform("focal")
def focal(logits, target, gamma: float = 2.0, alpha: float = 1.0):
    logp = torch.log_softmax(logits, dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return -alpha * (1.0 - logp.exp()).pow(gamma) * logp


@transform("target_logprob")
def target_logprob(logits, target, temperature: float = 1.0):
    return torch.log_softmax(logits / temperature, dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)


@transform("entropy")
def entropy(logits, target, temperature: float = 1.0):
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)
