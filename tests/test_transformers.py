"""Hugging Face transformers integration: patched causal LMs train like the unpatched ones, without logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from reference import ref_linear_cross_entropy  # noqa: E402

import memops  # noqa: E402
from memops.integrations import transformers as mt  # noqa: E402
from memops.integrations.hf import tiny as hf_tiny  # noqa: E402

V = hf_tiny.VOCAB
# the tiny builder's sizes (memops/integrations/hf/tiny.py), passed to each family's config class by name
_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
COMMON = dict(vocab_size=V, max_position_embeddings=64, **{k: hf_tiny.SMALL[k] for k in _SIZES})
MOE = {k: hf_tiny.SMALL[k] for k in ("num_experts_per_tok", "output_router_logits", "router_aux_loss_coef")}
TOKENS = {k: hf_tiny.SMALL[k] for k in ("pad_token_id", "bos_token_id", "eos_token_id")}
# family: (config class, model class, config arguments); every model is built from a tiny config in float64
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(MOE, head_dim=8, num_experts=4, moe_intermediate_size=16),
    ),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(MOE, num_local_experts=4)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(MOE, head_dim=8, num_local_experts=4)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8, "final_logit_softcapping": 2.0}),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 8, "final_logit_softcapping": 3.0}),
    "gemma3": ("Gemma3Config", "Gemma3ForConditionalGeneration", None),  # with an image
    "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", None),  # with an image
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "cohere": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.25}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 4.0}),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", TOKENS),
}


def _vlm_config(family):
    text = dict(COMMON, **TOKENS)
    if family == "gemma3":
        vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                      patch_size=8)  # fmt: skip
        return transformers.Gemma3Config(
            text_config=dict(text, head_dim=8, final_logit_softcapping=5.0),  # the text config's; not applied
            vision_config=vision,
            mm_tokens_per_image=4,
            image_token_index=5,
            boi_token_index=3,
            eoi_token_index=4,
        )
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=32, window_size=8, fullatt_block_indexes=[0])  # fmt: skip
    text["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 1, 1]}
    return transformers.Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=5, video_token_id=6, vision_start_token_id=3,
        vision_end_token_id=4,
    )  # fmt: skip


def _model(family, seed=0, bias=False):
    cfg_name, cls_name, extra = FAMILIES[family]
    torch.manual_seed(seed)
    cfg = _vlm_config(family) if extra is None else getattr(transformers, cfg_name)(**COMMON, **extra)
    model = getattr(transformers, cls_name)(cfg)
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")  # the grouped-matmul experts take no float64
    model = model.double()
    if bias:  # exercise the lm_head bias path
        head = model.get_output_embeddings()
        head.bias = torch.nn.Parameter(torch.randn(V, dtype=torch.float64) * 0.1)
    return model.train()


def _batch(seed=1, b=3, t=11):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(7, V, (b, t), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # prompt tokens
    labels[2, -3:] = -100  # padding
    return ids, labels


def _inputs(family, ids):
    """The model inputs besides labels: token ids, and an image per sequence for the vision-language models."""
    g = torch.Generator().manual_seed(2)
    if family == "gemma3":  # 4 image tokens per sequence, 32x32 pixels
        ids = ids.clone()
        ids[:, 6:10] = 5
        pixels = torch.randn(ids.shape[0], 3, 32, 32, generator=g, dtype=torch.float64)
        return dict(input_ids=ids, pixel_values=pixels, token_type_ids=(ids == 5).long())
    if family == "qwen2_5_vl":  # one image per sequence: a 4x4 patch grid merged into 4 tokens
        ids = ids.clone()
        ids[:, 5], ids[:, 6:10], ids[:, 10] = 3, 5, 4
        patches = torch.randn(16 * ids.shape[0], 3 * 2 * 4 * 4, generator=g, dtype=torch.float64)
        return dict(input_ids=ids, pixel_values=patches, image_grid_thw=torch.tensor([[1, 4, 4]] * ids.shape[0]))
    return dict(input_ids=ids)


def _ref_loss(model, inputs, labels, shift_labels=None, num_items=None):
    """Float64 loss from the unpatched model's own logits (its loss_function upcasts to fp32 only), plus
    its router auxiliary loss where it has one."""
    out = model(**inputs)
    t = shift_labels if shift_labels is not None else F.pad(labels, (0, 1), value=-100)[:, 1:]
    # logits are final (scaled / soft-capped where the model does it): a projection by the identity
    eye = torch.eye(V, dtype=torch.float64)
    loss = ref_linear_cross_entropy(out.logits, eye, t, num_items=num_items)
    if getattr(out, "aux_loss", None) is not None:
        loss = loss + model.router_aux_loss_coef * out.aux_loss
    return loss


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("mode", ["labels", "num_items", "shift_labels", "bias"])
def test_patched_model_matches_unpatched(family, mode):
    model = _model(family, bias=mode == "bias")
    ids, labels = _batch()
    inputs = _inputs(family, ids)
    labels = torch.where(labels == -100, -100, inputs["input_ids"])
    kw, shift, num_items = {"labels": labels}, None, None
    if mode == "num_items":
        num_items = torch.tensor(40)
        kw["num_items_in_batch"] = num_items
    if mode == "shift_labels":
        shift = labels.roll(1, dims=1)  # pre-shifted labels (context parallelism) replace the shifting
        kw["shift_labels"] = shift
    params = [p for p in model.parameters() if p.requires_grad]
    hf = model(**inputs, **kw)  # transformers' own loss (fp32 upcast inside)
    ref = _ref_loss(model, inputs, labels, shift, num_items)
    ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
    torch.testing.assert_close(hf.loss.double(), ref, rtol=1e-6, atol=1e-6)
    mt.apply(model)
    try:
        out = model(**inputs, **kw)
        assert out.logits is None
        grads = torch.autograd.grad(out.loss, params, allow_unused=True)
    finally:
        mt.revert(model)
    torch.testing.assert_close(out.loss, ref, rtol=1e-10, atol=1e-10)
    for (name, _), a, r in zip(model.named_parameters(), grads, ref_grads):
        if r is None:
            assert a is None, f"{family} {name}"
            continue
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
        ("xlnet", "is not supported.*at the .head. step"),
        ("no_such_model", "unknown causal LM model_type"),
    ],
)
def test_unsupported_models_get_a_clear_error(target, message):
    with pytest.raises(ValueError, match=message):
        mt.apply(target)


def test_verify_takes_a_type_a_class_or_an_instance_and_names_what_differs():
    """``verify``: the public seam the integrations refuse models through."""
    model = _model("llama")
    for target in ("llama", type(model), model):
        spec = mt.verify(target)
        assert spec.path.delegate is None and spec.logit_scale(model) == 1.0
    for target in ("xlnet", transformers.XLNetLMHeadModel):
        with pytest.raises(ValueError, match="is not supported.*at the .head. step"):
            mt.verify(target)
    with pytest.raises(ValueError, match="unknown causal LM model_type"):
        mt.verify("no_such_model")
    with pytest.raises(ValueError, match="verify: target is None"):
        mt.verify(None)
    model.loss_function = lambda *a, **k: None  # what the class leaves to the instance is checked too
    with pytest.raises(ValueError, match="loss_function"):
        mt.verify(model)


class _ExtraLossLlama(transformers.LlamaForCausalLM):
    """A model whose loss has a term memops would not compute."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        if out.loss is not None:
            out.loss = out.loss + 0.01 * sum(p.square().sum() for p in self.parameters())
        return out


