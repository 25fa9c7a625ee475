"""TRL 1.16's distillation trainers on memops (``memops.integrations.trl``): real trainers, tiny models built
from configs, a word-level tokenizer built in code, a few steps on CPU, against TRL's own losses."""

from __future__ import annotations

import inspect
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from memops.integrations import trl as mtrl  # noqa: E402

WORDS = [f"w{i}" for i in range(40)]
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def make_tokenizer():
    """A word-level tokenizer over ``WORDS``, built in code."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    out.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return out


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def _model(seed: int, hidden: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(SPECIALS) + len(WORDS),
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def _words(g: torch.Generator, n: int) -> str:
    return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=g))


@pytest.fixture
def patched():
    mtrl.apply()
    yield
    mtrl.revert()


def _distillation_run(tokenizer, tmp_path, spy=None):
    from trl.trainer import distillation_trainer

    g = torch.Generator().manual_seed(0)
    data = datasets.Dataset.from_dict({"prompt": [_words(g, 5) for _ in range(16)]})
    args = trl.DistillationConfig(**_common(tmp_path, max_completion_length=6, beta=0.5, temperature=0.9))
    if spy is not None:
        spy.inner = distillation_trainer._chunked_divergence_loss
        distillation_trainer._chunked_divergence_loss = spy
    try:
        trainer = trl.DistillationTrainer(
            model=_model(0, 32), teacher_model=_model(1, 48), args=args, train_dataset=data, processing_class=tokenizer
        )
        trainer.train()
    finally:
        if spy is not None:
            distillation_trainer._chunked_divergence_loss = spy.inner
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return logs, trainer.model.lm_head.weight.detach().clone()


class _Compare:
    """Runs memops' function and TRL's own on every call the trainer makes: values and student gradients."""

    def __init__(self):
        self.seen = []

    def __call__(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        ref = mtrl._ORIGINAL["divergence"](*args, **kwargs)
        hidden, weight = args[0], args[2]
        g_out = torch.autograd.grad(out[0], (hidden, weight), retain_graph=True)
        g_ref = torch.autograd.grad(ref[0], (hidden, weight), retain_graph=True)
        self.seen.append((out, ref, g_out, g_ref))
        return out


def test_distillation_trainer_loss_and_gradients_match_trl(tokenizer, tmp_path, patched):
    spy = _Compare()
    logs, weight = _distillation_run(tokenizer, tmp_path, spy)
    assert len(spy.seen) == 3 and len(logs) == 3
    for out, ref, g_out, g_ref in spy.seen:
        torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=1e-7)  # loss
        torch.testing.assert_close(out[1], ref[1], rtol=1e-5, atol=1e-5)  # entropy sum
        assert int(out[2]) == int(ref[2]) > 0  # valid tokens
        for a, b in zip(g_out, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert [round(h["loss"], 12) for h in logs] == [round(float(s[0][0].detach()), 12) for s in spy.seen]


def test_distillation_trainer_trains_like_trl(tokenizer, tmp_path):
    trl_logs, trl_weight = _distillation_run(tokenizer, tmp_path / "trl")
    mtrl.apply()
    try:
        logs, weight = _distillation_run(tokenizer, tmp_path / "memops")
    finally:
        mtrl.revert()
    for a, b in zip(logs, trl_logs):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["entropy"] == pytest.approx(b["entropy"], rel=1e-5)
    torch.testing.assert_close(weight, trl_weight, rtol=1e-4, atol=1e-6)


def _gkd_run(cls, tokenizer, tmp_path, bf16=False):
    from trl.experimental.gkd import GKDConfig

    g = torch.Generator().manual_seed(0)
    messages = [
        [
            {"role": "user", "content": _words(g, 4)},
            {"role": "assistant", "content": _words(g, int(torch.randint(2, 7, (1,), generator=g)))},
        ]
        for _ in range(16)
    ]
    args = GKDConfig(**_common(tmp_path, beta=0.3, lmbda=0.0, max_length=32, seed=3, bf16=bf16))
    trainer = cls(
        model=_model(0, 32),
        teacher_model=_model(1, 48),
        args=args,
        train_dataset=datasets.Dataset.from_dict({"messages": messages}),
        processing_class=tokenizer,
    )
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h], trainer.model.lm_head.weight.detach()


def test_gkd_trainer_matches_trl(tokenizer, tmp_path):
    from trl.experimental.gkd import GKDTrainer

    want, want_w = _gkd_run(GKDTrainer, tokenizer, tmp_path / "trl")
    got, got_w = _gkd_run(mtrl.GKDTrainer, tokenizer, tmp_path / "memops")
    assert got == pytest.approx(want, rel=1e-5)
    torch.testing.assert_close(got_w, want_w, rtol=1e-4, atol=1e-6)


def test_gkd_first_step_under_bf16_autocast_matches_trl(tokenizer, tmp_path):
    """TRL's default mixed precision: the models' forward runs under bf16 autocast, so their lm_heads project
    in bf16; memops projects in the autocast dtype too (``test_projection_follows_autocast`` checks the dtype
    exactly), then does fp32 math.  Margin: a chunk's bf16 GEMM and the full one may round a logit
    differently in its last bit (2**-8 relative); that moved this loss by up to 1.3e-6 relative across CPU
    kernel sets, so 5e-5 is the stated margin."""
    from trl.experimental.gkd import GKDTrainer

    want, _ = _gkd_run(GKDTrainer, tokenizer, tmp_path / "trl", bf16=True)
    got, _ = _gkd_run(mtrl.GKDTrainer, tokenizer, tmp_path / "memops", bf16=True)
    assert got[0] == pytest.approx(want[0], rel=5e-5)


def test_projection_follows_autocast():
    h, w = torch.randn(3, 4), torch.randn(5, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hp, wp, bp = mtrl._projection(h, w, None)
    assert hp.dtype == wp.dtype == torch.bfloat16 and bp is None
    hp, wp, _ = mtrl._projection(h, w, None)
    assert hp.dtype == wp.dtype == torch.float32


def test_apply_is_idempotent_and_revert_restores():
    from trl.trainer import distillation_trainer

    original = distillation_trainer._chunked_divergence_loss
    mtrl.apply()
    mtrl.apply()
    assert distillation_trainer._chunked_divergence_loss is mtrl.chunked_divergence_loss
    mtrl.revert()
    assert distillation_trainer._chunked_divergence_loss is original


def test_refuses_another_trl_version(monkeypatch):
    monkeypatch.setattr(trl, "__version__", "1.17.0")
    with pytest.raises(RuntimeError, match=r"supports TRL 1\.16\.x, found 1\.17\.0"):
        mtrl.apply()
    with pytest.raises(RuntimeError, match="supports TRL"):
        mtrl._make_gkd_trainer()


def test_refuses_a_changed_signature(monkeypatch):
    from trl.trainer import distillation_trainer

    def changed(student_hidden_states, teacher_hidden_states, weight, beta):
        raise AssertionError

    monkeypatch.setattr(distillation_trainer, "_chunked_divergence_loss", changed)
    with pytest.raises(RuntimeError, match="memops was written against"):
        mtrl.apply()
    assert distillation_trainer._chunked_divergence_loss is changed


def _logprob_function_with(tenth: str):
    """A stand-in for TRL's ``_ChunkedLogProbFunction`` whose ``forward`` takes TRL 1.16's nine arguments and
    ``tenth``: TRL's main branch (after 1.16, not released) added ``sampling_mask`` there.  Only its signature
    is read; its ``apply`` must never run once memops replaced it."""
    params = ", ".join(mtrl._LOGPROB_PARAMS)

    namespace: dict = {}
    exec(f"def forward(ctx, {params}, {tenth}=None):\n    raise AssertionError('TRL kernel ran')", namespace)
    return type("StandIn", (), {"forward": staticmethod(namespace["forward"]), "apply": namespace["forward"]})


def test_accepts_trls_sampling_mask_signature_and_computes_it(monkeypatch):
    """TRL's main-branch signature (a tenth argument, ``sampling_mask``: ``[N, K]`` kept ids, -1 padding) is
    replaced, and a call with a mask gets memops' log-probs over the kept set (the entropy over the vocabulary,
    as TRL's kernel documents), against the float64 reference; a signature memops does not know is still
    refused."""
    from reference import ref_linear_logprobs
    from trl.trainer import utils

    monkeypatch.setattr(utils, "_ChunkedLogProbFunction", _logprob_function_with("sampling_mask"))
    mtrl.apply()
    try:
        fn = utils._ChunkedLogProbFunction
        assert fn is mtrl.ChunkedLogProb
        g = torch.Generator().manual_seed(0)
        n, d, v = 13, 6, 17
        x = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
        w = torch.randn(v, d, generator=g, dtype=torch.float64, requires_grad=True)
        t = torch.randint(0, v, (n,), generator=g)
        mask = torch.randint(-1, v, (n, 5), generator=g)
        out = fn.apply(x, w, None, t, 0.8, 16, 3.0, 1.0, ("log_probs", "entropy"), mask)
        ref_lp, ref_ent = ref_linear_logprobs(x, w, t, temperature=0.8, softcap=3.0, sampling_mask=mask)
        torch.testing.assert_close(out[0], ref_lp, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out[1], ref_ent, rtol=1e-12, atol=1e-12)
        ours = torch.autograd.grad(out[0].sum(), (x, w))
        theirs = torch.autograd.grad(ref_lp.sum(), (x, w))
        for a, c in zip(ours, theirs):
            torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)
    finally:
        mtrl.revert()
    unknown = _logprob_function_with("support_ids")
    monkeypatch.setattr(utils, "_ChunkedLogProbFunction", unknown)
    with pytest.raises(RuntimeError, match="not replacing it"):
        mtrl.apply()
    assert utils._ChunkedLogProbFunction is unknown


def test_our_function_has_trls_signature():
    from trl.trainer import distillation_trainer

    ours = inspect.signature(mtrl.chunked_divergence_loss)
    theirs = inspect.signature(distillation_trainer._chunked_divergence_loss)
    assert list(ours.parameters) == list(theirs.parameters)
    assert [p.default for p in ours.parameters.values()] == [p.default for p in theirs.parameters.values()]


@pytest.mark.parametrize("beta,trl_matmuls", [(0.0, 6), (1.0, 6), (0.5, 8)])
def test_four_projection_matmuls_where_trl_needs_six_or_eight(beta, trl_matmuls):
    from helpers import MatmulFlops, projection_flops

    n, v, d = 64, 50, 16
    counts = []
    for fn in (mtrl.chunked_divergence_loss, mtrl._distillation_module()._chunked_divergence_loss):
        x, w = torch.randn(n, d, requires_grad=True), torch.randn(v, d, requires_grad=True)
        with MatmulFlops() as m:
            fn(x, torch.randn(n, d), w, torch.randn(v, d), torch.ones(n), beta)[0].backward()
        counts.append(m.flops / projection_flops(n, v, d))
    assert counts == [4, trl_matmuls]


# ---- the fused LM head every TRL trainer uses -----------------------------------------------------------

_TIMING = ("step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second")


@pytest.mark.parametrize(
    "opts",
    [
        dict(temperature=1.0, final_logit_softcapping=None, logit_scale=1.0),
        dict(temperature=0.7, final_logit_softcapping=None, logit_scale=1.0),
        dict(temperature=0.9, final_logit_softcapping=3.0, logit_scale=0.6),
    ],
)
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_logprob_matches_trls_kernel(opts, bias):
    """All five outputs and the gradients of log-probs and entropy, against TRL's own function."""
    g = torch.Generator().manual_seed(0)
    n, d, v = 37, 8, 29
    outputs = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    results = []
    g1, g2 = torch.randn(n, generator=g), torch.randn(n, generator=g)
    for fn in (mtrl.ChunkedLogProb, mtrl._utils_module()._ChunkedLogProbFunction):
        x = torch.randn(n, d, generator=torch.Generator().manual_seed(1), requires_grad=True)
        w = (torch.randn(v, d, generator=torch.Generator().manual_seed(2)) / 2).requires_grad_()
        b = torch.randn(v, generator=torch.Generator().manual_seed(3)).requires_grad_() if bias else None
        t = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(4))
        out = fn.apply(
            x, w, b, t, opts["temperature"], 16, opts["final_logit_softcapping"], opts["logit_scale"], outputs
        )
        ((out[0] * g1).sum() + (out[1] * g2).sum()).backward()
        results.append((out, [p.grad for p in (x, w, b) if p is not None]))
    (ours, our_grads), (theirs, their_grads) = results
    for name, a, c in zip(outputs, ours, theirs):
        if name == "is_top1":
            assert torch.equal(a, c)
        else:
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5, msg=name)
    for a, c in zip(our_grads, their_grads):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_trls_bfloat16_backward_test_of_its_chunked_logprob(temperature):
    """TRL's own bf16 backward test of its chunked log-prob function (``TestChunkedLogProbFunction.
    test_backward_bfloat16``: N=64, H=32, V=128, seed 42, its fp32 reference on bf16 logits and its 1e-2
    tolerances), run on memops' stand-in: input and weight gradients within TRL's bounds."""
    import torch.nn.functional as F

    torch.manual_seed(42)
    n, h, v = 64, 32, 128
    hidden = torch.randn(n, h, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, v, (n,))
    logprobs, _ = mtrl.ChunkedLogProb.apply(hidden, weight, None, labels, temperature, 32, None, 1.0, ("entropy",))[:2]
    ours = torch.autograd.grad(logprobs.sum(), (hidden, weight))
    logits = (hidden @ weight.t()).to(torch.float32) / temperature
    ref = F.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    theirs = torch.autograd.grad(ref.sum(), (hidden, weight))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)


