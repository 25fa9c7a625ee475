"""memops in Axolotl: the causal-LM loss of a fine-tune computed with ``memops.linear_cross_entropy``.

In the training YAML::

    plugins:
      - memops.integrations.axolotl.MemopsPlugin
    memops_linear_cross_entropy: true
    # optional: memops_precision: accurate | reference, memops_chunk_size: 4096, memops_kernels: auto | torch | triton

Axolotl turns each field of :class:`MemopsArgs` into a top-level YAML key.  Before the model loads, the plugin
refuses a ``model_type`` whose causal-LM class memops has not verified (``python -m memops models``), in
Axolotl's own error style; after it loads, it patches the model instance (the base model under a PEFT
adapter) with :func:`memops.integrations.transformers.apply`, which checks the instance again.  The options
are memops' process-wide settings (``memops.set_precision`` / ``set_chunk_size`` / ``set_kernels``).
Conflicting loss kernels are refused when the config is validated: Axolotl's ``chunked_cross_entropy``,
Cut Cross Entropy and Liger's fused linear cross-entropy each replace the same loss.

This module imports Axolotl: it is loaded by Axolotl (0.19 and later), never by ``import memops``.
"""

from __future__ import annotations

from typing import Literal

from axolotl.integrations.base import BasePlugin
from pydantic import BaseModel, Field, model_validator

# YAML keys of other kernels that replace the same loss
CONFLICTS = {
    "chunked_cross_entropy": "Axolotl's chunked cross-entropy",
    "cut_cross_entropy": "Cut Cross Entropy",
    "liger_fused_linear_cross_entropy": "Liger's fused linear cross-entropy",
}
KEY = "memops_linear_cross_entropy"


class MemopsArgs(BaseModel):
    """The plugin's YAML keys."""

    memops_linear_cross_entropy: bool | None = None
    memops_precision: Literal["reference", "accurate"] | None = None
    memops_chunk_size: int | None = Field(default=None, gt=0)
    memops_kernels: Literal["auto", "torch", "triton"] | None = None

    @model_validator(mode="before")
    @classmethod
    def check_no_other_loss_kernel(cls, data):
        if isinstance(data, dict) and data.get(KEY):
            for key, what in CONFLICTS.items():
                if data.get(key):
                    raise ValueError(
                        f"{KEY} and {key} both replace the loss ({what}); set `{key}: false` or disable {KEY}"
                    )
        return data


def refusal(model_type: str | None) -> str | None:
    """Why memops refuses ``model_type`` (None: verified)."""
    from .transformers import verify

    try:
        verify(model_type)
    except ValueError as exc:
        return str(exc)
    return None


def _error(model_type, why: str) -> ValueError:
    # Axolotl's capability errors: "<feature> is not supported for model_type=<type>. <reason> <hint>"
    return ValueError(
        f"{KEY} is not supported for model_type={model_type}. {why} Disable {KEY} for this model "
        "(python -m memops models lists the verified ones)."
    )


class MemopsPlugin(BasePlugin):
    """Axolotl plugin: ``memops_linear_cross_entropy: true`` computes the loss with memops."""

    def get_input_args(self):
        return "memops.integrations.axolotl.MemopsArgs"

    def pre_model_load(self, cfg):
        if not cfg.get(KEY):
            return
        why = refusal(cfg.model_config_type)
        if why is not None:
            raise _error(cfg.model_config_type, why)
        import memops

        if cfg.get("memops_precision"):
            memops.set_precision(cfg.memops_precision)
        if cfg.get("memops_chunk_size"):
            memops.set_chunk_size(cfg.memops_chunk_size)
        if cfg.get("memops_kernels"):
            memops.set_kernels(cfg.memops_kernels)

    def post_model_load(self, cfg, model):
        if not cfg.get(KEY):
            return
        from .transformers import apply

        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT model's own
        try:
            apply(base)
        except ValueError as exc:
            raise _error(cfg.model_config_type, str(exc)) from exc
