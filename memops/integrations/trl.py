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
from typing import Any

import torch
from torch import Tensor

from ..ops.distill import linear_distillation_loss
from ..ops.logprobs import linear_logprobs
from ..validation import is_dtensor
from ._module_call import call_as_forward

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

_ORIGINAL: dict[str, Any] = {}


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
    if params not in (_LOGPROB_PARAMS, _LOGPROB_PARAMS + ("sampling_mask",)):
        raise RuntimeError(
            f"trl.trainer.utils._ChunkedLogProbFunction.forward has parameters {params}, memops was written "
            f"against {_LOGPROB_PARAMS} (TRL 1.16) and that plus sampling_mask (TRL's main branch): not replacing it"
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


def _projection_dtype(hidden: Tensor) -> torch.dtype:
    """The dtype TRL's kernels project in: autocast's when it is on, else the hidden states'."""
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype


def _projection(hidden: Tensor, weight: Any, bias: Any):  # tensors or DTensors
    """``(hidden, weight, bias)`` in the dtype TRL's kernels project in: autocast's when it is on (as an
    ``nn.Linear`` lm_head would run under the trainer's mixed precision), else the hidden states'; a DTensor
    lm_head gathered once first, as TRL does."""
    if is_dtensor(weight):
        weight = weight.full_tensor()
        bias = None if bias is None else bias.full_tensor()
    dtype = _projection_dtype(hidden)
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
        sampling_mask: Tensor | None = None,
    ) -> tuple:
        """TRL 1.16's nine arguments, and the ``sampling_mask`` TRL's main branch passes tenth (``[N, K]`` kept
        ids, -1 padding): the log-probability renormalized over the kept set, the entropy over the vocabulary,
        as TRL's kernel does."""
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
            sampling_mask=sampling_mask,
        )
        if not isinstance(out, dict):
            out = {"log_probs": out[0], "entropy": out[1]} if isinstance(out, tuple) else {"log_probs": out}
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

        setattr(utils, "_ChunkedLogProbFunction", _ORIGINAL.pop("logprob"))  # noqa: B010  (a class there)
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
    from .transformers import verify

    spec = verify(model)
    if spec.path.delegate is not None:  # these losses read the hidden states below the head from _backbone
        raise ValueError(
            f"memops: {type(model).__name__} takes its logits from its inner model {spec.path.delegate!r} (a "
            "delegated head); memops' TRL losses read the hidden states below the model's own head and are not "
            "tested on such a model"
        )
    return {"logit_scale": spec.logit_scale(model), "softcap": spec.softcap(model)}


def _gkd_base():
    _trl()
    from trl.experimental.gkd import GKDTrainer as TRLGKDTrainer

    return TRLGKDTrainer


def __getattr__(name: str):
    makers = {"GKDTrainer": _make_gkd_trainer, "GRPOTrainer": _make_grpo_trainer}
    if name in makers:
        cls = makers[name]()
        globals()[name] = cls
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


# ---- GRPO in three projection matmuls --------------------------------------------------------------------

_MULTIMODAL = (
    "pixel_values",
    "image_grid_thw",
    "pixel_attention_mask",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "spatial_shapes",
    "num_tiles",
    "image_position_ids",
)


def _grpo_unsupported(trainer, inputs) -> str | None:
    """The option of a GRPO configuration memops does not compute exactly, or None."""
    if trainer.use_vllm and trainer.vllm_importance_sampling_correction:
        return "vllm_importance_sampling_correction (vLLM importance-sampling correction)"
    if trainer.top_entropy_quantile < 1.0:
        return "top_entropy_quantile < 1"
    if trainer.off_policy_mask_threshold is not None:
        return "off_policy_mask_threshold (the off-policy mask)"
    if trainer.loss_type == "vespo":
        return "loss_type='vespo'"
    if trainer.use_adaptive_entropy:
        return "use_adaptive_entropy"
    if trainer.aux_loss_enabled:
        return "a router auxiliary loss (MoE)"
    if any(inputs.get(key) is not None for key in _MULTIMODAL):
        return "multimodal inputs"
    if trainer.importance_sampling_level not in ("token", "sequence"):
        return f"importance_sampling_level={trainer.importance_sampling_level!r}"
    return None


