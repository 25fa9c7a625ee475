"""One rank of a real training-engine test (launched by tests/test_engines.py; CPU, gloo, fp32).

Usage: python engine_worker.py CASE[,CASE...]: under our own launcher (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT set) or under ``accelerate launch``.  Every case trains the same tiny model from the same seed
unpatched and patched and compares the per-step losses and the final parameters; prints "CASE ok" per case,
exits non-zero on the first failure.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

import memops
from memops.distributed import LinearCrossEntropyHead
from memops.integrations import transformers as mt

V, D, STEPS = 64, 16, 3
RTOL, ATOL = 2e-5, 1e-6  # fp32 rounding: the unpatched loss upcasts fp32 logits, memops computes in fp32 too


def rank() -> int:
    return torch.distributed.get_rank()


def world() -> int:
    return torch.distributed.get_world_size()


def close(a, b, what: str, rtol: float = RTOL, atol: float = ATOL) -> None:
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"rank {rank()} {what}: {m}")


def llama():
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=D,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(config)


class TinyLM(torch.nn.Module):
    """Embedding, one layer, and an lm_head whose forward computes the loss (memops' module) or the logits."""

    def __init__(self, memops_head: bool):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(V, D)
        self.mlp = torch.nn.Linear(D, D)
        self.lm_head = (LinearCrossEntropyHead if memops_head else torch.nn.Linear)(D, V, bias=True)
        self.memops_head = memops_head

    def forward(self, input_ids, labels):
        h = torch.tanh(self.mlp(self.embed(input_ids)))
        if self.memops_head:
            return self.lm_head(h, labels, label_smoothing=0.1, chunk_size=5)
        return F.cross_entropy(self.lm_head(h).float().flatten(0, 1), labels.flatten(), label_smoothing=0.1)


def batch(step: int, micro: int = 0, size: int = 2, length: int = 9):
    """This rank's micro-batch of a step: different on every rank, the same in every run."""
    g = torch.Generator().manual_seed(1000 * step + 10 * micro + rank())
    ids = torch.randint(0, V, (size, length), generator=g)
    labels = ids.clone()
    labels[:, :2] = -100
    return ids, labels


def loss_of(model, ids, labels, **kw):
    out = model(input_ids=ids, labels=labels, **kw)
    return out if isinstance(out, torch.Tensor) else out.loss


def same_training(run, what: str):
    """``run(patched) -> (losses, {name: final parameter})``, unpatched then patched: equal to fp32 rounding."""
    want_losses, want = run(False)
    got_losses, got = run(True)
    assert len(got_losses) == len(want_losses) >= STEPS, (got_losses, want_losses)
    close(torch.tensor(got_losses), torch.tensor(want_losses), f"{what} losses")
    assert got.keys() == want.keys()
    for k in want:
        close(got[k], want[k], f"{what} final {k}")
    # training moved the head: the comparison above is not of two untrained models
    moved = (want["lm_head.weight"] - _INITIAL.pop("lm_head.weight")).abs().max()
    assert float(moved) > 1e-3, f"{what}: lm_head.weight moved by {float(moved)} only"


_INITIAL: dict = {}  # the unpatched run's initial parameters


# ---- DeepSpeed ZeRO-3, driven directly -----------------------------------------------------------------------


def ds_config(auto: bool = False) -> dict:
    """ZeRO-3 on CPU: every parameter partitioned however small, PyTorch's AdamW (no C++ Adam build);
    ``auto``: the batch, clipping and optimizer values left to the Hugging Face trainer's arguments."""
    fixed = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0}
    lr = {"lr": 1e-2}
    if auto:
        fixed = dict.fromkeys(fixed, "auto")
        lr = {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}
    return {
        **fixed,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "optimizer": {"type": "AdamW", "params": {**lr, "torch_adam": True}},
    }


def ds_params(module) -> dict:
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        return {k: p.detach().clone() for k, p in module.named_parameters()}


def case_deepspeed_zero3():
    import deepspeed

    process_group(deepspeed=True)
    for kind in ("hf", "head"):

        def run(patched, kind=kind):
            cls = type(llama()) if kind == "hf" else TinyLM  # classes imported before zero.Init patches torch
            with deepspeed.zero.Init(config_dict_or_path=ds_config()):
                model = llama() if kind == "hf" else TinyLM(patched)
            if kind == "hf" and patched:
                mt.apply(model)
            assert isinstance(model, cls)
            engine, *_ = deepspeed.initialize(model=model, config=ds_config(), model_parameters=model.parameters())
            assert model.lm_head.weight.numel() == 0, "lm_head.weight is not partitioned outside its forward"
            if not patched:
                _INITIAL.update(ds_params(model))
            losses = []
            for step in range(STEPS):
                ids, labels = batch(step)
                loss = loss_of(engine, ids, labels)
                engine.backward(loss)
                engine.step()
                losses.append(float(loss))
            assert model.lm_head.weight.numel() == 0
            params = ds_params(model)
            engine.destroy()
            return losses, params

        same_training(run, f"deepspeed zero3 {kind}")


