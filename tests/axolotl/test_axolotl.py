"""memops' Axolotl plugin in real ``axolotl train`` runs (Axolotl 0.19.0, the last release for Python 3.11).

Axolotl pins its own TRL and transformers, so these tests run in a venv of their own (``.ci/run``'s second
step; the main suite does not collect this folder).  A tiny Llama and a word-level tokenizer are built here
from code and trained for 3 steps on a local JSONL file, with 1 and with 2 processes (accelerate on gloo),
with and without the plugin: the logged losses agree to fp32 rounding and memops' loss ran at every step of
every rank.  Config validation and the refusal of unverified models go through Axolotl's own config loader.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

# Axolotl's telemetry would try the network (none here) from this process's config loads, too
os.environ["AXOLOTL_DO_NOT_TRACK"] = "1"
HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))  # tests/helpers.py
from helpers import free_port  # noqa: E402

STEPS = 3
PLUGIN = "memops.integrations.axolotl.MemopsPlugin"
RECORDER = "recorder.RecorderPlugin"  # tests/axolotl/recorder.py: losses, memops calls, the CPU workaround


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny local Llama, its tokenizer and 64 lines of text (nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny_llama")
    words = [f"w{i}" for i in range(60)]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    PreTrainedTokenizerFast(tokenizer_object=tok, **special).save_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=3,
        tie_word_embeddings=False,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(out)
    rng = random.Random(0)
    with open(out / "data.jsonl", "w") as f:
        for _ in range(64):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(8, 40)))}) + "\n")
    return out


def _config(model_dir: Path, work: Path, **extra) -> dict:
    cfg = {
        "base_model": str(model_dir),
        "tokenizer_type": "PreTrainedTokenizerFast",
        "datasets": [{"path": str(model_dir / "data.jsonl"), "ds_type": "json", "type": "completion"}],
        "dataset_prepared_path": str(work / "prepared"),
        "output_dir": str(work / "out"),
        "sequence_len": 64,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "max_steps": STEPS,
        "learning_rate": 1e-3,
        "optimizer": "adamw_torch",
        "lr_scheduler": "constant",
        "logging_steps": 1,
        "save_strategy": "no",
        "seed": 0,
        "bf16": False,
        "fp16": False,
        "tf32": False,
    }
    cfg.update(extra)
    return cfg


def _env(work: Path, procs: int) -> dict:
    env = dict(os.environ)
    env.update(
        AXOLOTL_DO_NOT_TRACK="1",
        HF_HUB_OFFLINE="1",
        MEMOPS_AXOLOTL_RECORD=str(work / "record"),
        PYTHONPATH=os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]),
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),  # axolotl runs accelerate
        OMP_NUM_THREADS="1",
    )
    if procs > 1:
        env["ACCELERATE_USE_CPU"] = "true"  # gloo, no CUDA
    return env


def _train(model_dir: Path, work: Path, procs: int, memops: bool) -> list[dict]:
    """``axolotl train`` on ``procs`` processes; each rank's losses and memops call count."""
    work.mkdir(parents=True, exist_ok=True)
    extra = {"plugins": [PLUGIN, RECORDER], "memops_linear_cross_entropy": True} if memops else {"plugins": [RECORDER]}
    path = work / "config.yml"
    path.write_text(yaml.safe_dump(_config(model_dir, work, **extra)))
    cmd = [str(Path(sys.executable).parent / "axolotl"), "train", str(path)]
    if procs > 1:  # Axolotl's torchrun launcher (its accelerate launcher runs one process on a CPU-only machine)
        cmd += ["--launcher", "torchrun", "--", "--nproc_per_node", str(procs), "--master_port", str(free_port())]
    run = subprocess.run(cmd, env=_env(work, procs), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    return [json.loads((work / f"record.rank{r}.json").read_text()) for r in range(procs)]


@pytest.mark.parametrize("procs", [1, 2])
def test_axolotl_train_with_the_plugin_matches_without(model_dir, tmp_path, procs):
    plain = _train(model_dir, tmp_path / "plain", procs, memops=False)
    fused = _train(model_dir, tmp_path / "memops", procs, memops=True)
    for p, m in zip(plain, fused):
        assert len(p["losses"]) == len(m["losses"]) == STEPS
        # fp32 both ways: the same math, rounded in another order
        torch.testing.assert_close(torch.tensor(m["losses"]), torch.tensor(p["losses"]), rtol=1e-5, atol=1e-6)
        assert p["memops_calls"] == 0
        assert m["memops_calls"] >= STEPS  # memops computed the loss of every step on this rank


def _load(tmp_path: Path, cfg: dict):
    from axolotl.cli.config import load_cfg

    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    return load_cfg(str(path))


@pytest.mark.parametrize("other", ["chunked_cross_entropy", "cut_cross_entropy", "liger_fused_linear_cross_entropy"])
def test_another_loss_kernel_is_refused_at_validation(model_dir, tmp_path, other):
    cfg = _config(model_dir, tmp_path, plugins=[PLUGIN], memops_linear_cross_entropy=True, **{other: True})
    with pytest.raises(ValueError, match=f"memops_linear_cross_entropy and {other} both replace the loss"):
        _load(tmp_path, cfg)


def test_options_reach_memops_and_unverified_models_are_refused(model_dir, tmp_path):
    import memops
    from memops import config
    from memops.integrations.axolotl import MemopsPlugin

    cfg = _load(
        tmp_path,
        _config(model_dir, tmp_path, plugins=[PLUGIN], memops_linear_cross_entropy=True, memops_chunk_size=7,
                memops_precision="accurate"),
    )  # fmt: skip
    assert cfg.memops_chunk_size == 7 and cfg.model_config_type == "llama"
    try:
        MemopsPlugin().pre_model_load(cfg)
        assert config.precision_of(None) == "accurate"
        assert config.chunk_rows(100, 10, 4, torch.float32, torch.device("cpu")) == 7
    finally:
        memops.set_precision("reference")
        memops.set_chunk_size(None)
    with pytest.raises(ValueError, match="memops_chunk_size"):
        _load(tmp_path, _config(model_dir, tmp_path, plugins=[PLUGIN], memops_chunk_size=0))
    cfg.model_config_type = "opt"  # a type memops refuses (python -m memops models)
    with pytest.raises(ValueError, match="memops_linear_cross_entropy is not supported for model_type=opt"):
        MemopsPlugin().pre_model_load(cfg)


def test_the_entry_point_names_the_plugin():
    """Axolotl 0.21+ loads every plugin registered under ``axolotl.plugins`` (``module:Class``, read as the
    dotted name of a ``plugins:`` entry); 0.19's own loader resolves that name to memops' plugin."""
    from importlib.metadata import entry_points

    from axolotl.integrations.base import load_plugin

    from memops.integrations.axolotl import MemopsPlugin

    (point,) = [p for p in entry_points(group="axolotl.plugins") if p.name == "memops"]
    assert point.value == "memops.integrations.axolotl:MemopsPlugin"
    assert isinstance(load_plugin(point.value.replace(":", ".")), MemopsPlugin)
