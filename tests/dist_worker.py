"""One rank of a multi-process test (launched by tests/test_distributed.py; gloo on CPU, float64).

Usage: python dist_worker.py CASE[,CASE...]  (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, OUT in the environment).
Exits 0 when every check on this rank passed; prints the failure otherwise.
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference  # noqa: E402  (tests/reference.py: the one unfused reference)

import memops
from memops.distributed import LinearCrossEntropyHead, vocab_parallel_cross_entropy

D, V, N = 6, 23, 40
OPTIONS = [
    dict(),
    dict(reduction="sum", label_smoothing=0.2),
    dict(reduction="none", z_loss=1e-2, softcap=3.0, logit_scale=0.7),
    dict(num_items=17, label_smoothing=0.1, z_loss=1e-3),
    dict(ignore_index=5, chunk_size=7),
    # class weights (F.cross_entropy's weight), each rank holding its classes' weights
    dict(class_weight=True, label_smoothing=0.2, z_loss=1e-2, chunk_size=7),
    dict(class_weight=True, reduction="none", label_smoothing=0.1),
    dict(class_weight=True, num_items=11.5, softcap=2.0),
]
CLASS_WEIGHT = torch.rand(V, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 2


def _close(a, b, what):
    torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12, msg=lambda m: f"rank {dist.get_rank()} {what}: {m}")


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64)
    b = torch.randn(V, generator=g, dtype=torch.float64)
    t = torch.randint(0, V, (N,), generator=g)
    t[::6] = -100
    return x, w, b, t


def _split(world, uneven):
    if not uneven:
        sizes = [V // world + (1 if r < V % world else 0) for r in range(world)]
    else:  # deliberately lopsided
        sizes = [1 + r * 2 for r in range(world - 1)]
        sizes.append(V - sum(sizes))
    starts = [sum(sizes[:r]) for r in range(world)]
    return starts, sizes


def case_vocab():
    rank, world = dist.get_rank(), dist.get_world_size()
    x, w, b, t = _data()
    for uneven in (False, True):
        starts, sizes = _split(world, uneven)
        lo, hi = starts[rank], starts[rank] + sizes[rank]
        for opts in OPTIONS:
            opts = dict(opts)
            ign = opts.get("ignore_index", -100)
            tt = torch.where(t == -100, torch.full_like(t, ign), t)
            xf, wf, bf = (p.clone().requires_grad_() for p in (x, w, b))
            mine = {}
            if opts.pop("class_weight", False):
                mine = dict(class_weight=CLASS_WEIGHT[lo:hi])
                full_cw = dict(class_weight=CLASS_WEIGHT)
                ref = reference.ref_linear_cross_entropy(
                    x, w, tt, b, **full_cw, **{k: v for k, v in opts.items() if k != "chunk_size"}
                )
                _close(memops.linear_cross_entropy(x, w, tt, b, **full_cw, **opts), ref, f"class weights {opts}")
                opts_full = {**opts, **full_cw}
            else:
                opts_full = opts
            full = memops.linear_cross_entropy(xf, wf, tt, bf, **opts_full)
            go = torch.randn(full.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
            gx, gw, gb = torch.autograd.grad(full, (xf, wf, bf), go)
            xs = x.clone().requires_grad_()
            ws, bs = w[lo:hi].clone().requires_grad_(), b[lo:hi].clone().requires_grad_()
            explicit = dict(vocab_start=lo, vocab_size=V) if uneven else {}
            loss, lse = vocab_parallel_cross_entropy(xs, ws, tt, bs, return_lse=True, **explicit, **opts, **mine)
            _close(loss, full, f"loss {opts} {sorted(mine)} uneven={uneven}")
            _close(lse, memops.linear_cross_entropy(x, w, tt, b, return_lse=True, **opts)[1], "lse")
            sx, sw, sb = torch.autograd.grad(loss, (xs, ws, bs), go)
            _close(sx, gx, f"grad input {opts}")
            _close(sw, gw[lo:hi], f"grad weight shard {opts}")
            _close(sb, gb[lo:hi], f"grad bias shard {opts}")


def case_dtensor():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    x, w, b, t = _data(2)
    wd = distribute_tensor(w, mesh, [Shard(0)]).requires_grad_()
    bd = distribute_tensor(b, mesh, [Shard(0)]).requires_grad_()
    xs = x.clone().requires_grad_()
    cwd = distribute_tensor(CLASS_WEIGHT, mesh, [Shard(0)])
    loss = vocab_parallel_cross_entropy(xs, wd, t, bd, label_smoothing=0.1, chunk_size=9, class_weight=cwd)
    loss.backward()
    xf, wf, bf = (p.clone().requires_grad_() for p in (x, w, b))
    full = memops.linear_cross_entropy(xf, wf, t, bf, label_smoothing=0.1, class_weight=CLASS_WEIGHT)
    full.backward()
    _close(loss, full, "dtensor loss")
    _close(xs.grad, xf.grad, "dtensor grad input")
    _close(wd.grad.full_tensor(), wf.grad, "dtensor grad weight")
    _close(bd.grad.full_tensor(), bf.grad, "dtensor grad bias")


def case_compile():
    rank, world = dist.get_rank(), dist.get_world_size()
    x, w, b, t = _data(3)
    starts, sizes = _split(world, True)
    lo, hi = starts[rank], starts[rank] + sizes[rank]
    group = dist.group.WORLD

    def f(x, w, t):
        return vocab_parallel_cross_entropy(x, w, t, group=group, vocab_start=lo, vocab_size=V, z_loss=1e-3)

    cf = torch.compile(f, backend="aot_eager", fullgraph=True)
    xs, ws = x.clone().requires_grad_(), w[lo:hi].clone().requires_grad_()
    loss = cf(xs, ws, t)
    gx, gw = torch.autograd.grad(loss, (xs, ws))
    xe, we = x.clone().requires_grad_(), w[lo:hi].clone().requires_grad_()
    eager = f(xe, we, t)
    ex, ew = torch.autograd.grad(eager, (xe, we))
    _close(loss, eager, "compiled loss")
    _close(gx, ex, "compiled grad input")
    _close(gw, ew, "compiled grad weight")


class MixedHead(torch.nn.Linear):
    """A head whose forward runs the transform and log-prob ops too (all inside the module's forward)."""

    def forward(self, h, labels):
        ce = memops.linear_cross_entropy(h, self.weight, labels, self.bias, label_smoothing=0.05, chunk_size=5)
        focal = memops.linear_loss(h, self.weight, labels, "focal", self.bias, chunk_size=5, gamma=1.5)
        logp = memops.linear_logprobs(h, self.weight, labels.clamp(min=0), self.bias, chunk_size=5)
        return ce + 0.5 * focal - 0.01 * (logp * (labels >= 0)).sum() / labels.numel()


class TinyLM(torch.nn.Module):
    def __init__(self, head=LinearCrossEntropyHead):
        super().__init__()
        self.embed = torch.nn.Embedding(V, D)
        self.mlp = torch.nn.Linear(D, D)
        self.lm_head = head(D, V, bias=True)

    def forward(self, tokens, labels):
        h = torch.tanh(self.mlp(self.embed(tokens)))
        if isinstance(self.lm_head, MixedHead):
            return self.lm_head(h, labels)
        return self.lm_head(h, labels, label_smoothing=0.05, chunk_size=5)


def _batches(world):
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, V, (world * 2, 9), generator=g)
    labels = torch.randint(0, V, (world * 2, 9), generator=g)
    labels[:, :2] = -100
    return tokens, labels


