"""memops in verl 0.9.1's fused log-prob head, at op level: ``memops.integrations.verl.FusedLinearForPPO`` and
``linear_cross_entropy`` against verl's own torch backend (``FusedLinearForPPOFunction``, which stays
unpatched) and against float64, fp32 and bf16, vocabularies not a multiple of 128, all-negative logits.

Runs in a venv of its own (``.ci/run``: ``pip install torch==2.13.0 verl==0.9.1``)."""

from __future__ import annotations

import pytest
import torch

verl = pytest.importorskip("verl")

from verl.utils.experimental import torch_functional as tf  # noqa: E402

from memops.integrations import verl as mv  # noqa: E402  (installs memops in verl's fused head)


def _exact(h, w, ids, temperature):
    """float64 unfused log-probs and entropy, and the gradients of ``sum(a * logp + b * entropy)``."""
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    t = temperature.double().unsqueeze(-1) if isinstance(temperature, torch.Tensor) else temperature
    logits = (h64 @ w64.T) / t
    logp_all = logits.log_softmax(-1)
    logp = logp_all.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp, ent, h64, w64


def _grads(logp, ent, params, seed=1):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(logp.shape, generator=g, dtype=torch.float64)
    b = torch.randn(ent.shape, generator=g, dtype=torch.float64)
    return torch.autograd.grad((a * logp.double() + b * ent.double()).sum(), params)


def _three_ways(logp, ent, h, w, ids, temperature):
    """``(memops, verl, float64)``: each one's log-probs, entropy and input / weight gradients on the same inputs
    (memops' from the given outputs of ``h`` and ``w``; verl's torch backend in chunks of 16 rows)."""
    ours = (logp, ent, *_grads(logp, ent, (h, w)))
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    lv, ev = tf.FusedLinearForPPOFunction.apply(h2, w2, ids, temperature, 16)
    theirs = (lv, ev, *_grads(lv, ev, (h2, w2)))
    le, ee, h64, w64 = _exact(h, w, ids, temperature)
    return ours, theirs, (le, ee, *_grads(le, ee, (h64, w64)))


def _err(x, ref):
    return (x.double() - ref).abs().max().item()


def _data(n, d, v, dtype, negative=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g)
    w = torch.randn(v, d, generator=g) * 0.3
    if negative:  # every logit negative: positive hidden states, negative weights
        h, w = h.abs() + 0.1, -(w.abs() + 0.05)
    ids = torch.randint(0, v, (n,), generator=g)
    return h.to(dtype).requires_grad_(), w.to(dtype).requires_grad_(), ids


CASES = [
    # (tokens, hidden, vocab, all-negative logits)
    (37, 64, 1000, False),  # V not a multiple of 128 (verl#2899's sizes class)
    (50, 48, 259, True),  # all-negative logits (verl#7439), V odd, D not a multiple of 128
    (16, 128, 4096, False),
]


