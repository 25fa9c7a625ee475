"""Run in a fresh process with ``VERL_USE_EXTERNAL_MODULES=memops.integrations.verl`` (memops loaded by verl's
own mechanism when ``import verl`` runs): a tiny model of ``argv[1]``'s type, patched by verl's
``patch_forward_with_backends`` for backend ``argv[2]``, against the same model unpatched (its logits, then
log-softmax and entropy in float64): log-probs, entropy and every parameter's gradient.  Prints "ok"."""

from __future__ import annotations

import copy
import sys

import torch
import transformers
import verl  # noqa: F401  (imports memops.integrations.verl through VERL_USE_EXTERNAL_MODULES)
from verl.models.transformers.monkey_patch import patch_forward_with_backends


def tiny(kind: str):
    common = dict(
        vocab_size=301,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    if kind == "qwen3":
        return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=8, **common))
    raise ValueError(kind)


def main():
    kind, backend = sys.argv[1], sys.argv[2]
    from memops.integrations import verl as mv

    assert sys.modules["verl.utils.experimental.torch_functional"].FusedLinearForPPO is mv.FusedLinearForPPO
    torch.manual_seed(0)
    model = tiny(kind).float()
    ref = copy.deepcopy(model)
    B, T, temperature = 2, 7, 0.8
    ids = torch.randint(0, model.config.vocab_size, (B, T))
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(B, T, generator=g, dtype=torch.float64), torch.randn(B, T, generator=g, dtype=torch.float64)

    # the unpatched model: full logits, then float64 log-softmax and entropy of the rolled input ids
    logits = ref(input_ids=ids).logits.double() / temperature
    logp_all = logits.log_softmax(-1)
    want_logp = logp_all.gather(-1, torch.roll(ids, -1, -1).unsqueeze(-1)).squeeze(-1)
    want_ent = -(logp_all.exp() * logp_all).sum(-1)
    (a * want_logp + b * want_ent).sum().backward()

    original = type(model).forward
    patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend=backend)
    try:
        out = model(input_ids=ids, temperature=temperature, return_dict=True)
    finally:
        type(model).forward = original
    logp, ent = out.log_probs.reshape(B, T), out.entropy.reshape(B, T)
    (a * logp.double() + b * ent.double()).sum().backward()
    torch.testing.assert_close(logp.double(), want_logp, rtol=0, atol=5e-6)
    torch.testing.assert_close(ent.double(), want_ent, rtol=0, atol=5e-6)
    n = 0
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert p.grad is not None and q.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
        n += 1
    print(f"{kind} {backend}: {n} parameter gradients ok")


if __name__ == "__main__":
    main()
