"""Hugging Face transformers integration: patched causal LMs train like the unpatched ones, without logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from reference import ref_linear_cross_entropy  # noqa: E402

import memops  # noqa: E402
from memops.integrations import transformers as mt  # noqa: E402

V = 97
COMMON = dict(
    vocab_size=V,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8, "final_logit_softcapping": 2.0}),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 8, "final_logit_softcapping": 3.0}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}),
    "olmo2 (generic path)": ("Olmo2Config", "Olmo2ForCausalLM", {}),
}


def _model(family, seed=0, bias=False):
    cfg_name, cls_name, extra = FAMILIES[family]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cfg_name)(**COMMON, **extra)
    model = getattr(transformers, cls_name)(cfg).double()
    if bias:  # exercise the lm_head bias path
        head = model.get_output_embeddings()
        head.bias = torch.nn.Parameter(torch.randn(V, dtype=torch.float64) * 0.1)
    return model.train()


def _batch(seed=1, b=3, t=11):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (b, t), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # prompt tokens
    labels[2, -3:] = -100  # padding
    return ids, labels


def _ref_loss(model, ids, labels, shift_labels=None, num_items=None):
    """Float64 loss from the unpatched model's own logits (its loss_function upcasts to fp32 only)."""
    logits = model(input_ids=ids).logits
    t = shift_labels if shift_labels is not None else F.pad(labels, (0, 1), value=-100)[:, 1:]
    # logits are final (soft-capped where the model does it): a projection by the identity
    eye = torch.eye(V, dtype=torch.float64)
    return ref_linear_cross_entropy(logits, eye, t, num_items=num_items)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("mode", ["labels", "num_items", "shift_labels", "bias"])
def test_patched_model_matches_unpatched(family, mode):
    model = _model(family, bias=mode == "bias")
    ids, labels = _batch()
    kw, shift, num_items = {"labels": labels}, None, None
    if mode == "num_items":
        num_items = torch.tensor(40)
        kw["num_items_in_batch"] = num_items
    if mode == "shift_labels":
        shift = labels.roll(1, dims=1)  # pre-shifted labels (context parallelism) replace the shifting
        kw["shift_labels"] = shift
    params = [p for p in model.parameters() if p.requires_grad]
    hf = model(input_ids=ids, **kw)  # transformers' own loss (fp32 upcast inside)
    ref = _ref_loss(model, ids, labels, shift, num_items)
    ref_grads = torch.autograd.grad(ref, params)
    torch.testing.assert_close(hf.loss.double(), ref, rtol=1e-6, atol=1e-6)
    mt.apply(model)
    try:
        out = model(input_ids=ids, **kw)
        assert out.logits is None
        grads = torch.autograd.grad(out.loss, params)
    finally:
        mt.revert(model)
    torch.testing.assert_close(out.loss, ref, rtol=1e-10, atol=1e-10)
    for (name, _), a, r in zip(model.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-10, msg=lambda m, name=name: f"{family} {name}: {m}")


def test_unchanged_without_labels_in_eval_and_after_revert():
    model = _model("llama")
    ids, labels = _batch()
    expected = model(input_ids=ids, labels=labels)
    mt.apply(model)
    assert model(input_ids=ids).logits.shape == (3, 11, V)  # no labels: the original forward
    model.eval()
    out = model(input_ids=ids, labels=labels)  # eval: unchanged unless asked
    torch.testing.assert_close(out.logits, expected.logits)
    torch.testing.assert_close(out.loss, expected.loss)
    mt.apply(model, eval=True)
    assert model(input_ids=ids, labels=labels).logits is None
    mt.revert(model)
    model.train()
    assert model(input_ids=ids, labels=labels).logits is not None