def _train(make_trainer, memops_on: bool):
    calls = []
    if memops_on:
        mtrl.apply()
        utils = mtrl._utils_module()

        class Counting(mtrl.ChunkedLogProb):
            @staticmethod
            def apply(*args, **kwargs):
                calls.append(1)
                return mtrl.ChunkedLogProb.apply(*args, **kwargs)

        utils._ChunkedLogProbFunction = Counting
    try:
        trainer = make_trainer()
        trainer.train()
    finally:
        if memops_on:
            mtrl.revert()
    assert bool(calls) == memops_on  # the fused head ran on memops (or on TRL's kernel, unpatched)
    logs = [{k: v for k, v in h.items() if k not in _TIMING} for h in trainer.state.log_history]
    return logs, trainer.model.lm_head.weight.detach().clone()


def _same_training(make_trainer):
    theirs, their_w = _train(make_trainer, False)
    ours, our_w = _train(make_trainer, True)
    assert len(ours) == len(theirs) >= 3
    for a, b in zip(ours, theirs):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    torch.testing.assert_close(our_w, their_w, rtol=1e-4, atol=1e-6)
    return ours


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama saved to disk: trainers that build a reference model load it from the policy's path."""
    path = tmp_path_factory.mktemp("tiny-llama")
    _model(0, 32).save_pretrained(path)
    return str(path)


