"""Triton kernels of the chunk heads (imported only when a Triton head runs: ``ops/triton_heads.py``).

One program per row of a chunk's ``[rows, V]`` logits block ``Z``, which holds the projection GEMM's
output in its own dtype (bf16 for bf16 inputs).  The program walks the row in ``BLOCK`` -wide vocabulary
tiles twice at most:

1. *statistics*: each tile is loaded, upcast to the compute dtype (fp32, fp64 for fp64 inputs) and turned
   into the final logits ``y = post * softcap(scale * z)``; the row max ``m``, ``s = sum exp(y - m)`` and
   what the head asks for (``sum exp(y - m) (y - m)`` for the entropy, ``sum exp(2 (y - m))``, ``sum y``,
   the first arg-max) are kept online, rescaled when ``m`` grows; whether the row holds a NaN is read from
   ``s`` at the end;
2. *gradient*: each tile is loaded again and ``d loss / d z = dy/dz * (p (A + B log p) + C + D onehot)``
   (``p = exp(y - m) / s``, per-row ``A, B, C, D`` from the head's formula) is stored over it in place, in
   ``Z``'s dtype, which the gradient GEMMs then read as they are.

So a head reads the block twice and writes it once: ``3 * itemsize`` bytes per logit (6 for bf16).
Non-finite logits follow the torch head (``ops/linear_ce.py``, ``ops/logprobs.py``) exactly: a row with a
NaN, a ``+inf`` or only ``-inf`` logits gets a NaN loss, log-prob and entropy (its lse is what
``torch.logsumexp`` gives) and a NaN gradient row; the arg-max of a row with NaN is its first NaN, as
``torch.argmax``.
"""

from __future__ import annotations

import triton
import triton.language as tl

# per-row statistics saved between the forward and the gradient launch of a two-launch head (GRPO)
STATS = 3  # the row's shift (its max, 0 when not finite), s (NaN when not finite), entropy


@triton.jit
def _option(hi, lo, CDT: tl.constexpr):
    """A float option passed as two fp32 scalars (Triton types a Python float as fp32): ``hi`` is the
    option rounded to fp32, ``lo`` the rest; their sum in the compute dtype is the option to 48 bits (fp64),
    or ``hi`` itself (fp32).  Scalars, not a tensor of options: nothing is copied to the device per call,
    so a captured CUDA graph replays no copy from freed host memory."""
    return tl.cast(hi, tl.float32).to(CDT) + tl.cast(lo, tl.float32).to(CDT)


@triton.jit
def _logits(z_row, cols, mask, p_scale, p_softcap, p_post, SOFTCAP: tl.constexpr, CDT: tl.constexpr):
    """One tile's final logits (``-inf`` outside the row) and ``dy/dz``."""
    z = tl.load(z_row + cols, mask=mask, other=0.0).to(CDT)
    y = z * p_scale
    if SOFTCAP:
        u = y / p_softcap
        e = tl.exp(-2.0 * tl.abs(u))  # tanh(|u|) = (1 - e) / (1 + e): exact at +-inf, NaN stays NaN
        th = (1.0 - e) / (1.0 + e)
        th = tl.where(u < 0, -th, th)
        y = p_softcap * th
        slope = (1.0 - th * th) * (p_scale * p_post)
    else:
        slope = tl.zeros_like(y) + p_scale * p_post
    y = y * p_post
    return tl.where(mask, y, float("-inf")), slope


@triton.jit
def _one_logit(z_row, col, p_scale, p_softcap, p_post, SOFTCAP: tl.constexpr, CDT: tl.constexpr):
    """The final logit at column ``col`` (the target's), computed as in :func:`_logits`."""
    y = tl.load(z_row + col).to(CDT) * p_scale
    if SOFTCAP:
        u = y / p_softcap
        e = tl.exp(-2.0 * tl.abs(u))
        th = (1.0 - e) / (1.0 + e)
        th = tl.where(u < 0, -th, th)
        y = p_softcap * th
    return y * p_post


