"""verl's FSDP engine class (``FSDPEngineWithLMHead``) on the CPU: its own ``prepare_model_inputs`` and
``prepare_model_outputs`` (as wrapped by ``memops.integrations.verl``, loaded through
``VERL_USE_EXTERNAL_MODULES``) around a tiny float64 Llama, on a packed micro-batch of three sequences with a
temperature per sample, asking for log-probs, entropy and Σπ².  The fused path (memops' head) against verl's own
unfused path (full logits) on the same model: every output and every parameter gradient.  Prints "ok".

Stand-ins, because verl's engine builds its FSDP module and device mesh only on CUDA or NPU: the engine object is
made without ``__init__`` and given the attributes these two methods read (no Ulysses, no static padding, verl's
``entropy_from_logits``), and ``forward_step``'s three lines (prepare, call the module, prepare the outputs) are
run here without its device move and autocast."""

from __future__ import annotations

import copy
import sys
from types import SimpleNamespace

import torch
import verl  # noqa: F401  (imports memops.integrations.verl through VERL_USE_EXTERNAL_MODULES)
from tensordict import TensorDict
from verl.models.transformers.monkey_patch import patch_forward_with_backends
from verl.utils import tensordict_utils as tu
from verl.utils import torch_functional as verl_F
from verl.utils.dataset.dataset_utils import DatasetPadMode
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead


def engine_for(model):
    engine = object.__new__(FSDPEngineWithLMHead)
    engine.module = model
    engine.use_ulysses_sp = False
    engine.ulysses_sequence_parallel_size = 1
    engine.pad_to_length = False
    engine.pad_to_length_bucket = None
    engine.engine_config = SimpleNamespace(
        entropy_checkpointing=False, entropy_from_logits_with_chunking=False, use_torch_compile=False
    )
    engine.compute_entropy_from_logits = verl_F.entropy_from_logits
    return engine


def micro_batch(fused: bool, lengths=(5, 8, 3), vocab=90):
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(3, vocab, (n,), generator=g) for n in lengths]
    ids = torch.nested.nested_tensor(seqs, layout=torch.jagged)
    pos = torch.nested.nested_tensor([torch.arange(n) for n in lengths], layout=torch.jagged)
    temps = torch.tensor([0.7, 1.3, 0.9], dtype=torch.float32)
    mb = TensorDict({"input_ids": ids, "position_ids": pos, "temperature": temps}, batch_size=[len(lengths)])
    tu.assign_non_tensor(
        mb,
        use_remove_padding=True,
        pad_mode=DatasetPadMode.NO_PADDING,
        use_fused_kernels=fused,
        calculate_entropy=True,
        calculate_sum_pi_squared=True,
    )
    return mb


def run(engine, fused: bool):
    mb = micro_batch(fused)
    inputs, args = engine.prepare_model_inputs(mb)
    raw = engine.module(**inputs, use_cache=False)
    out = engine.prepare_model_outputs(output=raw, output_args=args, micro_batch=mb, logits_processor_func=None)
    return {k: v.values() for k, v in out.items()}


def main():
    from memops.integrations import verl as mv
    from memops.integrations.hf import tiny

    assert FSDPEngineWithLMHead.prepare_model_inputs.__wrapped__ is mv._ENGINE_ORIGINALS["prepare_model_inputs"]
    model = tiny.build("llama")
    ref = copy.deepcopy(model)
    want = run(engine_for(ref), fused=False)  # verl's unfused path: per-sample temperature and Σπ² supported

    original = type(model).forward
    patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend=sys.argv[1])
    try:
        got = run(engine_for(model), fused=True)
    finally:
        type(model).forward = original
    assert sorted(got) == sorted(want) == ["entropy", "log_probs", "sum_pi_squared"], (sorted(got), sorted(want))
    g = torch.Generator().manual_seed(3)
    w = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in want.items()}
    for k in want:
        torch.testing.assert_close(got[k].double(), want[k].double(), rtol=1e-10, atol=1e-12, msg=lambda m, k=k: k + m)
    sum(((w[k] * got[k]).sum() for k in ("log_probs", "entropy")), torch.zeros(())).backward()
    sum(((w[k] * want[k]).sum() for k in ("log_probs", "entropy")), torch.zeros(())).backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")
    # verl's own engine without memops refuses both with fused kernels: what the wrappers add
    mv.uninstall()
    for attempt in (micro_batch(True),):
        try:
            engine_for(model).prepare_model_inputs(attempt)
        except AssertionError as exc:
            assert "per sample temperature" in str(exc), exc
        else:
            raise AssertionError("verl's own engine accepted a per-sample temperature with fused kernels")
    print(f"engine {sys.argv[1]}: ok")


if __name__ == "__main__":
    main()