def case_deepspeed_direct_call():
    """``memops.linear_cross_entropy(h, model.lm_head.weight, ...)`` outside the head's call: the partitioned
    weight is refused naming GatheredParameters; inside ``GatheredParameters`` it computes the loss."""
    import deepspeed

    process_group(deepspeed=True)
    cls = type(llama())
    with deepspeed.zero.Init(config_dict_or_path=ds_config()):
        model = cls(llama().config)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config(), model_parameters=model.parameters())
    ids, labels = batch(0)
    hidden = engine.module.model(input_ids=ids).last_hidden_state
    target = labels[:, 1:]
    try:
        memops.linear_cross_entropy(hidden[:, :-1], model.lm_head.weight, target)
    except ValueError as exc:
        assert "GatheredParameters" in str(exc) and "weight has no elements" in str(exc), exc
    else:
        raise AssertionError("a partitioned lm_head weight was not refused")
    with deepspeed.zero.GatheredParameters(model.lm_head.weight):
        got = memops.linear_cross_entropy(hidden[:, :-1], model.lm_head.weight, target)
        want = F.cross_entropy((hidden[:, :-1] @ model.lm_head.weight.T).float().flatten(0, 1), target.flatten())
    close(got, want, "direct call inside GatheredParameters")
    engine.destroy()


# ---- Accelerate: ZeRO-3 (from the launch config), DDP with gradient accumulation, FSDP2 ------------------------


def accelerate_run(patched, accelerator_kwargs=None, accum: int = 1, prepare=None):
    """A plain Accelerate training loop: ``accum`` micro-batches a step, AdamW, a fresh Accelerator."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    kwargs = dict(accelerator_kwargs or {}, **({"gradient_accumulation_steps": accum} if accum > 1 else {}))
    accelerator = Accelerator(**kwargs)
    model = llama()
    if not patched:
        _INITIAL.update({k: p.detach().clone() for k, p in model.named_parameters()})
    if patched:
        mt.apply(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if prepare is not None:
        model, optimizer = prepare(accelerator, model, optimizer)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    losses = []
    for step in range(STEPS):
        for micro in range(accum):
            with accelerator.accumulate(model):
                ids, labels = batch(step, micro)
                loss = loss_of(model, ids, labels)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
                losses.append(float(loss))
    params = full_params(accelerator, model)
    accelerator.free_memory()
    AcceleratorState._reset_state()  # the next run gets a fresh Accelerator; the process group stays
    GradientState._reset_state()
    return losses, params


def full_params(accelerator, model) -> dict:
    from torch.distributed.tensor import DTensor

    unwrapped = accelerator.unwrap_model(model)
    if accelerator.distributed_type.name == "DEEPSPEED":
        return ds_params(unwrapped)
    return {
        k: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for k, p in unwrapped.named_parameters()
    }


def case_accelerate_zero3():
    """Launched by ``accelerate launch`` with a DeepSpeed ZeRO-3 config file."""

    def run(patched):
        def prepare(accelerator, model, optimizer):
            assert accelerator.distributed_type.name == "DEEPSPEED", accelerator.distributed_type
            model, optimizer = accelerator.prepare(model, optimizer)
            assert accelerator.unwrap_model(model).lm_head.weight.numel() == 0, "lm_head is not partitioned"
            return model, optimizer

        return accelerate_run(patched, prepare=prepare)

    same_training(run, "accelerate zero3")


def case_accelerate_ddp_accumulation():
    """DDP through Accelerate (gloo), two micro-batches a step (``accelerator.accumulate``)."""
    from accelerate.utils import InitProcessGroupKwargs

    def prepare(accelerator, model, optimizer):
        model, optimizer = accelerator.prepare(model, optimizer)
        assert isinstance(model, torch.nn.parallel.DistributedDataParallel), type(model)
        return model, optimizer

    def run(patched):
        kwargs = {"cpu": True, "kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}
        return accelerate_run(patched, kwargs, accum=2, prepare=prepare)

    same_training(run, "accelerate ddp accumulation")


def case_accelerate_fsdp2():
    """FSDP2 through Accelerate's plugin.  Test shim for Accelerate's CPU limitation: Accelerate enables FSDP
    only from GPU-like distributed types, so on CPU the FSDP2 plugin is applied by ``accelerator.prepare``
    after ``distributed_type`` is set to FSDP by hand (the FSDP2 wrapping itself is Accelerate's own)."""
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.utils import DistributedType, InitProcessGroupKwargs

    def prepare(accelerator, model, optimizer):
        accelerator.state.distributed_type = DistributedType.FSDP  # the shim
        accelerator.state.fsdp_plugin = plugin
        model, optimizer = accelerator.prepare(model, optimizer)
        from torch.distributed.tensor import DTensor

        head = accelerator.unwrap_model(model).lm_head.weight
        assert isinstance(head, DTensor) and head.to_local().shape[0] < V, "lm_head is not sharded by FSDP2"
        return model, optimizer

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["LlamaDecoderLayer"]
    )

    def run(patched):
        kwargs = {"cpu": True, "kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")], "fsdp_plugin": plugin}
        return accelerate_run(patched, kwargs, prepare=prepare)

    same_training(run, "accelerate fsdp2")