def _common(tmp_path, **kw):
    """Trainer arguments every test here shares (three fp32 CPU steps, a log line each), then ``kw``."""
    return {
        "output_dir": str(tmp_path),
        "max_steps": 3,
        "per_device_train_batch_size": 4,
        "logging_steps": 1,
        "report_to": [],
        "learning_rate": 1e-3,
        "use_cpu": True,
        "save_strategy": "no",
        "bf16": False,
        "seed": 5,
        **kw,
    }


def _tiny(model_type: str):
    """A tiny fp32 ``model_type`` from memops' builder (``memops/integrations/hf/tiny.py``) on this vocabulary."""
    from memops.integrations.hf import tiny as hf_tiny

    cls = hf_tiny.model_class(model_type)
    torch.manual_seed(0)
    config = hf_tiny.small_config(cls.config_class, {"vocab_size": len(SPECIALS) + len(WORDS)})
    return cls(config)


@pytest.mark.parametrize("family", ["llama", "qwen3_5", "olmo3", "lfm2"])
def test_sft_trainer_on_memops_logs_what_trl_logs(tokenizer, tmp_path, family):
    """TRL's SFT trainer with its fused head on memops: Llama, and three families verified by the structural
    rule (``docs/models.md``): Qwen3.5 (gated linear attention), OLMo 3, LFM2 (short convolutions)."""
    g = torch.Generator().manual_seed(0)
    data = datasets.Dataset.from_dict({"text": [_words(g, 9) for _ in range(16)]})

    def make():
        args = trl.SFTConfig(**_common(tmp_path, max_length=16))
        model = _model(0, 32) if family == "llama" else _tiny(family)
        return trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)

    logs = _same_training(make)
    assert "mean_token_accuracy" in logs[0] and "entropy" in logs[0]


