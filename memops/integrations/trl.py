"""TRL 1.16 on memops.

* :func:`apply` / :func:`revert`: every TRL trainer's fused LM head (``model(..., fused_lm_head=True)``, set
  up by ``trl.trainer.utils.add_fused_lm_head``: SFT, DPO, KTO, GRPO, RLOO) computes its per-token outputs
  with ``memops.linear_logprobs`` (``apply`` replaces ``trl.trainer.utils._ChunkedLogProbFunction``, what
  that head calls): log-probs, entropy, ``log_sum_sq_probs``, ``mean_logits``, ``is_top1``, with temperature,
  soft-capping, logit scale and bias; and TRL's ``DistillationTrainer`` computes its divergence with
  ``memops.linear_distillation_loss`` (it calls the module-level
  ``trl.trainer.distillation_trainer._chunked_divergence_loss``, which ``apply`` replaces): same loss,
  entropy metric and token count, four projection matmuls per step and no recompute in backward.
* :class:`GKDTrainer`: ``trl.experimental.gkd.GKDTrainer`` whose loss (TRL's ``generalized_jsd_loss`` on the
  student's and the teacher's full logits) is ``memops.linear_distillation_loss`` on their backbones'
  hidden states; the logits never exist.

Both check the installed TRL: a version or function signature this module was not written against is
refused, naming what differs.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

from ..ops.distill import linear_distillation_loss
from ..ops.logprobs import linear_logprobs

SUPPORTED = "1.16."

# TRL 1.16's ``_chunked_divergence_loss`` parameters, in order
_DIVERGENCE_PARAMS = (
    "student_hidden_states",
    "teacher_hidden_states",
    "student_lm_head_weight",
    "teacher_lm_head_weight",
    "completion_mask",
    "beta",
    "num_items_in_batch",
    "student_lm_head_bias",
    "teacher_lm_head_bias",
    "student_logit_scale",
    "teacher_logit_scale",
    "student_final_logit_softcapping",
    "teacher_final_logit_softcapping",
    "temperature",
)

# TRL 1.16's ``ChunkedLogProbFunction.forward`` parameters after ``ctx``, in order
_LOGPROB_PARAMS = (
    "hidden",
    "weight",
    "bias",
    "targets",
    "temperature",
    "chunk_size",
    "final_logit_softcapping",
    "logit_scale",
    "outputs",
)
_LOGPROB_EXTRAS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")

_ORIGINAL: dict[str, object] = {}


def _trl():
    try:
        import trl
    except ImportError:
        raise ImportError("memops.integrations.trl needs TRL: pip install 'trl==1.16.*'") from None
    if not trl.__version__.startswith(SUPPORTED):
        raise RuntimeError(
            f"memops.integrations.trl supports TRL {SUPPORTED}x, found {trl.__version__}: its trainers' loss "
            "functions may differ, so memops does not replace them"
        )
    return trl


def _utils_module():
    _trl()
    from trl.trainer import utils

    fn = _ORIGINAL.get("logprob", utils._ChunkedLogProbFunction)
    params = tuple(inspect.signature(fn.forward).parameters)[1:]
    if params != _LOGPROB_PARAMS:
        raise RuntimeError(
            f"trl.trainer.utils._ChunkedLogProbFunction.forward has parameters {params}, memops was written "
            f"against {_LOGPROB_PARAMS}: not replacing it"
        )
    return utils


def _distillation_module():
    _trl()
    from trl.trainer import distillation_trainer

    fn = _ORIGINAL.get("divergence", distillation_trainer._chunked_divergence_loss)
    params = tuple(inspect.signature(fn).parameters)
    if params != _DIVERGENCE_PARAMS:
        raise RuntimeError(
            "trl.trainer.distillation_trainer._chunked_divergence_loss has parameters "
            f"{params}, memops was written against {_DIVERGENCE_PARAMS}: not replacing it"
        )
    return distillation_trainer


def _projection(hidden: Tensor, weight: Tensor, bias: Tensor | None):
    """``(hidden, weight, bias)`` in the dtype TRL's kernels project in: autocast's when it is on (as an
    ``nn.Linear`` lm_head would run under the trainer's mixed precision), else the hidden states'; a DTensor
    lm_head gathered once first, as TRL does."""
    if isinstance(weight, torch.distributed.tensor.DTensor):
        weight = weight.full_tensor()
        bias = None if bias is None else bias.full_tensor()
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def chunked_divergence_loss(
    student_hidden_states: Tensor,
    teacher_hidden_states: Tensor,
    student_lm_head_weight: Tensor,
    teacher_lm_head_weight: Tensor,
    completion_mask: Tensor,
    beta: float,
    num_items_in_batch: Tensor | int | None = None,
    student_lm_head_bias: Tensor | None = None,
    teacher_lm_head_bias: Tensor | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_final_logit_softcapping: float | None = None,
    teacher_final_logit_softcapping: float | None = None,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """TRL 1.16's ``_chunked_divergence_loss`` computed by memops: ``(loss, entropy sum, valid count)`` over
    the local batch, the loss divided by ``num_items_in_batch`` when given, else by the valid count (at
    least 1).  The teacher gets no gradient, as in TRL."""
    hs, ws, bs = _projection(student_hidden_states, student_lm_head_weight, student_lm_head_bias)
    ht, wt, bt = _projection(teacher_hidden_states, teacher_lm_head_weight, teacher_lm_head_bias)
    valid = completion_mask != 0
    target = torch.where(valid, 0, -100)  # the divergence reads only which tokens count
    loss, entropy = linear_distillation_loss(
        hs,
        ws,
        target,
        ht.detach(),
        wt.detach(),
        student_bias=bs,
        teacher_bias=None if bt is None else bt.detach(),
        beta=float(beta),
        temperature=float(temperature),
        reduction="sum",
        logit_scale=float(student_logit_scale),
        softcap=None if student_final_logit_softcapping is None else float(student_final_logit_softcapping),
        teacher_logit_scale=float(teacher_logit_scale),
        teacher_softcap=None if teacher_final_logit_softcapping is None else float(teacher_final_logit_softcapping),
        return_entropy=True,
    )
    n_valid = valid.sum()
    if num_items_in_batch is None:
        loss = loss / n_valid.clamp(min=1)
    else:
        if isinstance(num_items_in_batch, Tensor):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss, entropy.sum(), n_valid


class ChunkedLogProb:
    """Stands in for ``trl.trainer.utils._ChunkedLogProbFunction`` (only its ``apply`` is called): the same
    five per-token outputs, ``None`` where ``outputs`` does not ask for one, computed by
    ``memops.linear_logprobs`` (log-probs and entropy differentiable; the others without gradient)."""

    @staticmethod
    def apply(
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        temperature: float,
        chunk_size: int,
        final_logit_softcapping: float | None = None,
        logit_scale: float = 1.0,
        outputs: tuple[str, ...] = _LOGPROB_EXTRAS,
    ) -> tuple:
        del chunk_size  # TRL's vocabulary tile; memops sizes its own chunks
        unknown = sorted(set(outputs) - set(_LOGPROB_EXTRAS) - {"log_probs"})
        if unknown:
            raise ValueError(f"TRL asked for per-token outputs memops does not compute: {unknown}")
        h, w, b = _projection(hidden, weight, bias)
        out = linear_logprobs(
            h,
            w,
            targets,
            b,
            temperature=float(temperature),
            logit_scale=float(logit_scale),
            softcap=None if final_logit_softcapping is None else float(final_logit_softcapping),
            return_entropy="entropy" in outputs,
            extras=[name for name in _LOGPROB_EXTRAS[1:] if name in outputs],
        )
        if not isinstance(out, dict):
            out = {"log_probs": out[0], "entropy": out[1]} if "entropy" in outputs else {"log_probs": out}
        _gathered_in_backward(out["log_probs"], weight, bias)
        return tuple(out.get(name) for name in ("log_probs", *_LOGPROB_EXTRAS))


def _gathered_in_backward(output: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    """Under DeepSpeed ZeRO-3 the lm_head weight is gathered only inside TRL's
    ``maybe_gather_lm_head_ctx`` (entered around the forward call); memops' backward recomputes the chunks
    from the saved weight, so its autograd node runs inside that context too (entered by a pre-hook, left
    by a post-hook).  Without ZeRO-3 the context is a null one."""
    node = output.grad_fn
    if node is None:
        return
    from trl.trainer import utils

    held = []

    def enter(grad_outputs):
        held.append(utils.maybe_gather_lm_head_ctx(weight, bias))
        held[-1].__enter__()

    def leave(grad_inputs, grad_outputs):
        held.pop().__exit__(None, None, None)

    node.register_prehook(enter)
    node.register_hook(leave)


def apply() -> None:
    """Make TRL's fused LM head and its ``DistillationTrainer`` compute with memops (idempotent;
    :func:`revert` undoes it)."""
    utils, distill = _utils_module(), _distillation_module()
    _ORIGINAL.setdefault("logprob", utils._ChunkedLogProbFunction)
    _ORIGINAL.setdefault("divergence", distill._chunked_divergence_loss)
    utils._ChunkedLogProbFunction = ChunkedLogProb
    distill._chunked_divergence_loss = chunked_divergence_loss


def revert() -> None:
    """Restore TRL's own functions."""
    if "logprob" in _ORIGINAL:
        from trl.trainer import utils

        utils._ChunkedLogProbFunction = _ORIGINAL.pop("logprob")
    if "divergence" in _ORIGINAL:
        from trl.trainer import distillation_trainer

        distillation_trainer._chunked_divergence_loss = _ORIGINAL.pop("divergence")