class _ScaledLogitsLlama(transformers.LlamaForCausalLM):
    """A model that transforms its logits in a way memops does not know."""

    def forward(self, *args, labels=None, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2.0
        if labels is not None:
            out.loss = self.loss_function(out.logits, labels, self.config.vocab_size)
        return out


@pytest.mark.parametrize("cls", [_ExtraLossLlama, _ScaledLogitsLlama])
def test_a_model_that_would_train_differently_is_refused(cls):
    model = cls(transformers.LlamaConfig(**COMMON))
    where = rf"\(its forward: .*{cls.__qualname__}.forward\)"
    with pytest.raises(ValueError, match=rf"{cls.__name__} is not supported: .*at the 'forward' step.*{where}"):
        mt.apply(model)
    with pytest.raises(ValueError, match="is not supported"):
        mt.apply(cls)
    assert "forward" not in model.__dict__ and not hasattr(cls, mt._PATCHED)


def test_subclass_keeping_the_verified_forward_is_accepted():
    class Renamed(transformers.LlamaForCausalLM):
        pass

    model = Renamed(transformers.LlamaConfig(**COMMON)).double().train()
    ids, labels = _batch()
    expected = model(input_ids=ids, labels=labels).loss
    mt.apply(model)
    torch.testing.assert_close(model(input_ids=ids, labels=labels).loss, expected.double(), rtol=1e-6, atol=1e-6)


def test_peft_modules_to_save_trains_the_copy_and_disabled_adapters_use_the_original():
    peft = pytest.importorskip("peft")
    model = _model("llama")
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    wrapper = pm.get_base_model().lm_head
    with torch.no_grad():  # the trained copy differs from the original
        wrapper.modules_to_save["default"].weight.add_(torch.randn(V, 32, dtype=torch.float64))
    ids, labels = _batch()
    params = [p for p in pm.parameters() if p.requires_grad]
    expected = pm(input_ids=ids, labels=labels).loss
    expected_grads = torch.autograd.grad(expected, params)
    with pm.disable_adapter():
        expected_off = pm(input_ids=ids, labels=labels).loss
    mt.apply(pm.get_base_model())
    try:
        out = pm(input_ids=ids, labels=labels)
        grads = torch.autograd.grad(out.loss, params)
        with pm.disable_adapter():
            off = pm(input_ids=ids, labels=labels)
    finally:
        mt.revert(pm.get_base_model())
    assert out.logits is None and off.logits is None
    torch.testing.assert_close(out.loss.double(), expected.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(off.loss.double(), expected_off.double(), rtol=1e-6, atol=1e-6)
    assert abs(out.loss.item() - off.loss.item()) > 1e-3  # the copy, not the original, in the first call
    assert any(p is wrapper.modules_to_save["default"].weight for p in params)  # the copy trains
    names = [n for n, p in pm.named_parameters() if p.requires_grad]
    for name, a, r in zip(names, grads, expected_grads):
        torch.testing.assert_close(a, r.to(a.dtype), rtol=1e-5, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")


def test_peft_lora_on_lm_head_is_refused_naming_the_adapter():
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(_model("llama"), peft.LoraConfig(r=4, target_modules=["lm_head"]))
    with pytest.raises(ValueError, match=r"LoRA adapter\(s\) \['default'\], not an nn.Linear"):
        mt.apply(pm.get_base_model())


def test_partitioned_lm_head_is_a_clear_error():
    model = _model("llama")
    mt.apply(model)
    head = model.get_output_embeddings()
    full = head.weight
    head.weight = torch.nn.Parameter(torch.empty(0, dtype=torch.float64))  # as DeepSpeed ZeRO-3 leaves it
    ids, labels = _batch()
    try:
        with pytest.raises(ValueError, match="weight has no elements.*not gathered.*GatheredParameters"):
            model(input_ids=ids, labels=labels)
    finally:
        head.weight = full
        mt.revert(model)


def test_the_families_tested_here_stay_verified():
    """The classes this file tests keep being accepted (the structural rule and the record agree)."""
    from memops.integrations.hf import tested as hf_tested

    for family, (_, cls_name, _) in FAMILIES.items():
        assert cls_name in hf_tested.TESTED, family
        mt._verified(getattr(transformers, cls_name))


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


def test_train_demo_trains_a_new_family_and_refuses_an_unverified_one(tmp_path):
    """``--model-type``: a verified type from its own config class (Qwen3.5: gated linear attention) trains with
    the unpatched loss curve; a type the rule refuses stops before training, naming the step."""
    import json
    import subprocess
    import sys

    pytest.importorskip("tokenizers")
    common = ["--steps", "2", "--accum", "1", "--vocab", "400", "--corpus-mb", "0.2", "--seq", "16"]
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "memops", "train-demo", "--model-type", "qwen3_5", *common, "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((out / "train_demo.json").read_text())
    assert data["parity_ok"] is True and data["max_rel_diff"] < 1e-4
    assert "tiny qwen3_5 (" in proc.stdout
    cmd = [sys.executable, "-m", "memops", "train-demo", "--model-type", "xlnet", *common, "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "at the 'head' step" in proc.stderr


def test_train_demo_help_documents_every_option_and_default():
    import argparse

    from memops import train_demo

    parser = argparse.ArgumentParser()
    train_demo.add_arguments(parser)
    shown = [a for a in parser._actions if a.help not in (argparse.SUPPRESS, None) and a.dest != "help"]
    assert {a.dest for a in shown} == {
        "config",
        "model_type",
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
    from memops.train_demo import CONFIGS

    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIGS["llama-3.2-1b"]))
    assert sum(p.numel() for p in model.parameters()) == 1_235_814_400  # Llama 3.2 1B, tied embeddings