def test_dpo_trainer_on_memops_logs_what_trl_logs(tokenizer, tmp_path, model_dir):
    g = torch.Generator().manual_seed(0)
    data = datasets.Dataset.from_dict(
        {
            "prompt": [_words(g, 4) for _ in range(16)],
            "chosen": [_words(g, 3) for _ in range(16)],
            "rejected": [_words(g, 5) for _ in range(16)],
        }
    )

    def make():
        args = trl.DPOConfig(**_common(tmp_path, max_length=16))
        return trl.DPOTrainer(model=model_dir, args=args, train_dataset=data, processing_class=tokenizer)

    _same_training(make)


def test_kto_trainer_on_memops_logs_what_trl_logs(tokenizer, tmp_path, model_dir):
    g = torch.Generator().manual_seed(0)
    data = datasets.Dataset.from_dict(
        {
            "prompt": [_words(g, 4) for _ in range(16)],
            "completion": [_words(g, 3) for _ in range(16)],
            "label": [bool(i % 3) for i in range(16)],
        }
    )

    def make():
        args = trl.KTOConfig(**_common(tmp_path, max_length=16))
        return trl.KTOTrainer(model=model_dir, args=args, train_dataset=data, processing_class=tokenizer)

    _same_training(make)


def _reward(completions, **kwargs):
    return [float(len(c.split())) / 5.0 - 0.3 * c.count("w1") for c in completions]


