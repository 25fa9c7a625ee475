"""Row planning: which rows of a call the chunk engine computes, and why.

Every family asks one question with :func:`plan`.  A row is

* **skipped** when its result reaches neither an output nor a gradient (an ignored target whose lse
  nobody asked for, a token with no incoming gradient, a masked GRPO token that provably cannot reach
  the loss) *and* skipping is exact: the unfused reference turns its gradients NaN through such a row
  when the row's logits hold NaN or +inf (softmax backward multiplies a zero upstream by ``exp(nan)``),
  so rows are skipped only when every logit is certainly finite (:func:`bounded`);
* **probed** (GRPO): computed forward only, because its gradient coefficient is zero unless its own
  log-prob turns it non-finite; the family checks that afterwards and computes the few such rows in full.
  Only where every logit is certainly finite as well (:func:`bounded`): a zero row of ``d loss / d logits``
  times an infinite weight entry is NaN in the reference's input gradient;
* **full** otherwise: forward, and gradients when the call wants them.

Small calls (under :data:`PLAN_MIN_MACS` multiply-adds) and sync-free calls (``memops.set_sync_free``,
CUDA-graph capture) compute every row: no plan, no sync.  Computing a row the reference also computes is
always exact, so both paths give the same results; skipping only saves work.

Device-to-host syncs of the default path: :func:`plan` makes at most one (the row counts, read as one
scalar); the bound is a device tensor.  A call also makes one in validation (``check_target_range``) and
GRPO one more after a probe (``nonzero`` of the rows that need a full pass).  ``tests/test_plan.py`` counts
them, and ``tests/test_sync_free.py`` that the sync-free path makes none.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import config


@dataclass(frozen=True)
class Plan:
    full: Tensor | None  # sorted row indices, or None for every row (then there is nothing else)
    probe: Tensor | None  # sorted row indices computed forward only, or None


EVERY_ROW = Plan(None, None)

# Below this many multiply-adds in the whole projection (rows x vocab x hidden) a call computes every
# row: planning (a bound over the inputs, a sync, an index sort) costs more than skipping saves, and
# computing a row the reference also computes is always exact.
PLAN_MIN_MACS = 1 << 18


def _abs_max(t: Tensor | None, device) -> Tensor:
    """``max |t|`` as a float64 0-dim tensor in one pass (NaN if ``t`` holds one; 0 when absent or empty)."""
    if t is None or t.numel() == 0:
        return torch.zeros((), dtype=torch.float64, device=device)
    lo, hi = torch.aminmax(t)
    return torch.maximum(hi, -lo).to(torch.float64)


def bounded(
    x2d: Tensor, weight: Tensor, bias: Tensor | None, logit_scale: float = 1.0, finite: tuple = (), reducer=None
) -> Tensor:
    """Whether every logit is certainly finite and far from overflow, as a bool 0-dim tensor (no sync).

    ``|logit_scale| * (D * max|x| * max|W| + max|b|)``, a bound on every logit, must be finite and far
    below the dtype's largest value (so inputs, weight and bias are free of NaN and inf; fp16, whose
    range is small, may fail it); every tensor in ``finite`` must be free of NaN and inf as well.  With a
    group ``reducer`` (vocabulary parallelism) the maxima are those of the whole weight and of every rank's
    rows (``x2d`` may be sequence-parallel rows, ``ops/reducer.Gathered``), so every rank agrees.
    """
    dev = x2d.device
    maxima = [_abs_max(getattr(x2d, "local", x2d), dev), _abs_max(weight, dev), _abs_max(bias, dev)]
    if reducer is not None and getattr(reducer, "group", None) is not None:
        # a NaN never wins a max reliably across backends: reduce it as +inf (the bound fails either way)
        both = torch.stack(maxima).nan_to_num(nan=torch.inf)
        reducer.max_(both)
        maxima = list(both.unbind())
    xm, wm, bm = maxima
    bound = abs(logit_scale) * (x2d.shape[1] * xm * wm + bm)
    ok = bound < torch.finfo(x2d.dtype).max / 4  # also False for NaN / inf
    for t in finite:
        if t.is_floating_point():
            ok = ok & t.isfinite().all()
    return ok


def plan(
    x2d: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    logit_scale: float,
    *,
    needed: Tensor | None = None,
    probe: Tensor | None = None,
    finite: tuple = (),
    bounded_too: Tensor | None = None,
    ok: Tensor | None = None,
    reducer=None,
) -> Plan:
    """The rows to compute: ``needed`` (bool ``[N]``, None for all) marks the rows whose results matter,
    ``probe`` the needed rows to compute forward only first; rows not needed are skipped where exact
    (:func:`bounded`, with ``finite`` extra tensors whose NaN/inf would reach the reference's gradient, and
    ``bounded_too`` the bound of a second projection of the same rows; ``ok``: the caller's :func:`bounded`
    of this projection, when it has it), else computed in full.  Every row when the call is sync-free.

    With a group ``reducer`` (vocabulary parallelism) every rank must plan the same rows: the size rule reads
    the whole vocabulary and the bound the whole weight (``needed`` / ``probe`` / ``ok`` must agree across the
    group already).  Sequence-parallel rows (``ops/reducer.Gathered``) are all computed."""
    n = x2d.shape[0]
    vocab = getattr(reducer, "vocab", None) or weight.shape[0]
    if (needed is None and probe is None) or n == 0 or n * vocab * x2d.shape[1] < PLAN_MIN_MACS:
        return EVERY_ROW
    if config.is_sync_free(x2d) or getattr(x2d, "gathered", False):
        return EVERY_ROW
    ok = bounded(x2d, weight, bias, logit_scale, finite, reducer) if ok is None else ok
    if bounded_too is not None:
        ok = ok & bounded_too
    full = torch.ones(n, dtype=torch.bool, device=x2d.device) if needed is None else needed | ~ok
    # a probed row's zero gradient is exact only with finite logits and weights (0 * inf is NaN in the
    # reference's input gradient): otherwise every needed row is computed in full
    probe_rows = torch.zeros_like(full) if probe is None else probe & full & ok
    full = full & ~probe_rows
    # the one sync: both counts in one scalar
    packed = int(full.sum() * (n + 1) + probe_rows.sum())
    n_full, n_probe = divmod(packed, n + 1)
    if n_full == n:
        return EVERY_ROW
    order = torch.argsort(torch.where(full, 0, torch.where(probe_rows, 1, 2)).to(torch.int8), stable=True)
    return Plan(order[:n_full], order[n_full : n_full + n_probe] if n_probe else None)


def rows_out(shape, dtype: torch.dtype, device: torch.device, rows: Tensor | None) -> Tensor:
    """A per-row output of ``engine.run``: left uninitialised when every row is computed (each gets
    written), zero-filled when ``rows`` leaves some out."""
    return (torch.empty if rows is None else torch.zeros)(shape, dtype=dtype, device=device)