def _make_grpo_trainer():
    _trl()
    import trl
    from trl.trainer.utils import nanmax, nanmin

    from ..meta.grpo import GRPO
    from ..ops import family
    from ..ops.grpo import metric_terms, token_weights

    class GRPOTrainer(trl.GRPOTrainer):
        """``trl.GRPOTrainer`` whose loss is computed by ``memops::linear_grpo`` from the policy's hidden
        states: the per-token log-probs, the entropy and the loss's gradients in one pass, three projection
        matmuls (GSPO's sequence-level importance sampling: four), with TRL 1.16's loss types, normalizers,
        ``beta`` / ``use_bias_correction_kl``, ``delta``, the static entropy bonus and its logged metrics.
        A configuration memops does not compute exactly (vLLM importance-sampling correction,
        ``top_entropy_quantile``, the off-policy mask, vespo, adaptive entropy, MoE auxiliary loss,
        multimodal inputs, a model whose logit post-processing is not verified) runs TRL's own loss, with a
        one-time warning naming it."""

        _memops_warned: set = set()

        def _compute_loss(self, model, inputs):
            reason = _grpo_unsupported(self, inputs)
            unwrapped = self.accelerator.unwrap_model(model)
            if reason is None:
                try:
                    head_opts = _head_options(unwrapped)
                except ValueError as exc:
                    reason = str(exc)
            if reason is not None:
                if reason not in self._memops_warned:
                    self._memops_warned.add(reason)
                    import warnings

                    warnings.warn(f"memops GRPOTrainer: {reason}: this runs TRL's own loss", stacklevel=2)
                return super()._compute_loss(model, inputs)
            return self._memops_loss(unwrapped, inputs, head_opts)

        def _memops_loss(self, unwrapped, inputs, head_opts):
            prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
            completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
            input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
            attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
            k = completion_ids.size(1)
            mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
            with self.accelerator.autocast():
                hidden = _backbone(unwrapped)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
                hidden = hidden.last_hidden_state[:, -k - 1 : -1]
                cdt = torch.float64 if _projection_dtype(hidden) == torch.float64 else torch.float32
            m = mask.to(cdt)
            mode = "train" if self.model.training else "eval"
            accum = self.current_gradient_accumulation_steps if mode == "train" else 1.0
            lt = self.loss_type
            weights = token_weights(
                m,
                lt,
                cdt,
                max_completion_length=self.max_completion_length,
                num_items=inputs["num_items_in_batch"] if lt in ("dapo", "cispo") else None,
                accumulation=accum,
                processes=self.accelerator.num_processes,
                steps_per_generation=self.args.steps_per_generation if mode == "train" else 1,
            )
            policy_scale = 1.0 if lt in ("dapo", "cispo") else accum  # TRL logs the loss before its scaling
            advantages = inputs["advantages"]
            advantages = (advantages.unsqueeze(1) if advantages.dim() == 1 else advantages).to(cdt)
            advantages = advantages.expand(completion_ids.shape).contiguous()
            old = inputs.get("old_per_token_logps")
            ref = inputs.get("ref_per_token_logps") if self.beta != 0.0 else None
            ent_w = None
            if self._entropy_bonus_enabled:
                ent_w = -self.entropy_coef * m / m.sum().clamp(min=1.0) / accum
            head = unwrapped.get_output_embeddings()

            def grpo(hidden):  # lm_head's forward: ZeRO-3 / FSDP2 gather its weight, also for the backward
                with self.accelerator.autocast():
                    h, w, b = _projection(hidden, head.weight, head.bias)
                out = GRPO.call(
                    input=h,
                    weight=w,
                    target=completion_ids,
                    bias=b,
                    token_weight=weights,
                    advantages=advantages,
                    old_logprobs=None if old is None else old.detach().to(cdt),
                    ref_logprobs=None if ref is None else ref.detach().to(cdt),
                    entropy_weight=ent_w,
                    loss_type=lt,
                    importance_sampling_level=self.importance_sampling_level,
                    beta=float(self.beta),
                    epsilon_low=float(self.epsilon_low),
                    epsilon_high=float(self.epsilon_high),
                    delta=None if self.args.delta is None else float(self.args.delta),
                    use_bias_correction_kl=bool(self.args.use_bias_correction_kl),
                    sapo_temperature_pos=float(self.args.sapo_temperature_pos),
                    sapo_temperature_neg=float(self.args.sapo_temperature_neg),
                    temperature=float(self.temperature),
                    logit_scale=head_opts["logit_scale"],
                    softcap=head_opts["softcap"],
                    return_entropy=True,
                )
                family.donate(out[0])
                return out

            loss, logp, entropies, _ = call_as_forward(head, grpo, hidden)
            self._memops_metrics(
                mode, logp.detach(), entropies, advantages, old, ref, mask, m, loss, ent_w, policy_scale
            )
            return loss

        def _memops_metrics(self, mode, logp, entropies, advantages, old, ref, mask, m, loss, ent_w, policy_scale):
            """TRL 1.16's logged metrics, from the log-probs and entropies memops returned."""
            with torch.no_grad():
                terms = metric_terms(
                    logp,
                    advantages,
                    old,
                    ref if self.beta != 0.0 else None,
                    m,
                    loss_type=self.loss_type,
                    level=self.importance_sampling_level,
                    epsilon_low=self.epsilon_low,
                    epsilon_high=self.epsilon_high,
                    delta=self.args.delta,
                    bias_corrected=bool(self.args.use_bias_correction_kl),
                )
                if ent_w is not None:
                    policy = (loss.detach() - (entropies * ent_w).sum()) * policy_scale
                    self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy).nanmean().item())
                    if mode == "train" and self.accelerator.sync_gradients:
                        self._metrics[mode]["entropy_coef"].append(self.entropy_coef)

                def masked_seq_mean(x):
                    if x.shape[1] == 1:
                        return x.squeeze(1)
                    return (x * mask).sum(-1) / mask.sum(-1)

                def global_masked_mean(x):
                    if x.shape[1] == 1:
                        local_sum, local_count = x.sum(), torch.tensor(float(x.shape[0]), device=x.device)
                    else:
                        local_sum, local_count = (x * mask).sum(), mask.sum().float()
                    totals = self.accelerator.reduce(torch.stack([local_sum, local_count]), reduction="sum")
                    return (totals[0] / totals[1].clamp(min=1.0)).item()

                if "kl" in terms:
                    self._metrics[mode]["kl"].append(global_masked_mean(terms["kl"]))
                self._metrics[mode]["entropy"].append(global_masked_mean(entropies))
                if "clip_ratio/low" in terms:
                    low, high = terms["clip_ratio/low"].float(), terms["clip_ratio/high"].float()
                    self._metrics[mode]["clip_ratio/low_mean"].append(global_masked_mean(low))
                    self._metrics[mode]["clip_ratio/high_mean"].append(global_masked_mean(high))
                    self._metrics[mode]["clip_ratio/region_mean"].append(global_masked_mean(torch.maximum(low, high)))
                    gathered_low = self.accelerator.gather(masked_seq_mean(low))
                    self._metrics[mode]["clip_ratio/low_min"].append(nanmin(gathered_low).item())
                    gathered_high = self.accelerator.gather(masked_seq_mean(high))
                    self._metrics[mode]["clip_ratio/high_max"].append(nanmax(gathered_high).item())
                elif "cispo_clip_ratio" in terms:
                    self._metrics[mode]["cispo_clip_ratio"].append(
                        global_masked_mean(terms["cispo_clip_ratio"].float())
                    )

    return GRPOTrainer