@pytest.mark.parametrize("name", ["GRPO", "RLOO"])
def test_rl_trainers_on_memops_log_what_trl_logs(tokenizer, tmp_path, model_dir, name):
    """With a KL term (a reference model loaded from the policy's path) and the entropy metric."""
    g = torch.Generator().manual_seed(0)
    data = datasets.Dataset.from_dict({"prompt": [_words(g, 4) for _ in range(16)]})
    config_cls, trainer_cls = getattr(trl, f"{name}Config"), getattr(trl, f"{name}Trainer")

    def make():
        args = config_cls(**_common(tmp_path, num_generations=4, max_completion_length=6, beta=0.04))
        return trainer_cls(
            model=model_dir, reward_funcs=_reward, args=args, train_dataset=data, processing_class=tokenizer
        )

    _same_training(make)


@pytest.mark.parametrize("order", ["trl_first", "memops_first"])
def test_transformers_patch_and_trls_fused_head_keep_each_other(order):
    """``memops.integrations.transformers.apply`` on a model TRL gave a fused head (or the reverse) keeps both:
    ordinary calls get memops' loss, ``fused_lm_head=True`` calls TRL's per-token outputs (on memops once
    ``memops.integrations.trl.apply`` ran)."""
    from trl.trainer.utils import add_fused_lm_head

    from memops.integrations import transformers as mtf

    outputs = ("log_probs", "entropy", "is_top1")
    ids = torch.randint(len(SPECIALS), len(SPECIALS) + len(WORDS), (2, 9), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :3] = -100
    plain_model = _model(0, 32).train()
    want_loss = plain_model(input_ids=ids, labels=labels).loss
    add_fused_lm_head(plain_model, outputs=outputs)
    want = plain_model(input_ids=ids, labels=labels, fused_lm_head=True)

    model = _model(0, 32).train()
    if order == "trl_first":
        add_fused_lm_head(model, outputs=outputs)
        mtf.apply(model)
    else:
        mtf.apply(model)
        add_fused_lm_head(model, outputs=outputs)
    plain = model(input_ids=ids, labels=labels)
    assert plain.logits is None  # memops' loss: the logits never existed
    torch.testing.assert_close(plain.loss, want_loss)
    for memops_head in (False, True):
        if memops_head:
            mtrl.apply()
        try:
            fused = model(input_ids=ids, labels=labels, fused_lm_head=True)
        finally:
            mtrl.revert()
        torch.testing.assert_close(fused.loss, want.loss)
        for name in ("log_probs", "entropy"):
            torch.testing.assert_close(getattr(fused, name), getattr(want, name))
        assert torch.equal(fused.is_top1, want.is_top1)