def case_fully_shard():
    """FSDP2's ``fully_shard`` on lm_head and on the model, directly."""
    from torch.distributed.fsdp import fully_shard

    process_group()

    def run(patched):
        model = llama()
        if not patched:
            _INITIAL.update({k: p.detach().clone() for k, p in model.named_parameters()})
        else:
            mt.apply(model)
        fully_shard(model.lm_head)
        fully_shard(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses = []
        for step in range(STEPS):
            ids, labels = batch(step)
            loss = loss_of(model, ids, labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(loss))
        return losses, {k: p.full_tensor().detach().clone() for k, p in model.named_parameters()}

    same_training(run, "fully_shard")


# ---- TRL trainers under ZeRO-3 ----------------------------------------------------------------------------------


def trl_logs(trainer) -> list[dict]:
    from test_trl import _TIMING

    return [{k: v for k, v in h.items() if k not in _TIMING} for h in trainer.state.log_history]


def same_logs(got, want, what):
    assert len(got) == len(want) >= STEPS, (what, got, want)
    for a, b in zip(got, want):
        assert a.keys() == b.keys(), (what, a.keys(), b.keys())
        for key in a:
            assert abs(a[key] - b[key]) <= 1e-5 * abs(b[key]) + 1e-6, f"rank {rank()} {what} {key}: {a[key]} {b[key]}"


def _trl_args(config_cls, tmp, **kw):
    from test_trl import _common

    args = _common(tmp, ddp_backend="gloo", deepspeed=ds_config(auto=True), **kw)
    return config_cls(**args)


def case_trl_zero3():
    """TRL 1.16's SFTTrainer (memops' fused head via ``integrations.trl.apply()``, and the transformers patch)
    and memops' GRPOTrainer under ZeRO-3 configured through the trainer arguments: TRL's logged metrics."""
    import tempfile

    import datasets
    import trl
    from test_trl import _model, _reward, _words, make_tokenizer

    from memops.integrations import trl as mtrl

    tokenizer = make_tokenizer()
    g = torch.Generator().manual_seed(0)
    sft_data = datasets.Dataset.from_dict({"text": [_words(g, 9) for _ in range(32)]})
    grpo_data = datasets.Dataset.from_dict({"prompt": [_words(g, 4) for _ in range(32)]})
    tmp = tempfile.mkdtemp()

    def sft(mode):
        model = _model(0, 32)
        if mode == "transformers":
            mt.apply(model)
        if mode == "trl":
            mtrl.apply()
        try:
            args = _trl_args(trl.SFTConfig, tmp, max_length=16)
            trainer = trl.SFTTrainer(model=model, args=args, train_dataset=sft_data, processing_class=tokenizer)
            trainer.train()
            assert model.lm_head.weight.numel() == 0, "lm_head is not partitioned under the trainer's ZeRO-3"
        finally:
            mtrl.revert()
        return trl_logs(trainer)

    want = sft("unpatched")
    assert "mean_token_accuracy" in want[0] and "entropy" in want[0]
    for mode in ("trl", "transformers"):
        same_logs(sft(mode), want, f"SFTTrainer {mode}")

    def grpo(cls):
        args = _trl_args(trl.GRPOConfig, tmp, num_generations=4, max_completion_length=6, num_iterations=2)
        trainer = cls(
            model=_model(0, 32), reward_funcs=_reward, args=args, train_dataset=grpo_data, processing_class=tokenizer
        )
        trainer.train()
        assert trainer.model.lm_head.weight.numel() == 0, "lm_head is not partitioned under the trainer's ZeRO-3"
        return trl_logs(trainer)

    import warnings

    want = grpo(trl.GRPOTrainer)
    mtrl.apply()
    try:
        same_logs(grpo(trl.GRPOTrainer), want, "GRPOTrainer, TRL's fused head on memops")
    finally:
        mtrl.revert()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # memops' loss ran, no fallback to TRL's
        same_logs(grpo(mtrl.GRPOTrainer), want, "memops' GRPOTrainer")


def main():
    torch.set_num_threads(1)
    cases = sys.argv[1].split(",")
    for name in cases:
        globals()[f"case_{name}"]()
        torch.distributed.barrier()
        print(f"rank {rank()}: {name} ok", flush=True)
    torch.distributed.destroy_process_group()


def process_group(deepspeed: bool = False):
    """The process group, for the cases that drive an engine directly (TRL's trainers and Accelerate start
    their own: their Accelerate state counts the processes only then)."""
    if torch.distributed.is_initialized():
        return
    if deepspeed:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    else:
        torch.distributed.init_process_group("gloo")


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)  # as tests/dist_worker.py: every check passed; skip the interpreter's teardown