@pytest.mark.parametrize("n, d, v, negative", CASES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_linear_for_ppo_fp32_matches_float64_and_verl(n, d, v, negative, temperature):
    """fp32: log-probs, entropy and both gradients within 2e-5 of float64 and no further from it than verl's
    torch backend plus 2e-6 (two fp32 computations, each a few roundings from exact)."""
    h, w, ids = _data(n, d, v, torch.float32, negative)
    logp, ent = tf.FusedLinearForPPO()(h, w, ids, temperature)  # memops: the class verl looks up
    assert isinstance(tf.FusedLinearForPPO(), mv.FusedLinearForPPO)
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32 and logp.shape == ids.shape
    ours, theirs, exact = _three_ways(logp, ent, h, w, ids, temperature)
    for name, a, b, e in zip(("logp", "entropy", "grad h", "grad w"), ours, theirs, exact):
        scale = max(1.0, e.abs().max().item())
        assert _err(a, e) <= 2e-5 * scale, (name, _err(a, e))
        assert _err(a, e) <= _err(b, e) + 2e-6 * scale, (name, _err(a, e), _err(b, e))


@pytest.mark.parametrize("n, d, v, negative", CASES)
def test_fused_linear_for_ppo_bf16_no_worse_than_verl(n, d, v, negative):
    """bf16 hidden states and weight: the entropy comes back in bf16 as verl's does; every output's error against
    float64 (on the same bf16 inputs) at most 1.5x verl's torch backend's (a stated margin for two different
    roundings: verl rounds the logits and their temperature division in bf16, memops scales in fp32; measured
    0.39x to 1.20x)."""
    temperature = 0.7
    h, w, ids = _data(n, d, v, torch.bfloat16, negative)
    logp, ent = tf.FusedLinearForPPO(impl_backend="liger")(h, w, ids, temperature)
    assert logp.dtype == torch.float32 and ent.dtype == torch.bfloat16
    ours, theirs, exact = _three_ways(logp, ent, h, w, ids, temperature)
    for name, a, b, e in zip(("logp", "entropy", "grad h", "grad w"), ours, theirs, exact):
        assert _err(a, e) <= 1.5 * _err(b, e), (name, _err(a, e), _err(b, e))


def test_per_token_temperature_and_3d_inputs():
    """A temperature per sample (``[B, 1]``) on ``[B, T, D]`` hidden states, which verl's fused path refuses:
    exact against float64 in float64."""
    g = torch.Generator().manual_seed(3)
    B, T, D, V = 3, 5, 8, 211
    h = torch.randn(B, T, D, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, D, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, V, (B, T), generator=g)
    temp = torch.rand(B, 1, generator=g, dtype=torch.float64) + 0.5
    logp, ent = mv.FusedLinearForPPO()(h, w, ids, temp)
    le, ee, h64, w64 = _exact(h, w, ids, temp.expand(B, T))
    torch.testing.assert_close(logp, le, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ent, ee, rtol=1e-12, atol=1e-12)
    for a, b in zip(_grads(logp, ent, (h, w)), _grads(le, ee, (h64, w64))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_triton_backend_entry_point(reduction):
    """``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy`` (the FSDP "triton" backend's and the
    Megatron engine's entry point) is memops' on CPU: flat fp32 outputs, log-probs reduced as asked."""
    from verl.utils.kernel import linear_cross_entropy as k

    assert k.linear_cross_entropy is mv.linear_cross_entropy
    g = torch.Generator().manual_seed(4)
    h = torch.randn(2, 6, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(300, 16, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 300, (2, 6), generator=g)
    logp, ent = k.linear_cross_entropy(h, w, ids, 0.9, reduction)
    le, ee, _, _ = _exact(h.reshape(12, 16), w, ids.reshape(12), 0.9)
    want = {"none": le, "sum": le.sum(), "mean": le.mean()}[reduction]
    torch.testing.assert_close(logp, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ent, ee, rtol=1e-12, atol=1e-12)


def test_errors_name_the_argument():
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match="input_ids"):
        mv.FusedLinearForPPO()(h, w, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction"):
        mv.linear_cross_entropy(h, w, torch.zeros(4, dtype=torch.long), 1.0, "avg")
    with pytest.raises(ValueError, match="temperature"):
        mv.FusedLinearForPPO()(h, w, torch.zeros(4, dtype=torch.long), -1.0)


def test_uninstall_restores_verl():
    from verl.utils.kernel import linear_cross_entropy as k

    mv.uninstall()
    try:
        assert tf.FusedLinearForPPO is not mv.FusedLinearForPPO
        assert k.linear_cross_entropy is not mv.linear_cross_entropy
    finally:
        mv.install()
    assert tf.FusedLinearForPPO is mv.FusedLinearForPPO


def test_every_place_verl_binds_the_head_gets_memops():
    """By structure, over verl's whole source: every import of ``FusedLinearForPPO`` or the kernel's
    ``linear_cross_entropy`` is either inside a function (looked up when it runs: memops' once installed) or a
    module-level binding in a module this integration patches by attribute; and each of those bindings is
    memops' now. A verl release that binds the head somewhere new fails here."""
    import ast
    import importlib
    import pathlib

    names = {"FusedLinearForPPO", "linear_cross_entropy"}
    sources = {"verl.utils.experimental.torch_functional", "verl.utils.kernel.linear_cross_entropy"}
    root = pathlib.Path(verl.__file__).parent
    early, late = set(), set()
    for path in root.rglob("*.py"):
        module = ".".join(path.relative_to(root.parent).with_suffix("").parts)
        tree = ast.parse(path.read_text())
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in sources:
                for alias in node.names:
                    if alias.name in names:
                        (early if id(node) in top else late).add((module, alias.asname or alias.name))
    patched = {(m, a) for m, a in mv._TARGETS}
    assert early <= patched, f"module-level bindings of the head not patched here: {early - patched}"
    assert late, "verl's patched forwards import the head inside their functions"
    for module, attr in early:
        try:
            loaded = importlib.import_module(module)
        except ImportError:  # megatron-core missing: that engine cannot run either
            continue
        assert getattr(loaded, attr) is getattr(mv, attr), (module, attr)
    for module in sources:
        attr = "FusedLinearForPPO" if "experimental" in module else "linear_cross_entropy"
        assert getattr(importlib.import_module(module), attr) is getattr(mv, attr)