def _single(world, head):
    torch.manual_seed(0)
    model = TinyLM(head).double()
    tokens, labels = _batches(world)
    # DDP / FSDP average the per-rank gradients: the mean of the per-rank losses
    loss = sum(model(tokens[2 * r : 2 * r + 2], labels[2 * r : 2 * r + 2]) for r in range(world)) / world
    loss.backward()
    return {k: p.grad for k, p in model.named_parameters()}


def case_ddp():
    rank, world = dist.get_rank(), dist.get_world_size()
    for head in (LinearCrossEntropyHead, MixedHead):
        expected = _single(world, head)
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(TinyLM(head).double())
        tokens, labels = _batches(world)
        model(tokens[2 * rank : 2 * rank + 2], labels[2 * rank : 2 * rank + 2]).backward()
        for k, p in model.module.named_parameters():
            _close(p.grad, expected[k], f"ddp {head.__name__} grad {k}")


def case_fsdp():
    from torch.distributed.fsdp import fully_shard

    rank, world = dist.get_rank(), dist.get_world_size()
    for head in (LinearCrossEntropyHead, MixedHead):
        expected = _single(world, head)
        torch.manual_seed(0)
        model = TinyLM(head).double()
        fully_shard(model.lm_head)
        fully_shard(model)
        tokens, labels = _batches(world)
        model(tokens[2 * rank : 2 * rank + 2], labels[2 * rank : 2 * rank + 2]).backward()
        for k, p in model.named_parameters():
            _close(p.grad.full_tensor(), expected[k], f"fsdp {head.__name__} grad {k}")


