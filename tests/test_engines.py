"""Real training engines over two processes on CPU (gloo, fp32): DeepSpeed ZeRO-3 driven directly and through
``accelerate launch``, TRL 1.16's trainers under ZeRO-3, FSDP2 (``fully_shard`` and Accelerate's plugin) and
DDP with gradient accumulation.  Each trains a tiny model from the same seed unpatched and patched: the
per-step losses and final parameters (or TRL's logged metrics) are equal to fp32 rounding
(tests/engine_worker.py holds the cases)."""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
from helpers import free_port, launch

pytest.importorskip("deepspeed")
pytest.importorskip("accelerate")

WORKER = os.path.join(os.path.dirname(__file__), "engine_worker.py")


@pytest.fixture(scope="session")
def engine_env(tmp_path_factory):
    """DeepSpeed on the CPU accelerator; its JIT-built shared-memory op (about a minute to build) is cached in
    one folder for the whole run: TORCH_EXTENSIONS_DIR when set (CI keeps it between steps), else a folder of
    this session's."""
    cache = os.environ.get("TORCH_EXTENSIONS_DIR") or str(tmp_path_factory.mktemp("torch_extensions"))
    return {"DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": cache, "TOKENIZERS_PARALLELISM": "false"}


def _passed(results, cases):
    assert len(results) >= 1
    for rc, out in results:
        assert rc == 0, out[-4000:]
    joined = "".join(out for _, out in results)
    for case in cases:
        for r in range(2):
            assert f"rank {r}: {case} ok" in joined, joined[-4000:]


def _run(cases, engine_env, timeout=600):
    results = launch([sys.executable, WORKER, ",".join(cases)], 2, timeout=timeout, env=engine_env)
    _passed(results, cases)


def test_deepspeed_zero3_partitioned_lm_head(engine_env):
    """``deepspeed.initialize`` ZeRO-3 with the model built under ``deepspeed.zero.Init`` (lm_head.weight has no
    elements outside its forward): the transformers patch and ``LinearCrossEntropyHead`` train as the unpatched
    model; a direct call on the partitioned weight is refused naming GatheredParameters."""
    _run(["deepspeed_zero3", "deepspeed_direct_call"], engine_env)


def test_trl_trainers_under_zero3(engine_env):
    """SFTTrainer (TRL's fused head on memops; the transformers patch) and GRPOTrainer (TRL's fused head on
    memops; memops' GRPOTrainer) under ZeRO-3 from the trainer arguments: TRL's logged metrics."""
    _run(["trl_zero3"], engine_env)


def test_fsdp2_and_ddp(engine_env):
    """``fully_shard`` directly, FSDP2 through Accelerate's plugin (a test shim: Accelerate enables FSDP on CPU
    only by hand), DDP through Accelerate with two micro-batches a step."""
    _run(["fully_shard", "accelerate_fsdp2", "accelerate_ddp_accumulation"], engine_env)


def test_accelerate_launch_zero3(engine_env, tmp_path):
    """``accelerate launch`` with a DeepSpeed ZeRO-3 config file (every parameter partitioned)."""
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    assert accelerate, "the accelerate command is not installed"
    ds = tmp_path / "zero3.json"
    ds.write_text(
        json.dumps(
            {
                "train_micro_batch_size_per_gpu": 2,
                "gradient_accumulation_steps": 1,
                "gradient_clipping": 0.0,
                "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            }
        )
    )
    config = tmp_path / "accelerate.yaml"
    config.write_text(
        "compute_environment: LOCAL_MACHINE\n"
        "distributed_type: DEEPSPEED\n"
        f"deepspeed_config:\n  deepspeed_config_file: {ds}\n  zero3_init_flag: false\n"
        "num_machines: 1\nnum_processes: 2\nmachine_rank: 0\n"
        f"main_process_ip: 127.0.0.1\nmain_process_port: {free_port()}\nuse_cpu: true\n"
    )
    argv = [accelerate, "launch", "--config_file", str(config), WORKER, "accelerate_zero3"]
    _passed(launch(argv, 2, ranks=1, timeout=600, env=engine_env), ["accelerate_zero3"])