@triton.jit
def _row_stats(
    z_row,
    V,
    p_scale,
    p_softcap,
    p_post,
    SOFTCAP: tl.constexpr,
    ENTROPY: tl.constexpr,
    SQUARES: tl.constexpr,
    SUM: tl.constexpr,
    ARGMAX: tl.constexpr,
    BLOCK: tl.constexpr,
    CDT: tl.constexpr,
):
    """Online statistics of one row: (m, s, ent_sum, sq_sum, y_sum, argmax, nans).

    ``nans`` is 1 for a row with a NaN logit and 0 without, read from ``s`` once after the loop (no count
    reduction per tile).  ``m`` is the max over non-NaN logits, ``s = sum exp(y - m)``,
    ``ent_sum = sum exp(y - m) (y - m)``, ``sq_sum = sum exp(2 (y - m))``, ``y_sum = sum y``; the shift is 0
    while the max is ``-inf``."""
    ninf = float("-inf")
    big = V + 1
    m = tl.full([], ninf, CDT)
    s = tl.zeros([], CDT)
    ent = tl.zeros([], CDT)
    sq = tl.zeros([], CDT)
    tot = tl.zeros([], CDT)
    best = tl.full([], ninf, CDT)
    best_i = tl.full([], big, tl.int32)
    nan_i = tl.full([], big, tl.int32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        y, _ = _logits(z_row, cols, mask, p_scale, p_softcap, p_post, SOFTCAP, CDT)
        isnan = y != y
        y_num = tl.where(isnan, ninf, y)
        t_max = tl.max(y_num, axis=0)
        if ARGMAX:
            t_i = tl.min(tl.where((y_num == t_max) & mask, cols, big), axis=0)
            take = (t_max > best) | (best_i == big)
            best_i = tl.where(take, t_i, best_i)
            best = tl.where(take, t_max, best)
            nan_i = tl.minimum(nan_i, tl.min(tl.where(isnan, cols, big), axis=0))
        m_new = tl.maximum(m, t_max)
        shift = tl.where(m_new == ninf, 0.0, m_new)
        # exp(0) where a value equals the shift (the same 1 for finite values; 1, not NaN, for a +inf), so
        # s is NaN exactly when the row holds a NaN and counts the +inf logits of a row whose max is +inf
        alpha = tl.where(m == shift, 1.0, tl.exp(m - shift))
        e = tl.where(mask, tl.where(y == shift, 1.0, tl.exp(y - shift)), 0.0)
        if ENTROPY:  # sum e (y - m) re-based from the old shift to the new one
            old = tl.where(m == ninf, 0.0, m)
            moved = tl.where(s == 0, 0.0, (old - shift) * s)
            ent = alpha * (ent + moved) + tl.sum(e * (tl.where(mask, y, shift) - shift), axis=0)
        if SQUARES:
            sq = alpha * alpha * sq + tl.sum(e * e, axis=0)
        if SUM:
            tot += tl.sum(tl.where(mask, y, 0.0), axis=0)
        s = alpha * s + tl.sum(e, axis=0)
        m = m_new
    nans = (s != s).to(tl.int32)  # 1 for a row with a NaN logit (NaN reaches s), else 0: no count per tile
    arg = tl.where(nans > 0, nan_i, best_i)
    return m, s, ent, sq, tot, arg, nans


@triton.jit
def _rne_bf16(x):
    """fp32 -> bf16 rounded to nearest even by hand.  Compiled kernels round so in ``.to()``; the Triton
    interpreter truncates instead (triton 3.6 - 3.9), which would make the interpreter tests measure an error
    the GPU does not make."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return tl.where(x != x, x.to(tl.bfloat16), rounded)


@triton.jit
def _grad_pass(
    z_row,
    V,
    target,
    m,
    s,
    A,
    B,
    C,
    D,
    p_scale,
    p_softcap,
    p_post,
    SOFTCAP: tl.constexpr,
    LOGP: tl.constexpr,
    RNE_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
    CDT: tl.constexpr,
):
    """Store ``dy/dz * (p (A + B log p) + C + D onehot(target))`` over the row, in ``Z``'s dtype.  ``m`` is
    the row's shift, ``s`` its sum of ``exp(y - m)``; ``A`` is NaN for a row whose softmax is not finite."""
    inv_s = 1.0 / s
    log_s = tl.log(s)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        y, slope = _logits(z_row, cols, mask, p_scale, p_softcap, p_post, SOFTCAP, CDT)
        shifted = tl.where(mask, y - m, 0.0)
        e = tl.exp(shifted)
        if LOGP:
            g = e * (A + B * (shifted - log_s)) * inv_s
        else:
            g = e * (A * inv_s)
        g = g + C + tl.where(cols == target, D, 0.0)
        g = g * slope
        if RNE_BF16:
            tl.store(z_row + cols, _rne_bf16(g.to(tl.float32)), mask=mask)
        else:
            tl.store(z_row + cols, g.to(z_row.dtype.element_ty), mask=mask)


@triton.jit
def ce_head(
    Z,
    stride,
    V,
    scale_hi,
    scale_lo,
    cap_hi,
    cap_lo,
    eps_hi,
    eps_lo,
    zl_hi,
    zl_lo,
    T,
    COEF,
    LOSS,
    LSE,
    TOP1,
    ignore_index,
    SOFTCAP: tl.constexpr,
    SMOOTH: tl.constexpr,
    ZLOSS: tl.constexpr,
    GRAD: tl.constexpr,
    WANT_TOP1: tl.constexpr,
    RNE_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
    CDT: tl.constexpr,
):
    """Cross-entropy of one row: loss, lse, top-1, and (``GRAD``) ``d loss / d z`` times ``COEF[row]``.

    The float options (logit scale, soft-cap, label smoothing, z-loss) come as scalar arguments, each an fp32
    ``hi + lo`` pair (:func:`_option`)."""
    row = tl.program_id(0)
    z_row = Z + row.to(tl.int64) * stride
    p_scale = _option(scale_hi, scale_lo, CDT)
    p_softcap = _option(cap_hi, cap_lo, CDT)
    eps = _option(eps_hi, eps_lo, CDT)
    zl = _option(zl_hi, zl_lo, CDT)
    t = tl.load(T + row)
    valid = t != ignore_index
    t_safe = tl.where(valid, t, 0)
    y_t = _one_logit(z_row, t_safe, p_scale, p_softcap, 1.0, SOFTCAP, CDT)
    m, s, _, _, tot, arg, nans = _row_stats(
        z_row, V, p_scale, p_softcap, 1.0, SOFTCAP, False, False, SMOOTH, WANT_TOP1, BLOCK, CDT
    )
    ninf = float("-inf")
    finite = (nans == 0) & (m == m) & (m != ninf) & (m != float("inf"))
    # logsumexp as torch.logsumexp gives it (a +-inf max is the answer), NaN with a NaN logit ...
    lse_out = tl.where(nans > 0, float("nan"), tl.where(finite, m + tl.log(s), m))
    # ... but the loss and its gradient are NaN across a row whose softmax is not finite
    lse = tl.where(finite, lse_out, float("nan"))
    loss = lse - y_t
    if SMOOTH:
        loss = (1.0 - eps) * loss + eps * (lse - tot / V)
    if ZLOSS:
        loss = loss + zl * lse * lse
    tl.store(LOSS + row, tl.where(valid, loss, 0.0))
    tl.store(LSE + row, lse_out)
    if WANT_TOP1:
        tl.store(TOP1 + row, (valid & (arg == t)).to(tl.int8))
    if GRAD:
        coef = tl.load(COEF + row)
        a = coef
        if ZLOSS:
            a = a * (1.0 + 2.0 * zl * lse)
        a = tl.where(finite, a, float("nan"))
        c = tl.zeros([], CDT)
        if SMOOTH:
            c = -coef * (eps / V)
        d = tl.where(valid, coef * (eps - 1.0), 0.0)
        shift = tl.where(finite, m, 0.0)
        _grad_pass(
            z_row,
            V,
            t_safe,
            shift,
            s,
            a,
            0.0,
            c,
            d,
            p_scale,
            p_softcap,
            1.0,
            SOFTCAP,
            False,
            RNE_BF16,
            BLOCK,
            CDT,
        )


@triton.jit
def logprobs_head(
    Z,
    stride,
    V,
    scale_hi,
    scale_lo,
    cap_hi,
    cap_lo,
    post_hi,
    post_lo,
    T,
    C1,
    C2,
    STATS,
    LOGP,
    ENT,
    SQ,
    MEAN,
    TOP1,
    FORWARD: tl.constexpr,
    GRAD: tl.constexpr,
    SOFTCAP: tl.constexpr,
    ENTROPY: tl.constexpr,
    SQUARES: tl.constexpr,
    SUM: tl.constexpr,
    WANT_TOP1: tl.constexpr,
    HAS_C1: tl.constexpr,
    HAS_C2: tl.constexpr,
    SAVE: tl.constexpr,
    RNE_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
    CDT: tl.constexpr,
):
    """Log-prob of the target (entropy, ``log sum p^2``, mean logit, top-1 on request) of one row; with
    ``GRAD``, ``d/dz`` of ``C1[row] * logp + C2[row] * entropy``.  ``FORWARD`` and ``GRAD`` in one launch
    when the coefficients are known beforehand; GRPO's, a function of the log-probs, take two: the forward
    launch ``SAVE``s (shift, s, entropy) to ``STATS`` and the gradient launch reads them back.

    The float options (scale, soft-cap, post: ``y = post * softcap(scale * z)``) come as scalar arguments,
    each an fp32 ``hi + lo`` pair (:func:`_option`)."""
    row = tl.program_id(0)
    z_row = Z + row.to(tl.int64) * stride
    p_scale = _option(scale_hi, scale_lo, CDT)
    p_softcap = _option(cap_hi, cap_lo, CDT)
    p_post = _option(post_hi, post_lo, CDT)
    t = tl.load(T + row)
    ninf = float("-inf")
    if FORWARD:
        y_t = _one_logit(z_row, t, p_scale, p_softcap, p_post, SOFTCAP, CDT)
        m, s, ent_sum, sq, tot, arg, nans = _row_stats(
            z_row, V, p_scale, p_softcap, p_post, SOFTCAP, ENTROPY, SQUARES, SUM, WANT_TOP1, BLOCK, CDT
        )
        finite = (nans == 0) & (m == m) & (m != ninf) & (m != float("inf"))
        s = tl.where(finite, s, float("nan"))
        log_s = tl.log(s)
        shift = tl.where(finite, m, 0.0)
        tl.store(LOGP + row, y_t - shift - log_s)
        ent = log_s - ent_sum / s
        if ENTROPY:
            tl.store(ENT + row, ent)
        if SQUARES:
            tl.store(SQ + row, tl.log(sq) - 2.0 * log_s)
        if SUM:
            tl.store(MEAN + row, tot / V)
        if WANT_TOP1:
            tl.store(TOP1 + row, (arg == t).to(tl.int8))
        if SAVE:
            tl.store(STATS + row * 3, shift)
            tl.store(STATS + row * 3 + 1, s)
            tl.store(STATS + row * 3 + 2, ent)
    else:
        shift = tl.load(STATS + row * 3)
        s = tl.load(STATS + row * 3 + 1)
        ent = tl.load(STATS + row * 3 + 2)
    if GRAD:
        # d/dy = c1 (onehot - p) - c2 p (log p + H) = p (A + B log p) + D onehot
        c1 = tl.zeros([], CDT)
        c2 = tl.zeros([], CDT)
        if HAS_C1:
            c1 = tl.load(C1 + row).to(CDT)
        if HAS_C2:
            c2 = tl.load(C2 + row).to(CDT)
        a = -c1
        if HAS_C2:
            a = a - c2 * ent
        a = tl.where(s == s, a, float("nan"))
        _grad_pass(
            z_row,
            V,
            t,
            shift,
            s,
            a,
            -c2,
            0.0,
            c1,
            p_scale,
            p_softcap,
            p_post,
            SOFTCAP,
            HAS_C2,
            RNE_BF16,
            BLOCK,
            CDT,
        )