def _backbone(model):
    """The decoder below a causal LM's head (what TRL's Liger path uses too)."""
    if hasattr(model, "get_decoder") and model.get_decoder() is not None:
        return model.get_decoder()
    return getattr(model, getattr(model, "base_model_prefix", "model"), model)


def _head_options(model) -> dict:
    """The logit post-processing of a verified transformers model (scale, soft-cap), or an error."""
    from .transformers import _verified

    spec = _verified(type(model))
    return {"logit_scale": spec.logit_scale(model), "softcap": spec.softcap(model)}


def _gkd_base():
    _trl()
    from trl.experimental.gkd import GKDTrainer as TRLGKDTrainer

    return TRLGKDTrainer


def __getattr__(name: str):
    if name == "GKDTrainer":
        cls = _make_gkd_trainer()
        globals()["GKDTrainer"] = cls
        return cls
    raise AttributeError(name)


def _make_gkd_trainer():
    base = _gkd_base()

    class GKDTrainer(base):
        """``trl.experimental.gkd.GKDTrainer`` with its generalized JSD computed by memops from the two models'
        hidden states (TRL's loss: ``beta`` from the config, temperature 1, masked by ``labels``, batchmean
        or divided by ``num_items_in_batch``).  ``return_outputs=True`` (evaluation that wants logits) runs
        TRL's own loss."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if return_outputs:
                return super().compute_loss(model, inputs, True, num_items_in_batch)
            student = self.accelerator.unwrap_model(model)
            teacher = self.accelerator.unwrap_model(self.teacher_model)
            s_opts, t_opts = _head_options(student), _head_options(teacher)
            ids, mask = inputs["input_ids"], inputs["attention_mask"]
            # the prepared models' forward runs under the trainer's mixed precision: so do their backbones here
            with self.accelerator.autocast():
                hidden = _backbone(student)(input_ids=ids, attention_mask=mask).last_hidden_state
                self.teacher_model.eval()
                with torch.no_grad():
                    t_hidden = _backbone(teacher)(input_ids=ids, attention_mask=mask).last_hidden_state
                s_head, t_head = student.get_output_embeddings(), teacher.get_output_embeddings()
                hs, ws, bs = _projection(hidden[:, :-1], s_head.weight, s_head.bias)
                ht, wt, bt = _projection(t_hidden[:, :-1], t_head.weight, t_head.bias)
            return linear_distillation_loss(
                hs,
                ws,
                inputs["labels"][:, 1:],
                ht.detach(),
                wt.detach(),
                student_bias=bs,
                teacher_bias=None if bt is None else bt.detach(),
                beta=float(self.beta),
                num_items=num_items_in_batch,
                logit_scale=s_opts["logit_scale"],
                softcap=s_opts["softcap"],
                teacher_logit_scale=t_opts["logit_scale"],
                teacher_softcap=t_opts["softcap"],
            )

    return GKDTrainer