def test_fused_head_backward_runs_inside_trls_gather_context(monkeypatch):
    """ZeRO-3: memops' backward recomputes from the lm_head weight, so it must run inside TRL's
    ``maybe_gather_lm_head_ctx`` as TRL's own backward does (a recording context stands in for DeepSpeed's)."""
    import contextlib

    from trl.trainer import utils

    from memops.ops import engine

    events = []

    @contextlib.contextmanager
    def recording(*params):
        events.append(("enter", len(params)))
        yield
        events.append(("exit", len(params)))

    monkeypatch.setattr(utils, "maybe_gather_lm_head_ctx", recording)
    run = engine.run

    def chunk_pass(*args, **kwargs):
        events.append("chunk pass")
        return run(*args, **kwargs)

    monkeypatch.setattr(engine, "run", chunk_pass)
    x, w = torch.randn(6, 4, requires_grad=True), torch.randn(9, 4, requires_grad=True)
    out = mtrl.ChunkedLogProb.apply(x, w, None, torch.randint(0, 9, (6,)), 1.0, 16, None, 1.0, ("entropy",))
    assert events == ["chunk pass"]  # the forward (TRL enters the context around it)
    (out[0].sum() + out[1].sum()).backward()
    assert events == ["chunk pass", ("enter", 2), "chunk pass", ("exit", 2)]
    assert x.grad is not None and w.grad is not None


# ---- memops' GRPOTrainer: TRL's loss in three projection matmuls ---------------------------------------

