"""The methods ``python -m memops bench`` compares, each a function ``fn(x, w, t) -> scalar loss``.

* ``eager``: unfused ``F.linear`` then the loss on fp32-upcast full logits (Hugging Face style);
* ``compile``: the same function under ``torch.compile``;
* ``chunked``: the chunked baseline users already have (torchtune style): the projection applied to 8
  row chunks, each chunk's logits upcast and its loss summed, divided by the non-ignored count at the end
  (autograd keeps every chunk's logits for backward);
* ``torch_lce``: PyTorch's own ``F.linear_cross_entropy`` with ``options=nn.LinearCrossEntropyOptions()``
  (its chunked path; torch >= 2.13; cross-entropy without soft-capping only);
* ``memops``: ``memops.linear_cross_entropy`` / ``memops.linear_loss``;
* ``floor``: the three projection-sized matmuls alone (``x @ W.T``, ``dz @ W``, ``dz.T @ x`` on the full
  rows, ``dz`` being the logits buffer itself, no loss): what the matmuls of a step cost by themselves
  (a method can come in under it where it skips ignored rows, or where its matmuls run on blocks that suit
  the machine better than the full-size ones); its loss and errors mean nothing and are not checked;
* ``cce``: Apple's ``cut_cross_entropy.linear_cross_entropy`` (``torch_compile`` impl on CPU, ``cce`` on
  CUDA), when installed;
* ``liger``: Liger-Kernel's fused linear cross-entropy, CUDA only, when installed;
* ``trl``: TRL 1.16's own kernels, when installed: ``--loss distill`` its chunked divergence
  (``trl.trainer.distillation_trainer._chunked_divergence_loss``, ``ChunkedDivergenceFunction``), ``--loss
  grpo`` its chunked log-prob function (``trl.trainer.utils._ChunkedLogProbFunction``, what its fused LM head
  calls) followed by the same GRPO formulas as the baselines;
* ``reference``: the unfused function in float64 (the error columns' reference).

``--loss grpo`` benchmarks a GRPO step (TRL's formulas, ``loss_type="grpo"``, ``--beta`` (default 0.04),
old log-probs given, reference log-probs given unless ``beta`` is 0, as in TRL): the baselines
materialize the logits, take ``log_softmax`` and gather the completion tokens' log-probabilities;
memops runs ``memops.linear_grpo_loss``.

``--loss distill`` benchmarks a distillation step: a frozen teacher projection of the same size (fixed
seed), TRL's generalized JSD (``--beta``, default 0.5) per non-ignored token, mean over them; the
baselines build both full logits; memops runs ``memops.linear_distillation_loss``.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os

IGNORE = -100
METHODS = (
    "eager", "compile", "chunked", "torch_lce", "memops", "memops_torch", "memops_triton", "memops_sync_free",
    "memops_accurate", "memops_batch_invariant", "memops_per_depth", "floor", "cce", "liger", "trl",
    "verl", "verl_triton", "verl_liger",
)  # fmt: skip
# memops with its heads chosen (memops.set_kernels): "memops" is the default choice ("auto")
KERNEL_CHOICE = {"memops_torch": "torch", "memops_triton": "triton"}
# memops variants run on request only (--methods): the head choices, and the sync-free path
# (memops.set_sync_free: every row computed, so its cost shows on batches with many ignored targets)
# memops_accurate: memops.set_precision("accurate") (the logits kept in fp32 from the GEMM)
# memops_batch_invariant: memops.set_batch_invariant(True) (fixed-shape chunk GEMMs, single-row head blocks)
VARIANTS = (*KERNEL_CHOICE, "memops_sync_free", "memops_accurate", "memops_batch_invariant")
# --loss mtp only: memops.linear_cross_entropy called once per depth (what a caller without the MTP op does)
PER_DEPTH = "memops_per_depth"
UNCHECKED = ("floor",)  # no loss: no error columns
# --loss verl: verl 0.9.1's fused log-prob head (per-token log-probs and entropy, what its PPO actor trains with
# an entropy bonus); its three backends are peers, run on request (--methods)
VERL = "verl"
VERL_PEERS = {"verl": "torch", "verl_triton": "triton", "verl_liger": "liger"}
ENTROPY_COEFF = 0.01  # the objective's entropy bonus (verl's actor default entropy_coeff is 0; 0.01 keeps it in)
PEERS = {
    "cce": ("cut_cross_entropy", "pip install cut-cross-entropy"),
    "liger": ("liger_kernel", "pip install liger-kernel"),
}
CHUNKS = 8  # torchtune's CEWithChunkedOutputLoss default


GRPO_BETA = 0.04  # the default of --beta with --loss grpo
DISTILL_BETA = 0.5  # ... with --loss distill (TRL's GKDConfig default)


def unavailable(method: str, loss: str, device: str, softcap: float | None = None, bias: bool = False) -> str | None:
    """Why ``method`` cannot run here (the row is reported as skipped), or None."""
    if bias and method == "cce":
        return "no bias option"
    if loss == CLASS_WEIGHTED and method not in ("eager", "compile", "torch_lce", "memops", "memops_torch", "floor"):
        return "class-weighted cross-entropy: eager, compile, torch_lce and memops only"
    if method == "memops_triton":
        if importlib.util.find_spec("triton") is None:
            return "not installed (pip install triton)"
        if not device.startswith("cuda") and os.environ.get("TRITON_INTERPRET") != "1":
            return "CUDA only (or TRITON_INTERPRET=1: the interpreter, for a dry run)"
    if method in KERNEL_CHOICE and loss not in ("cross_entropy", "grpo", "logprobs", CLASS_WEIGHTED):
        return "Triton heads: cross-entropy and GRPO (other losses keep the torch heads)"
    if method == "torch_lce":
        import torch.nn.functional as F

        if loss not in ("cross_entropy", CLASS_WEIGHTED):
            return "cross-entropy only"
        if softcap is not None:
            return "no soft-capping option"
        if not hasattr(F, "linear_cross_entropy"):
            return "needs torch >= 2.13"
    if method == "floor" and loss in ("distill", "mtp"):
        return "three-matmul floor of a single projection"
    if method == PER_DEPTH and loss != "mtp":
        return "--loss mtp only"
    if loss == "mtp" and method not in ("eager", "compile", "memops", PER_DEPTH, "reference"):
        return "--loss mtp: eager, compile, memops and memops_per_depth"
    if method in VERL_PEERS:
        if loss != VERL:
            return "--loss verl only"
        if importlib.util.find_spec("verl") is None:
            return "not installed (pip install verl==0.9.1)"
        if method != "verl" and not device.startswith("cuda"):
            return "CUDA only"
        if method == "verl_liger" and importlib.util.find_spec("liger_kernel") is None:
            return "not installed (pip install liger-kernel)"  # verl would fall back to its torch backend
    elif loss == VERL and method not in ("eager", "compile", "floor", "memops", *VARIANTS, "reference"):
        return "--loss verl: eager, compile, floor, memops and verl's backends"
    if method == "trl":
        if loss not in ("distill", "grpo", "logprobs"):
            return "--loss distill or grpo only"
        if importlib.util.find_spec("trl") is None:
            return "not installed (pip install 'trl==1.16.*')"
    if method in PEERS:
        if loss != "cross_entropy":
            return "cross-entropy only"
        if method == "liger" and not device.startswith("cuda"):
            return "CUDA only"
        module, hint = PEERS[method]
        if importlib.util.find_spec(module) is None:
            return f"not installed ({hint})"
    return None


# --loss class_weighted: cross-entropy with F.cross_entropy's class weights and label smoothing 0.1 (the
# combination torch's chunked F.linear_cross_entropy runs unfused); the weights are fixed, in [0.5, 1.5)
CLASS_WEIGHTED = "class_weighted"
CLASS_SMOOTHING = 0.1


def class_weights(vocab: int, device: str):
    import torch

    g = torch.Generator().manual_seed(11)
    return (torch.rand(vocab, generator=g) + 0.5).to(device)


def _build_class_weighted(method: str, softcap, vocab: int, device: str):
    import torch.nn.functional as F

    cw = class_weights(vocab, device)

    def unfused(x, w, t, upcast=True):
        z = _logits(x, w, softcap, upcast)
        weight = cw.to(z.dtype)
        return F.cross_entropy(z, t, weight=weight, ignore_index=IGNORE, label_smoothing=CLASS_SMOOTHING)

    base = _unfused_family(method, unfused)
    if base is not None:
        return base
    if method == "torch_lce":
        import torch.nn as nn

        options = nn.LinearCrossEntropyOptions()
        return lambda x, w, t: F.linear_cross_entropy(
            x, w, t, weight=cw.to(x.dtype), ignore_index=IGNORE, label_smoothing=CLASS_SMOOTHING, options=options
        )
    if method == "memops":
        import memops

        return lambda x, w, t: memops.linear_cross_entropy(
            x, w, t, softcap=softcap, class_weight=cw, label_smoothing=CLASS_SMOOTHING
        )
    if method == "floor":
        return _floor
    raise ValueError(f"{method!r} does not run --loss {CLASS_WEIGHTED}")


def _per_token(loss: str):
    """``f(logits [n, V] fp32, target [n] with ignored rows) -> per-row loss`` (0 on ignored rows)."""
    import torch
    import torch.nn.functional as F

    import memops

    if loss == "cross_entropy":
        return lambda logits, t: F.cross_entropy(logits, t, reduction="none", ignore_index=IGNORE)
    fn = memops.registry.get_transform(loss).fn

    def per_token(logits, t):
        valid = t != IGNORE
        return torch.where(valid, fn(logits, torch.where(valid, t, 0)), 0.0)

    return per_token


def _logits(x, w, softcap, upcast=True, b=None):
    import torch
    import torch.nn.functional as F

    z = F.linear(x, w, b)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z.float() if upcast else z


def grpo_data(tokens: int, vocab: int, batch: int, device: str, masked: float = 0.1):
    """Completion mask (a random ``masked`` fraction of tokens masked out, as padding after shorter
    completions), advantages, old and reference log-probs of a GRPO step (fixed seed)."""
    import math

    import torch

    g = torch.Generator().manual_seed(1)
    steps = tokens // batch
    mask = torch.ones(batch * steps)
    mask[torch.randperm(batch * steps, generator=g)[: round(masked * batch * steps)]] = 0
    mask = mask.view(batch, steps)
    adv = torch.randn(batch, generator=g)
    old = -math.log(vocab) + 0.3 * torch.randn(batch, steps, generator=g)
    ref = -math.log(vocab) + 0.3 * torch.randn(batch, steps, generator=g)
    return tuple(t.to(device) for t in (mask, adv, old, ref))


@functools.cache
def _three_gemms():
    import torch

    class ThreeGemms(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):
            z = x @ w.t()
            ctx.save_for_backward(x, w, z)
            return z.new_zeros(())

        @staticmethod
        def backward(ctx, _grad):
            x, w, z = ctx.saved_tensors  # the logits buffer stands in for d loss / d logits
            return z @ w, z.t() @ x

    return ThreeGemms


def _floor(x, w, t, b=None):
    """The three projection-sized matmuls of a forward+backward step and nothing else (see ``floor``); with a
    bias, its sum over the rows as well (the bias gradient every method computes)."""
    floor = _three_gemms().apply(x, w)
    return floor if b is None else floor + (b * 0).sum()


def _unfused_family(method: str, unfused):
    """eager / compile / float64 reference of an unfused ``fn(x, w, t, upcast=True)``, else None."""
    import torch

    if method == "eager":
        return unfused
    if method == "compile":
        return torch.compile(unfused)
    if method == "reference":
        return lambda x, w, t: unfused(x.double(), w.double(), t, upcast=False)
    return None


def kept_ids(tokens: int, vocab: int, kept: int, device: str):
    """A sampling mask of ``kept`` ids per token (fixed seed), as a sampler's top-k / top-p returns them; None
    for 0."""
    import torch

    if not kept:
        return None
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, vocab, (tokens, kept), generator=g).to(device)


def _masked_logits(logits, t, kept):
    """The unfused baselines' sampling mask: every id outside the row's kept set (and its target) at -inf."""
    import torch

    if kept is None:
        return logits
    keep = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
    keep.scatter_(-1, kept, True)
    keep.scatter_(-1, t[:, None], True)
    return logits.masked_fill(~keep, -torch.inf)


def _build_grpo(
    method: str,
    tokens: int,
    vocab: int,
    batch: int,
    device: str,
    masked: float,
    beta: float,
    kept: int = 0,
    loss: str = "grpo",
):
    import torch

    fixed = grpo_data(tokens, vocab, batch, device, masked)
    mask_ids = kept_ids(tokens, vocab, kept, device)

    def data(x):
        mask, adv, old, ref = fixed
        if x.dtype == torch.float64:
            return mask, adv.double(), old.double(), ref.double()
        return mask, adv, old, ref

    def formula(logp, x):  # TRL GRPOTrainer, loss_type="grpo"; --loss logprobs: the masked mean -log p
        m, a, o, r = data(x)
        if loss == "logprobs":
            return -(logp * m).sum() / m.sum().clamp(min=1.0)
        coef_1 = torch.exp(logp - o)
        coef_2 = torch.clamp(coef_1, 0.8, 1.2)
        per_token = -torch.min(coef_1 * a[:, None], coef_2 * a[:, None])
        if beta != 0:
            per_token = per_token + beta * (torch.exp(r - logp) - (r - logp) - 1)
        return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()

    def logp_of(x, w, t, upcast=True, ids=mask_ids):
        logits = _masked_logits(_logits(x, w, None, upcast), t, ids)
        return torch.log_softmax(logits, -1).gather(-1, t[:, None]).squeeze(-1)

    def unfused(x, w, t, upcast=True):
        return formula(logp_of(x, w, t, upcast).view(batch, -1), x)

    base = _unfused_family(method, unfused)
    if base is not None:
        return base
    if method == "floor":
        return _floor
    if method == "chunked":
        ids = [None] * CHUNKS if mask_ids is None else mask_ids.chunk(CHUNKS)
        return lambda x, w, t: formula(
            torch.cat([logp_of(xc, w, tc, True, kc) for xc, tc, kc in zip(x.chunk(CHUNKS), t.chunk(CHUNKS), ids)]).view(
                batch, -1
            ),
            x,
        )
    if method == "trl":
        if kept:
            raise ValueError("TRL 1.16's chunked log-probs take no sampling mask")
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE, _ChunkedLogProbFunction

        def trl_step(x, w, t):
            logp = _ChunkedLogProbFunction.apply(x, w, None, t, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ())[0]
            return formula(logp.view(batch, -1), x)

        return trl_step
    if method == "memops":
        import memops

        sampling = None if mask_ids is None else mask_ids.view(batch, -1, kept)

        def fused(x, w, t):
            m, a, o, r = data(x)
            if loss == "logprobs":
                logp = memops.linear_logprobs(x, w, t, sampling_mask=None if sampling is None else mask_ids)
                return formula(logp.view(batch, -1), x)
            return memops.linear_grpo_loss(
                x.view(batch, -1, x.shape[-1]),
                w,
                t.view(batch, -1),
                m,
                a,
                old_logprobs=o,
                ref_logprobs=r if beta != 0 else None,
                beta=beta,
                sampling_mask=sampling,
            )[0]

        return fused
    raise ValueError(f"method {method!r} does not run --loss grpo")


def verl_module(name: str):
    """verl's module ``name`` (``verl.utils.experimental.torch_functional``, ``verl.utils.kernel.
    linear_cross_entropy``): imported as usual, or, where verl's own dependencies are missing (a GPU machine
    given verl's wheel installed with ``--no-deps``: ``import verl`` needs ray, tensordict, ...), loaded from
    its files with a stand-in for ``verl.utils.device`` (``torch.cuda``'s device calls: the one verl module the
    kernels import) and bare ``verl`` packages around it."""
    import sys
    import types

    try:
        return importlib.import_module(name)
    except ImportError:
        pass
    import torch

    spec = importlib.util.find_spec("verl")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("verl is not installed")
    for key in [k for k in sys.modules if k == "verl" or k.startswith("verl.")]:
        del sys.modules[key]  # what the failed import left half-made
    root = list(spec.submodule_search_locations)[0]
    for package in ("verl", "verl.utils", "verl.utils.kernel", "verl.utils.experimental"):
        module = types.ModuleType(package)
        module.__path__ = [os.path.join(root, *package.split(".")[1:])]
        sys.modules[package] = module
    device = types.ModuleType("verl.utils.device")
    device.get_device_name = lambda: "cuda"  # type: ignore[attr-defined]
    device.get_torch_device = lambda: torch.cuda  # type: ignore[attr-defined]
    device.is_cuda_available = torch.cuda.is_available()  # type: ignore[attr-defined]
    device.get_device_capability = torch.cuda.get_device_capability  # type: ignore[attr-defined]
    sys.modules["verl.utils.device"] = device
    return importlib.import_module(name)


def _build_verl(method: str):
    """``--loss verl``: per-token log-probs and entropy of ``softmax(x @ w.T)`` (temperature 1), trained as a
    PPO actor with an entropy bonus: ``-mean(logp) - ENTROPY_COEFF * mean(entropy)`` over the tokens not set to
    ``IGNORE`` (their ids read as 0, as verl's heads take no ignore index)."""
    import torch

    def objective(logp, ent, t):
        keep = (t != IGNORE).to(logp.dtype)
        n = keep.sum().clamp(min=1.0)
        return -(logp * keep).sum() / n - ENTROPY_COEFF * (ent.to(logp.dtype) * keep).sum() / n

    def unfused(x, w, t, upcast=True):
        logp_all = torch.log_softmax(_logits(x, w, None, upcast), -1)
        logp = logp_all.gather(-1, t.clamp(min=0)[:, None]).squeeze(-1)
        return objective(logp, -(logp_all.exp() * logp_all).sum(-1), t)

    base = _unfused_family(method, unfused)
    if base is not None:
        return base
    if method == "floor":
        return _floor
    if method == "memops":
        import memops

        def head(x, w, ids):
            return memops.linear_logprobs(x, w, ids, return_entropy=True)

    elif method in ("verl", "verl_liger"):  # verl's torch backend at its default chunk size; liger's
        functional = verl_module("verl.utils.experimental.torch_functional")
        if method == "verl":

            def head(x, w, ids):
                return functional.FusedLinearForPPOFunction.apply(x, w, ids, 1.0, 512)

        elif getattr(functional, "_LIGER_FUSED_LINEAR_SCALED_CROSS_ENTROPY", None) is None:
            raise RuntimeError(
                "this liger-kernel has no LigerFusedLinearScaledCrossEntropyFunction: verl would run its torch backend"
            )
        else:
            head = functools.partial(functional.FusedLinearForPPO(impl_backend="liger"), temperature=1.0)
    elif method == "verl_triton":
        kernel = verl_module("verl.utils.kernel.linear_cross_entropy")

        def head(x, w, ids):
            return kernel.linear_cross_entropy(x, w, ids, 1.0, "none")

    else:
        raise ValueError(f"method {method!r} does not run --loss verl")

    def step(x, w, t):
        logp, ent = head(x, w, t.clamp(min=0))
        return objective(logp, ent, t)

    return step


def jsd(student_logits, teacher_logits, beta: float):
    """TRL's generalized JSD per row (``GKDTrainer.generalized_jsd_loss`` before masking), temperature 1."""
    import torch
    import torch.nn.functional as F

    s, t = F.log_softmax(student_logits, -1), F.log_softmax(teacher_logits, -1)
    if beta == 0:
        return F.kl_div(s, t, reduction="none", log_target=True).sum(-1)
    if beta == 1:
        return F.kl_div(t, s, reduction="none", log_target=True).sum(-1)
    m = torch.logsumexp(torch.stack([s + math.log(1 - beta), t + math.log(beta)]), dim=0)
    kl_t = F.kl_div(m, t, reduction="none", log_target=True).sum(-1)
    return beta * kl_t + (1 - beta) * F.kl_div(m, s, reduction="none", log_target=True).sum(-1)


@functools.cache
def _teacher(tokens: int, hidden: int, vocab: int):
    """A frozen teacher's hidden states and projection (fixed seed, fp32 on CPU; cast per method)."""
    import torch

    g = torch.Generator().manual_seed(2)
    return torch.randn(tokens, hidden, generator=g), torch.randn(vocab, hidden, generator=g) / hidden**0.5


def _build_distill(method: str, vocab: int, beta: float):
    def teacher(x):
        xt, wt = _teacher(x.shape[0], x.shape[1], vocab)
        return xt.to(device=x.device, dtype=x.dtype), wt.to(device=x.device, dtype=x.dtype)

    def unfused(x, w, t, upcast=True):
        xt, wt = teacher(x)
        keep = t != IGNORE
        per = jsd(_logits(x, w, None, upcast), _logits(xt, wt, None, upcast), beta)
        return (per * keep).sum() / keep.sum()

    base = _unfused_family(method, unfused)
    if base is not None:
        return base
    if method == "memops":
        import memops

        def fused(x, w, t):
            xt, wt = teacher(x)
            return memops.linear_distillation_loss(x, w, t, xt, wt, beta=beta)

        return fused
    if method == "trl":
        from trl.trainer.distillation_trainer import _chunked_divergence_loss

        def trl_step(x, w, t):
            xt, wt = teacher(x)
            return _chunked_divergence_loss(x, xt, w, wt, (t != IGNORE).to(x.dtype), beta)[0]

        return trl_step
    raise ValueError(f"method {method!r} does not run --loss distill")


def _depth_states(x, depths: int) -> list:
    """The ``depths`` hidden states of a multi-token-prediction step, all from ``x`` (depth ``k``'s is ``x``
    scaled by ``1 - 0.05 k``: distinct rows, every depth's gradient reaching ``x``)."""
    return [x if k == 0 else x * (1.0 - 0.05 * k) for k in range(depths)]


def _build_mtp(method: str, depths: int, softcap):
    """--loss mtp: ``depths`` cross-entropies against one head, depth ``k``'s targets shifted by ``k + 1``
    (one sequence of every token), summed."""
    import torch
    import torch.nn.functional as F

    def shifted(t, s):
        return torch.cat([t[s:], t.new_full((min(s, t.shape[0]),), IGNORE)])

    def unfused(x, w, t, upcast=True):
        total = 0
        for k, h in enumerate(_depth_states(x, depths)):
            total = total + F.cross_entropy(_logits(h, w, softcap, upcast), shifted(t, k + 1), ignore_index=IGNORE)
        return total

    base = _unfused_family(method, unfused)
    if base is not None:
        return base
    import memops

    if method == "memops":
        return lambda x, w, t: memops.linear_mtp_cross_entropy(
            torch.stack(_depth_states(x, depths)), w, t, softcap=softcap
        )[0]
    if method == PER_DEPTH:

        def per_depth(x, w, t):
            total = 0
            for k, h in enumerate(_depth_states(x, depths)):
                total = total + memops.linear_cross_entropy(h, w, t, softcap=softcap, shift=k + 1)
            return total

        return per_depth
    raise ValueError(f"method {method!r} does not run --loss mtp")


def build(
    method: str,
    loss: str,
    softcap: float | None,
    device: str,
    tokens: int = 0,
    vocab: int = 0,
    batch: int = 1,
    ignored: float = 0.1,
    beta: float | None = None,
    kept: int = 0,
    depths: int = 2,
):
    """The step function of ``method``: ``fn(x, w, t) -> scalar loss`` (mean over non-ignored tokens)."""
    if method in VARIANTS:  # each method runs in a process of its own: the choice is global there
        import memops

        if method == "memops_sync_free":
            memops.set_sync_free(True)
        elif method == "memops_accurate":
            memops.set_precision("accurate")
        elif method == "memops_batch_invariant":
            memops.set_batch_invariant(True)
        else:
            memops.set_kernels(KERNEL_CHOICE[method])
        method = "memops"

    if loss in ("grpo", "logprobs"):
        beta = GRPO_BETA if beta is None else beta
        return _build_grpo(method, tokens, vocab, batch, device, ignored, beta, kept, loss)
    if loss == VERL:
        return _build_verl(method)
    if loss == "distill":
        return _build_distill(method, vocab, DISTILL_BETA if beta is None else beta)
    if loss == "mtp":
        return _build_mtp(method, depths, softcap)
    if loss == CLASS_WEIGHTED:
        return _build_class_weighted(method, softcap, vocab, device)
    per_token = _per_token(loss)

    def unfused(x, w, t, b=None, upcast=True):
        return per_token(_logits(x, w, softcap, upcast, b), t).sum() / (t != IGNORE).sum()

    if method == "reference":
        return lambda x, w, t, b=None: unfused(x.double(), w.double(), t, None if b is None else b.double(), False)
    base = _unfused_family(method, unfused)
    if base is not None:
        return base
    if method == "floor":
        return _floor
    if method == "torch_lce":
        import torch.nn as nn
        import torch.nn.functional as F

        options = nn.LinearCrossEntropyOptions()
        return lambda x, w, t, b=None: F.linear_cross_entropy(
            x, w, t, linear_bias=b, ignore_index=IGNORE, options=options
        )
    if method == "chunked":

        def chunked(x, w, t, b=None):
            total = sum(
                per_token(_logits(xc, w, softcap, b=b), tc).sum() for xc, tc in zip(x.chunk(CHUNKS), t.chunk(CHUNKS))
            )
            return total / (t != IGNORE).sum()

        return chunked
    if method == "memops":
        import memops

        if loss == "cross_entropy":
            return lambda x, w, t, b=None: memops.linear_cross_entropy(x, w, t, b, softcap=softcap)
        return lambda x, w, t, b=None: memops.linear_loss(x, w, t, loss, b, softcap=softcap)
    if method == "cce":
        from cut_cross_entropy import linear_cross_entropy as cce

        impl = "cce" if device.startswith("cuda") else "torch_compile"
        return lambda x, w, t: cce(x, w, t, softcap=softcap, ignore_index=IGNORE, impl=impl)
    if method == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        kwargs = {"softcap": softcap} if softcap is not None else {}
        module = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, **kwargs)
        return lambda x, w, t, b=None: module(w, x, t, b)
    raise ValueError(f"unknown method {method!r}")