def _hf_llama():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(cfg).double().train()


def case_hf_fsdp():
    """A patched HF model whose lm_head is fully_shard-ed: the loss runs inside the head's forward."""
    from torch.distributed.fsdp import fully_shard

    from memops.integrations import transformers as mt

    rank, world = dist.get_rank(), dist.get_world_size()
    tokens, labels = _batches(world)
    single = _hf_llama()
    loss = (
        sum(single(input_ids=tokens[2 * r : 2 * r + 2], labels=labels[2 * r : 2 * r + 2]).loss for r in range(world))
        / world
    )
    loss.backward()
    model = mt.apply(_hf_llama())
    fully_shard(model.lm_head)
    fully_shard(model)
    out = model(input_ids=tokens[2 * rank : 2 * rank + 2], labels=labels[2 * rank : 2 * rank + 2])
    assert out.logits is None
    out.loss.backward()
    for (k, p), (_, q) in zip(model.named_parameters(), single.named_parameters()):
        # the unpatched model's loss upcasts to fp32: compare at fp32 precision
        torch.testing.assert_close(p.grad.full_tensor(), q.grad, rtol=1e-5, atol=1e-7, msg=lambda m, k=k: f"{k}: {m}")


def case_mismatch():
    rank = dist.get_rank()
    x, w, b, t = _data()
    try:  # rank 0 claims a vocabulary one row larger than the shards cover
        vocab_parallel_cross_entropy(
            x,
            w[:10] if rank == 0 else w[10:],
            t.clamp(max=9),
            vocab_start=0 if rank == 0 else 10,
            vocab_size=V + (1 if rank == 0 else 0),
        )
    except ValueError as exc:
        assert "do not tile the vocabulary" in str(exc), exc
        return
    raise AssertionError("mismatched shards were not reported")


def case_collectives():
    """Vocab-parallel statistics are reduced once per chunk, not per sub-block, and the shard layout is
    checked by the first call only."""
    from memops.ops import vocab_parallel as vp

    rank, world = dist.get_rank(), dist.get_world_size()
    counts = {"all_reduce": 0, "all_gather": 0}
    originals = vp._all_reduce, vp.all_gather

    def counting(name, fn):
        def call(*args):
            counts[name] += 1
            return fn(*args)

        return call

    vp._all_reduce, vp.all_gather = counting("all_reduce", originals[0]), counting("all_gather", originals[1])
    try:
        g = torch.Generator().manual_seed(0)
        vocab = 80000  # 40000 float64 columns per rank: a CPU sub-block holds 13 rows, a chunk 64
        local = vocab // world
        x = torch.randn(128, 8, generator=g, dtype=torch.float64, requires_grad=True)
        w = torch.randn(vocab, 8, generator=g, dtype=torch.float64)[rank * local : (rank + 1) * local]
        w.requires_grad_(True)
        t = torch.randint(0, vocab, (128,), generator=g)
        for call in range(2):
            counts.update(all_reduce=0, all_gather=0)
            loss = vocab_parallel_cross_entropy(x, w, t, vocab_start=rank * local, vocab_size=vocab, chunk_size=64)
            loss.backward()
            # 2 chunks x (row maxima, then the sums), and the input gradient's partial sums once
            assert counts["all_reduce"] == 2 * 2 + 1, counts
            assert counts["all_gather"] == (1 if call == 0 else 0), counts
    finally:
        vp._all_reduce, vp.all_gather = originals


def case_rank_failure():
    if dist.get_rank() == 1:
        os._exit(3)  # dies before the collective
    x, w, b, t = _data()
    vocab_parallel_cross_entropy(x, w[:10], t.clamp(max=9), vocab_start=0, vocab_size=V)


def main():
    case = sys.argv[1]
    timeout = datetime.timedelta(seconds=float(os.environ.get("DIST_TIMEOUT", "60")))
    dist.init_process_group("gloo", timeout=timeout)
    try:
        for name in case.split(","):
            globals()[f"case_{name}"]()
            dist.barrier()
            print(f"rank {dist.get_rank()}: {name} ok", flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
    # Every case passed (an error raises before this line and exits non-zero).  Skip the interpreter's
    # teardown: under load it has aborted twice after all cases printed "ok" ("terminate called without an
    # active exception": a native thread still joinable while static objects are destroyed), which says
    # nothing about the results checked above.
    sys.stdout.flush()
    os._exit(0)