GRPO_CASES = [
    *[dict(loss_type=lt, beta=0.04) for lt in ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo")],
    *[dict(loss_type=lt, importance_sampling_level="sequence") for lt in ("grpo", "luspo", "cispo", "sapo")],
    dict(loss_type="dapo", delta=1.5, beta=0.04, use_bias_correction_kl=False),
    dict(loss_type="grpo", entropy_coef=0.01, temperature=0.8),
]


@pytest.mark.parametrize("opts", GRPO_CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_memops_grpo_trainer_matches_trls(tokenizer, tmp_path, model_dir, opts):
    g = torch.Generator().manual_seed(0)
    data = datasets.Dataset.from_dict({"prompt": [_words(g, 4) for _ in range(16)]})

    def run(cls):
        args = trl.GRPOConfig(**_common(tmp_path, num_generations=4, max_completion_length=6, num_iterations=2, **opts))
        trainer = cls(model=model_dir, reward_funcs=_reward, args=args, train_dataset=data, processing_class=tokenizer)
        trainer.train()
        logs = [{k: v for k, v in h.items() if k not in _TIMING} for h in trainer.state.log_history]
        return logs, trainer.model.lm_head.weight.detach().clone()

    theirs, their_w = run(trl.GRPOTrainer)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback to TRL's loss
        ours, our_w = run(mtrl.GRPOTrainer)
    assert len(ours) == len(theirs) >= 3
    for a, b in zip(ours, theirs):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    torch.testing.assert_close(our_w, their_w, rtol=1e-4, atol=1e-6)


def test_memops_grpo_trainer_falls_back_once_with_a_warning(tokenizer, tmp_path, model_dir):
    g = torch.Generator().manual_seed(0)
    data = datasets.Dataset.from_dict({"prompt": [_words(g, 4) for _ in range(16)]})
    args = trl.GRPOConfig(**_common(tmp_path, num_generations=4, max_completion_length=6, top_entropy_quantile=0.5))
    trainer = mtrl.GRPOTrainer(
        model=model_dir, reward_funcs=_reward, args=args, train_dataset=data, processing_class=tokenizer
    )
    mtrl.GRPOTrainer._memops_warned.clear()
    with pytest.warns(UserWarning, match="top_entropy_quantile < 1: this runs TRL's own loss") as seen:
        trainer.train()
    assert sum("memops GRPOTrainer" in str(w.message) for w in seen) == 1


class _Accelerator:
    num_processes, sync_gradients = 1, True

    def autocast(self):
        import contextlib

        return contextlib.nullcontext()

    def unwrap_model(self, model):
        return model

    def gather(self, x):
        return x.reshape(-1) if x.dim() == 0 else x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


class _Backbone(torch.nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.hidden = hidden

    def forward(self, **kwargs):
        from types import SimpleNamespace

        return SimpleNamespace(last_hidden_state=self.hidden)


class _Policy(torch.nn.Module):
    """Stands in for a verified causal LM: a backbone returning fixed hidden states and an lm_head."""

    def __init__(self, hidden, weight, bias):
        super().__init__()
        self.backbone, self.weight, self.bias = _Backbone(hidden), weight, bias

    def get_decoder(self):
        return self.backbone

    def get_output_embeddings(self):
        head = torch.nn.Module()  # memops computes the loss as the head's forward (module hooks around it)
        head.weight, head.bias = self.weight, self.bias
        return head


@st.composite
def _grpo_formula_case(draw):
    return dict(
        b=draw(st.integers(1, 4)),
        k=draw(st.integers(1, 7)),
        v=draw(st.integers(2, 23)),
        loss_type=draw(st.sampled_from(["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo"])),
        level=draw(st.sampled_from(["token", "sequence"])),
        beta=draw(st.sampled_from([0.0, 0.04])),
        bias_corr=draw(st.booleans()),
        delta=draw(st.sampled_from([None, 1.3])),
        entropy_coef=draw(st.sampled_from([0.0, 0.02])),
        eps=draw(st.sampled_from([(0.2, 0.28), (0.1, 0.1), (0.2, 5.0)])),
        temperature=draw(st.sampled_from([1.0, 0.7])),
        mask=draw(st.sampled_from(["random", "row_empty", "all"])),
        accum=draw(st.sampled_from([1, 2])),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=80, deadline=None)
@given(_grpo_formula_case())
def test_memops_grpo_loss_equals_trls_compute_loss(case):
    """TRL 1.16's own ``GRPOTrainer._compute_loss`` (its log-probs and entropies from full float64 logits) against
    memops' op, for every loss type x importance level x beta, ``delta``, bias-corrected KL, the entropy bonus,
    gradient accumulation, and masks with empty sequences: loss, gradients and logged metrics."""
    from collections import defaultdict
    from types import SimpleNamespace

    from reference import ref_linear_logprobs

    g = torch.Generator().manual_seed(case["seed"])
    b, k, v, d, p = case["b"], case["k"], case["v"], 5, 3
    hidden = torch.randn(b, p + k, d, generator=g, dtype=torch.float64)
    weight = torch.randn(v, d, generator=g, dtype=torch.float64) / 2
    bias = torch.randn(v, generator=g, dtype=torch.float64)
    ids = torch.randint(0, v, (b, k), generator=g)
    mask = {"random": torch.rand(b, k, generator=g) < 0.7, "all": torch.ones(b, k, dtype=torch.bool)}.get(
        case["mask"], torch.ones(b, k, dtype=torch.bool)
    ).long()
    if case["mask"] == "row_empty":
        mask[0] = 0
    inputs = {
        "prompt_ids": torch.zeros(b, p, dtype=torch.long),
        "prompt_mask": torch.ones(b, p, dtype=torch.long),
        "completion_ids": ids,
        "completion_mask": mask,
        "advantages": torch.randn(b, generator=g, dtype=torch.float64),
        "old_per_token_logps": -2.5 + 0.3 * torch.randn(b, k, generator=g, dtype=torch.float64),
        "ref_per_token_logps": -2.5 + 0.3 * torch.randn(b, k, generator=g, dtype=torch.float64),
        "num_items_in_batch": mask.sum().double() * 2,
    }
    results = []
    for ours in (False, True):
        x, w, bb = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))

        def logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, params=(x, w, bb), **kwargs):
            h = params[0][:, -logits_to_keep - 1 : -1]
            lp, ent = ref_linear_logprobs(h, params[1], ids, params[2], temperature=case["temperature"])
            return lp, ent, None

        fake = SimpleNamespace(
            args=SimpleNamespace(
                delta=case["delta"],
                use_bias_correction_kl=case["bias_corr"],
                sapo_temperature_pos=1.0,
                sapo_temperature_neg=1.05,
                steps_per_generation=2,
            ),
            accelerator=_Accelerator(),
            model=SimpleNamespace(training=True),
            current_gradient_accumulation_steps=case["accum"],
            loss_type=case["loss_type"],
            importance_sampling_level=case["level"],
            beta=case["beta"],
            epsilon_low=case["eps"][0],
            epsilon_high=case["eps"][1],
            temperature=case["temperature"],
            max_completion_length=k + 2,
            _entropy_bonus_enabled=case["entropy_coef"] != 0,
            entropy_coef=case["entropy_coef"],
            use_adaptive_entropy=False,
            aux_loss_enabled=False,
            top_entropy_quantile=1.0,
            off_policy_mask_threshold=None,
            use_vllm=False,
            vllm_importance_sampling_correction=False,
            _metrics={"train": defaultdict(list)},
            _get_per_token_logps_and_entropies=logps_and_entropies,
        )
        if ours:
            fake._memops_metrics = types.MethodType(mtrl.GRPOTrainer._memops_metrics, fake)
            loss = mtrl.GRPOTrainer._memops_loss(fake, _Policy(x, w, bb), inputs, {"logit_scale": 1.0, "softcap": None})
        else:
            loss = trl.GRPOTrainer._compute_loss(fake, None, inputs)
        loss.backward()
        results.append((loss.detach(), [t.grad for t in (x, w, bb)], dict(fake._metrics["train"])))
    (ours, our_grads, our_metrics), (theirs, their_grads, their_metrics) = results[1], results[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)
    for a, c in zip(our_grads, their_grads):
        torch.testing.assert_close(a, c, rtol=1e-8, atol=1e-11)
    assert our_metrics.keys() == their_metrics.keys()
    for key in our_metrics:
        assert our_metrics[key] == pytest.approx(their_metrics[key], rel=1e-9, abs=1e-12, nan_ok=True), key


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_linear_grpo_loss_front_end_equals_trls_compute_loss(loss_type, level):
    """``memops.linear_grpo_loss`` (one call: no accumulation, ``num_items`` the batch's tokens) against TRL's
    ``_compute_loss`` on the same float64 inputs: loss, gradients, and the metrics both report."""
    from collections import defaultdict
    from types import SimpleNamespace

    from reference import ref_linear_logprobs

    import memops

    g = torch.Generator().manual_seed(3)
    b, k, v, d = 3, 6, 11, 5
    x0 = torch.randn(b, k, d, generator=g, dtype=torch.float64)
    w0 = torch.randn(v, d, generator=g, dtype=torch.float64) / 2
    ids = torch.randint(0, v, (b, k), generator=g)
    mask = (torch.rand(b, k, generator=g) < 0.8).long()
    mask[1] = 0
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    old, ref = (-2.4 + 0.3 * torch.randn(b, k, generator=g, dtype=torch.float64) for _ in range(2))
    opts = dict(beta=0.04, epsilon_low=0.2, epsilon_high=0.28, delta=1.4, temperature=0.8)
    x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    loss, metrics = memops.linear_grpo_loss(
        x, w, ids, mask, adv, old_logprobs=old, ref_logprobs=ref, loss_type=loss_type,
        importance_sampling_level=level, use_bias_correction_kl=True, entropy_coef=0.01,
        max_completion_length=k + 1, num_items=mask.sum(), **opts,
    )  # fmt: skip
    loss.backward()
    xt, wt = x0.clone().requires_grad_(), w0.clone().requires_grad_()

    def logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, **kwargs):
        lp, ent = ref_linear_logprobs(xt, wt, ids, temperature=opts["temperature"])
        return lp, ent, None

    fake = SimpleNamespace(
        args=SimpleNamespace(
            delta=opts["delta"], use_bias_correction_kl=True, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05,
            steps_per_generation=1,
        ),
        accelerator=_Accelerator(), model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        loss_type=loss_type, importance_sampling_level=level, beta=opts["beta"], epsilon_low=opts["epsilon_low"],
        epsilon_high=opts["epsilon_high"], temperature=opts["temperature"], max_completion_length=k + 1,
        _entropy_bonus_enabled=True, entropy_coef=0.01, use_adaptive_entropy=False, aux_loss_enabled=False,
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, use_vllm=False,
        vllm_importance_sampling_correction=False, _metrics={"train": defaultdict(list)},
        _get_per_token_logps_and_entropies=logps_and_entropies,
    )  # fmt: skip
    inputs = {
        "prompt_ids": torch.zeros(b, 0, dtype=torch.long), "prompt_mask": torch.zeros(b, 0, dtype=torch.long),
        "completion_ids": ids, "completion_mask": mask, "advantages": adv, "old_per_token_logps": old,
        "ref_per_token_logps": ref, "num_items_in_batch": mask.sum().double(),
    }  # fmt: skip
    want = trl.GRPOTrainer._compute_loss(fake, None, inputs)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x.grad, xt.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(w.grad, wt.grad, rtol=1e-9, atol=1e-12)
    trl_metrics = fake._metrics["train"]
    for key, value in metrics.items():  # TRL takes its clip-ratio means in fp32 (``.float()``)
        assert float(value) == pytest.approx(trl_metrics[key][0], rel=1e-6, abs=1e-12), key
    assert {"entropy", "kl"} <= set(metrics)
