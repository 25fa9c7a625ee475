"""Run in a fresh process with ``VERL_USE_EXTERNAL_MODULES=memops.integrations.verl`` (memops loaded by verl's
own mechanism when ``import verl`` runs): a tiny float64 model of ``argv[1]``'s HF type
(``memops.integrations.hf.tiny``; one image per sequence for a vision-language one), patched by verl's
``patch_forward_with_backends`` for backend ``argv[2]``, against the same model unpatched (its logits, then
log-softmax and entropy in float64): log-probs, entropy and every parameter's gradient.  Prints "ok"."""

from __future__ import annotations

import copy
import sys

import torch
import verl  # noqa: F401  (imports memops.integrations.verl through VERL_USE_EXTERNAL_MODULES)
from verl.models.transformers.monkey_patch import patch_forward_with_backends


def _model(kind: str):
    """A tiny float64 model in training mode: ``memops.integrations.hf.tiny``'s causal LM of the HF type, with
    Qwen2-VL's multimodal rotary sections fitted to its small head; Qwen3.5 as its vision-language class
    (``Qwen3_5ForConditionalGeneration``, model type ``qwen3_5``: the class verl's ``qwen3_5.py`` forward
    patches; its causal-LM class is ``qwen3_5_text`` and takes ``dense_common``'s)."""
    from memops.integrations.hf import tiny

    if kind == "qwen3_5":
        import transformers

        torch.manual_seed(0)
        config = tiny.small_config(transformers.Qwen3_5Config, {"mrope": True})
        return transformers.Qwen3_5ForConditionalGeneration(config).double().train()
    return tiny.build(kind, overrides={"mrope": True} if kind == "qwen2_vl" else None)


def main():
    kind, backend = sys.argv[1], sys.argv[2]
    from memops.integrations import verl as mv
    from memops.integrations.hf import tiny

    assert sys.modules["verl.utils.experimental.torch_functional"].FusedLinearForPPO is mv.FusedLinearForPPO
    model = _model(kind)
    ref = copy.deepcopy(model)
    try:
        images = tiny.image_inputs(model, seed=0)
    except tiny.NoImageInput:
        images = None  # text only (still the class's own verl forward)
    if images is None:
        ids, extra = torch.randint(3, 90, (2, 7), generator=torch.Generator().manual_seed(0)), {}
    else:
        ids, _, extra = images
    B, T = ids.shape
    if kind in ("qwen2_vl", "qwen3_5"):
        # verl's data pipeline gives Qwen-VL models (4, B, T) position ids: the text positions, then the
        # multimodal rotary ones (the model's own get_rope_index here, verl's copy of it there)
        grid = extra.get("image_grid_thw")
        types = extra.get("mm_token_type_ids", (ids == tiny.IMAGE_TOKEN).int())
        vision = model.model.get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=grid)[0]
        text = torch.arange(T).expand(1, B, T)
        extra = {**extra, "position_ids": torch.cat([text, vision], dim=0)}
    temperature = 0.8
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(B, T, generator=g, dtype=torch.float64), torch.randn(B, T, generator=g, dtype=torch.float64)

    # the unpatched model: full logits, then float64 log-softmax and entropy of the rolled input ids
    logits = ref(input_ids=ids, use_cache=False, **extra).logits.double() / temperature
    logp_all = logits.log_softmax(-1)
    want_logp = logp_all.gather(-1, torch.roll(ids, -1, -1).unsqueeze(-1)).squeeze(-1)
    want_ent = -(logp_all.exp() * logp_all).sum(-1)
    (a * want_logp + b * want_ent).sum().backward()

    original = type(model).forward
    patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend=backend)
    try:
        out = model(input_ids=ids, temperature=temperature, return_dict=True, use_cache=False, **extra)
    finally:
        type(model).forward = original
    logp, ent = out.log_probs.reshape(B, T), out.entropy.reshape(B, T)
    assert logp.dtype == torch.float64 and ent.dtype == torch.float64
    (a * logp + b * ent).sum().backward()
    torch.testing.assert_close(logp, want_logp, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ent, want_ent, rtol=1e-10, atol=1e-10)
    n = 0
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        if q.grad is None:  # not on the text path (an unused vision parameter): none on either side
            assert p.grad is None, name
            continue
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")
        n += 1
    assert n > 0
    print(f"{kind} {backend}: {n} parameter gradients ok")


if __name__ == "__main__":
    main()