def test_logits_to_keep_and_return_dict_false():
    model = _model("qwen2")
    ids, labels = _batch()
    shift = F.pad(labels, (0, 1), value=-100)[:, 1:]
    ref_logits = model(input_ids=ids).logits[:, -5:]
    ref = ref_linear_cross_entropy(ref_logits, torch.eye(V, dtype=torch.float64), shift[:, -5:])
    mt.apply(model)
    out = model(input_ids=ids, labels=labels, logits_to_keep=5)
    torch.testing.assert_close(out.loss, ref, rtol=1e-10, atol=1e-10)
    as_tuple = model(input_ids=ids, labels=labels, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.is_tensor(as_tuple[0]) and as_tuple[0].dim() == 0


def test_class_level_apply_and_revert():
    cls = transformers.MistralForCausalLM
    original = cls.forward
    mt.apply("mistral")
    try:
        model = _model("mistral")
        ids, labels = _batch()
        assert model(input_ids=ids, labels=labels).logits is None
    finally:
        mt.revert("mistral")
    assert cls.forward is original
    assert model(input_ids=ids, labels=labels).logits is not None


@pytest.mark.parametrize(
    "target,message",
    [
        ("gpt2", "is not supported"),
        ("granite", "is not supported"),
        ("no_such_model", "unknown causal LM model_type"),
    ],
)
def test_unsupported_models_get_a_clear_error(target, message):
    with pytest.raises(ValueError, match=message):
        mt.apply(target)


def test_trainer_gradient_accumulation_matches_unpatched(tmp_path, monkeypatch):
    pytest.importorskip("accelerate")
    calls = []
    fused = memops.linear_cross_entropy

    def counting(*args, **kwargs):
        calls.append(kwargs.get("num_items"))
        return fused(*args, **kwargs)

    monkeypatch.setattr(memops, "linear_cross_entropy", counting)
    from transformers import Trainer, TrainingArguments

    g = torch.Generator().manual_seed(3)
    rows = []
    for i in range(8):  # ragged lengths, padded: num_items_in_batch matters
        n = 6 + (i % 4) * 2
        ids = torch.randint(1, V, (12,), generator=g)
        mask = torch.zeros(12, dtype=torch.long)
        mask[:n] = 1
        labels = torch.where(mask.bool(), ids, -100)
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": labels})

    def train(patched):
        model = _model("llama", seed=5)
        if patched:
            mt.apply(model)
        args = TrainingArguments(
            output_dir=str(tmp_path / str(patched)),
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            max_steps=3,
            learning_rate=1e-3,
            logging_steps=1,
            report_to=[],
            save_strategy="no",
            seed=0,
            use_cpu=True,
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=args, train_dataset=rows)
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}

    base_losses, base_state = train(False)
    losses, state = train(True)
    assert len(losses) == 3
    assert len(calls) == 6 and all(n is not None for n in calls)  # 3 steps x 2 micro-batches, HF's num_items
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(base_losses), rtol=1e-5, atol=1e-6)
    for k in base_state:
        torch.testing.assert_close(state[k], base_state[k], rtol=1e-6, atol=1e-7, msg=lambda m, k=k: f"{k}: {m}")


def test_train_demo_tiny_end_to_end(tmp_path):
    import json
    import subprocess
    import sys

    pytest.importorskip("tokenizers")
    out = tmp_path / "demo"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "memops",
            "train-demo",
            "--steps",
            "3",
            "--vocab",
            "600",
            "--corpus-mb",
            "0.3",
            "--seq",
            "32",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "(fp32 threshold 1e-4: OK)" in proc.stdout
    data = json.loads((out / "train_demo.json").read_text())
    assert data["parity_ok"] is True and data["max_rel_diff"] < 1e-4
    for run in ("unpatched", "memops"):
        assert len(data["runs"][run]["losses"]) == 3 and data["runs"][run]["peak_bytes"] > 0
    assert "| memops |" in (out / "train_demo.md").read_text()
    assert (out / "loss_curves.png").stat().st_size > 1000
    for variant in ("unpatched", "memops"):  # per-step progress: step, loss, time
        for step, loss in enumerate(data["runs"][variant]["losses"], 1):
            assert f"[{variant}] step {step}/3  loss {loss:.6f}  " in proc.stdout


def test_train_demo_help_documents_every_option_and_default():
    import argparse

    from memops.integrations import train_demo

    parser = argparse.ArgumentParser()
    train_demo.add_arguments(parser)
    shown = [a for a in parser._actions if a.help not in (argparse.SUPPRESS, None) and a.dest != "help"]
    assert {a.dest for a in shown} == {
        "config",
        "steps",
        "accum",
        "batch",
        "seq",
        "vocab",
        "corpus_mb",
        "lr",
        "dtype",
        "device",
        "out",
    }
    text = parser.format_help()
    for a in shown:
        assert "(default: %(default)s)" in a.help, a.dest
        assert f"(default: {a.default})" in " ".join(text.split()), a.dest


def test_llama_3_2_1b_config_builds_the_1b_architecture():
    from memops.integrations.train_demo import CONFIGS

    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIGS["llama-3.2-1b"]))
    assert sum(p.numel() for p in model.parameters()) == 1_235_814_400  # Llama 3.2 1B, tied embeddings
