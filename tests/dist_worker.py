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


class VocabParallelHead(torch.nn.Linear):
    """An lm_head whose weight is a Shard(0) DTensor on a tensor-parallel mesh: the loss is computed inside
    its forward (where FSDP2 has gathered the data-parallel shards), vocabulary-parallel over the TP group."""

    def forward(self, h, labels, **options):
        return vocab_parallel_cross_entropy(h, self.weight, labels, self.bias, **options)


def case_fsdp_tp():
    """FSDP2 on one dimension of a 2-D mesh and tensor parallelism (the head vocabulary-parallel) on the other:
    three SGD steps give the single-process run's losses and parameters."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 4
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    dp = mesh["dp"].get_local_rank()
    tokens, labels = _batches(2)
    torch.manual_seed(0)
    single = TinyLM().double()
    sgd = torch.optim.SGD(single.parameters(), lr=0.5)
    torch.manual_seed(0)
    model = TinyLM(VocabParallelHead).double()
    for name in ("weight", "bias"):
        full = getattr(model.lm_head, name)
        setattr(model.lm_head, name, torch.nn.Parameter(distribute_tensor(full.detach(), mesh["tp"], [Shard(0)])))
    fully_shard(model.lm_head, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(3):
        expected = sum(single(tokens[2 * r : 2 * r + 2], labels[2 * r : 2 * r + 2]) for r in range(2)) / 2
        expected.backward()
        sgd.step()
        sgd.zero_grad()
        loss = model(tokens[2 * dp : 2 * dp + 2], labels[2 * dp : 2 * dp + 2])
        loss.backward()
        opt.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean, group=mesh["dp"].get_group())
        _close(mean / 2, expected.detach(), f"fsdp x tp loss step {step}")
    for (name, p), q in zip(model.named_parameters(), single.parameters()):
        _close(p.full_tensor(), q.detach(), f"fsdp x tp parameter {name} after 3 steps")
    if rank == 0:
        print(f"fsdp x tp: 3 steps on a 2x2 mesh equal the single process (loss {expected.item():.6f})")


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
    from memops.ops import reducer as vp

    rank, world = dist.get_rank(), dist.get_world_size()
    counts = {"all_reduce": 0, "all_gather": 0}
    originals = vp.all_reduce, vp.all_gather

    def counting(name, fn):
        def call(*args):
            counts[name] += 1
            return fn(*args)

        return call

    vp.all_reduce, vp.all_gather = counting("all_reduce", originals[0]), counting("all_gather", originals[1])
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
        vp.all_reduce, vp.all_gather = originals


def _tokens(world, n, zero_rank=False):
    """Lopsided token counts per rank (sequence parallelism), one rank with none when asked."""
    sizes = [2 + 3 * r for r in range(world - 1)]
    if zero_rank and world > 2:
        sizes[1] = 0
    sizes.append(n - sum(sizes))
    return [sum(sizes[:r]) for r in range(world)], sizes


def _grads(out_parts, params, seed):
    """Gradients of ``sum(g * out)`` over ``out_parts`` (random ``g`` per part, the same on every rank for the
    same global part)."""
    g = torch.Generator().manual_seed(seed)
    total = 0
    for o in out_parts:
        total = total + (torch.randn(o.shape, dtype=torch.float64, generator=g) * o).sum()
    return torch.autograd.grad(total, params)


LP_OPTIONS = [
    dict(return_entropy=True, extras=("log_sum_sq_probs", "mean_logits", "is_top1")),
    dict(return_entropy=True, temperature=0.7, softcap=2.5, logit_scale=1.3, chunk_size=7),
    dict(temperature=1.5, extras=("is_top1",), chunk_size=11),
    # a sampling mask of K kept ids per token (-1 padding, duplicates): each rank sums its shard's kept ids
    dict(return_entropy=True, kept=3, temperature=0.8, softcap=2.0, chunk_size=5),
    dict(return_entropy=True, kept=7, entropy_over="kept", extras=("is_top1",)),
    dict(return_entropy=True, kept=2, per_token_temperature=True, softcap=2.0, chunk_size=6),
]


def _kept_ids(t: torch.Tensor, k: int, seed: int = 17) -> torch.Tensor:
    """``t.shape + (k,)`` kept ids with -1 padding and a duplicate per token (as the sampler's masks come)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(-1, V, (*t.shape, k), generator=g)
    ids[..., -1] = ids[..., 0]
    return ids


def _with_kept(opts: dict, t: torch.Tensor, a: int, z: int, rank: int) -> tuple[dict, dict]:
    """The single-process call's options and this rank's: ``kept=K`` becomes a sampling mask, this rank's
    tokens' rows of it padded with ``rank`` more -1 columns (every rank its own K)."""
    opts = dict(opts)
    k = opts.pop("kept", None)
    full, mine = dict(opts), dict(opts)
    if opts.pop("per_token_temperature", False):  # one temperature per token ([B, 1] per sequence for [B, T])
        full.pop("per_token_temperature")
        mine.pop("per_token_temperature")
        shape = (t.shape[0], 1) if t.dim() == 2 else t.shape
        temps = torch.rand(shape, generator=torch.Generator().manual_seed(19), dtype=torch.float64) + 0.4
        full["temperature"], mine["temperature"] = temps, temps[a:z]
    if k:
        mask = _kept_ids(t, k)
        own = mask[a:z]
        full["sampling_mask"] = mask
        mine["sampling_mask"] = torch.cat([own, own.new_full((*own.shape[:-1], rank), -1)], dim=-1)
    return full, mine


def _logprob_outputs(out):
    if isinstance(out, dict):
        return [out[k] for k in sorted(out)]
    return list(out) if isinstance(out, tuple) else [out]


def case_families():
    """Vocab-parallel log-probs (every extra), GRPO (every loss type) and distillation (online sharded and
    whole teachers, offline top-k, hard labels), each with replicated and with sequence-parallel (lopsided,
    one rank empty on 3+ ranks) tokens, against the single-process float64 op: outputs and every gradient."""
    from memops.distributed import vocab_parallel_logprobs

    rank, world = dist.get_rank(), dist.get_world_size()
    x, w, b, t = _data(4)
    t = t.clamp(min=0)
    t[3] = t[5] = 0  # ties and repeats
    w[0] = w[1]  # equal logits for two tokens: the first is the top-1 one
    b[1] = b[0]
    for uneven in (False, True):
        starts, sizes = _split(world, uneven)
        lo, hi = starts[rank], starts[rank] + sizes[rank]
        for sp in (False, True):
            offs, counts = _tokens(world, N, zero_rank=sp and uneven)
            a, z = (offs[rank], offs[rank] + counts[rank]) if sp else (0, N)
            for opts in LP_OPTIONS:
                opts, mine_opts = _with_kept(opts, t, a, z, rank)
                xf, wf, bf = (p.clone().requires_grad_() for p in (x, w, b))
                full = _logprob_outputs(memops.linear_logprobs(xf, wf, t, bf, **opts))
                diff = [o for o in full if o.is_floating_point()]
                gx, gw, gb = _grads(diff, (xf, wf, bf), 5)
                xs = x[a:z].clone().requires_grad_()
                ws, bs = w[lo:hi].clone().requires_grad_(), b[lo:hi].clone().requires_grad_()
                mine = _logprob_outputs(vocab_parallel_logprobs(xs, ws, t[a:z], bs, sequence_parallel=sp, **mine_opts))
                for o, f in zip(mine, full):
                    _close(o, f[a:z], f"logprobs {opts} sp={sp}")
                g = torch.Generator().manual_seed(5)
                total = 0
                for o in [o for o in mine if o.is_floating_point()]:
                    go = torch.randn((N,), dtype=torch.float64, generator=g)
                    total = total + (go[a:z] * o).sum()
                # each rank's weight gradient is that of the group's total (every rank's tokens)
                sx, sw, sb = torch.autograd.grad(total, (xs, ws, bs))
                _close(sx, gx[a:z], f"logprobs grad input {opts} sp={sp}")
                _close(sw, gw[lo:hi], f"logprobs grad weight {opts} sp={sp}")
                _close(sb, gb[lo:hi], f"logprobs grad bias {opts} sp={sp}")
            _grpo(x, w, b, t, lo, hi, sp, world, rank)
            _distill(x, w, b, t, lo, hi, sp, a, z)
            if sp:
                _ce_sequence_parallel(lo, hi, a, z)
    _accurate_precision(rank, world)


def _accurate_precision(rank, world):
    """precision="accurate" vocab-parallel (bf16 inputs, logits in fp32): the single-process accurate op's
    results to fp32 rounding, and closer to float64 math than the default precision's."""
    from memops.distributed import vocab_parallel_logprobs

    x, w, b, t = _data(12)
    t = t.clamp(min=0)
    xb, wb = x.bfloat16(), w.bfloat16()
    starts, sizes = _split(world, True)
    lo, hi = starts[rank], starts[rank] + sizes[rank]
    exact = memops.linear_logprobs(xb.double(), wb.double(), t)
    errs = {}
    for precision in ("accurate", "reference"):
        single = memops.linear_logprobs(xb, wb, t, precision=precision)
        par = vocab_parallel_logprobs(xb, wb[lo:hi], t, vocab_start=lo, vocab_size=V, precision=precision)
        torch.testing.assert_close(par, single, rtol=1e-5, atol=1e-5)
        errs[precision] = (par.double() - exact).abs().max().item()
        loss = vocab_parallel_cross_entropy(xb, wb[lo:hi], t, vocab_start=lo, vocab_size=V, precision=precision)
        torch.testing.assert_close(
            loss, memops.linear_cross_entropy(xb, wb, t, precision=precision), rtol=1e-5, atol=1e-5
        )
    assert errs["accurate"] < errs["reference"], errs


def _ce_sequence_parallel(lo, hi, a, z):
    """Cross-entropy with sequence-parallel tokens (every option set of the replicated case)."""
    x, w, b, t = _data(6)
    for opts in OPTIONS:
        opts = dict(opts)
        ign = opts.get("ignore_index", -100)
        tt = torch.where(t == -100, torch.full_like(t, ign), t)
        mine = {}
        if opts.pop("class_weight", False):
            mine, full_cw = dict(class_weight=CLASS_WEIGHT[lo:hi]), dict(class_weight=CLASS_WEIGHT)
        else:
            full_cw = {}
        xf, wf, bf = (p.clone().requires_grad_() for p in (x, w, b))
        full, lse = memops.linear_cross_entropy(xf, wf, tt, bf, return_lse=True, **opts, **full_cw)
        go = torch.randn(full.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        gx, gw, gb = torch.autograd.grad(full, (xf, wf, bf), go)
        xs = x[a:z].clone().requires_grad_()
        ws, bs = w[lo:hi].clone().requires_grad_(), b[lo:hi].clone().requires_grad_()
        loss, plse = vocab_parallel_cross_entropy(
            xs, ws, tt[a:z], bs, return_lse=True, sequence_parallel=True, **opts, **mine
        )
        per_token = opts.get("reduction") == "none"
        _close(loss, full[a:z] if per_token else full, f"sp loss {opts}")
        _close(plse, lse[a:z], f"sp lse {opts}")
        sx, sw, sb = torch.autograd.grad(loss, (xs, ws, bs), go[a:z] if per_token else go)
        _close(sx, gx[a:z], f"sp grad input {opts}")
        _close(sw, gw[lo:hi], f"sp grad weight {opts}")
        _close(sb, gb[lo:hi], f"sp grad bias {opts}")


GRPO_OPTIONS = [
    dict(loss_type="grpo", beta=0.1, epsilon_high=0.28, entropy_coef=0.01),
    dict(loss_type="dapo", temperature=0.8, delta=1.5),
    dict(loss_type="dr_grpo", max_completion_length=8, softcap=3.0),
    dict(loss_type="bnpo", beta=0.05, use_bias_correction_kl=True),
    dict(loss_type="luspo"),
    dict(loss_type="cispo", epsilon_high=0.3),
    dict(loss_type="sapo", chunk_size=5),
    dict(loss_type="grpo", importance_sampling_level="sequence"),
    dict(loss_type="dapo", kept=4, temperature=0.9),
    dict(loss_type="grpo", beta=0.04, kept=2, entropy_coef=0.02, entropy_over="kept"),
    dict(loss_type="bnpo", per_token_temperature=True, softcap=3.0),
]


def _grpo(x, w, b, t, lo, hi, sp, world, rank):
    from memops.distributed import vocab_parallel_grpo_loss

    B, T = 8, N // 8
    g = torch.Generator().manual_seed(11)
    ids, h = t.view(B, T), x.view(B, T, D)
    mask = (torch.rand(B, T, generator=g) > 0.25).to(torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    ref = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    offs, counts = _tokens(world, B) if world < 4 else ([0, 1, 2, 4], [1, 1, 2, 4])
    a, z = (offs[rank], offs[rank] + counts[rank]) if sp else (0, B)
    for opts in GRPO_OPTIONS:
        if sp and opts.get("importance_sampling_level") == "sequence":
            continue  # refused with sequence parallelism (tests/test_distributed.py checks the message)
        opts, mine_kept = _with_kept(opts, ids, a, z, rank)
        mine_kept = {k: v for k, v in mine_kept.items() if k in ("sampling_mask", "temperature")}
        extra = dict(old_logprobs=old, ref_logprobs=ref) if opts.get("beta") else dict(old_logprobs=old)
        hf, wf, bf = (p.clone().requires_grad_() for p in (h, w, b))
        loss, metrics = memops.linear_grpo_loss(hf, wf, ids, mask, adv, bias=bf, **extra, **opts)
        gx, gw, gb = torch.autograd.grad(loss, (hf, wf, bf))
        hs = h[a:z].clone().requires_grad_()
        ws, bs = w[lo:hi].clone().requires_grad_(), b[lo:hi].clone().requires_grad_()
        mine_extra = {k: v[a:z] for k, v in extra.items()}
        mine_opts = {k: v for k, v in opts.items() if k not in mine_kept}
        ploss, pmetrics = vocab_parallel_grpo_loss(
            hs, ws, ids[a:z], mask[a:z], adv[a:z], bias=bs, sequence_parallel=sp, **mine_extra, **mine_kept, **mine_opts
        )
        _close(ploss, loss, f"grpo loss {opts} sp={sp}")
        assert sorted(pmetrics) == sorted(metrics), (pmetrics, metrics)
        for k in metrics:
            _close(pmetrics[k], metrics[k], f"grpo metric {k} {opts} sp={sp}")
        sx, sw, sb = torch.autograd.grad(ploss, (hs, ws, bs))
        _close(sx, gx[a:z], f"grpo grad input {opts} sp={sp}")
        _close(sw, gw[lo:hi], f"grpo grad weight {opts} sp={sp}")
        _close(sb, gb[lo:hi], f"grpo grad bias {opts} sp={sp}")


DISTILL_OPTIONS = [
    dict(beta=0.0),
    dict(beta=1.0, temperature=2.0, hard_label_weight=0.3, return_entropy=True),
    dict(beta=0.4, softcap=2.0, teacher_softcap=3.0, teacher_logit_scale=0.8, chunk_size=6, num_items=13.5),
    dict(beta=0.5, reduction="sum", whole_teacher=True),
    dict(beta=0.2, reduction="none", hard_label_weight=1.0),
    dict(offline=True, temperature=1.5, hard_label_weight=0.2, return_entropy=True),
]


def _distill(x, w, b, t, lo, hi, sp, a, z):
    from memops.distributed import vocab_parallel_distillation_loss

    g = torch.Generator().manual_seed(13)
    dt = 5
    xt = torch.randn(N, dt, generator=g, dtype=torch.float64)
    wt = torch.randn(V, dt, generator=g, dtype=torch.float64)
    bt = torch.randn(V, generator=g, dtype=torch.float64)
    ids = torch.stack([torch.randperm(V, generator=g)[:4] for _ in range(N)])
    lps = torch.log_softmax(torch.randn(N, 4, generator=g, dtype=torch.float64), -1)
    tt = t.clone()
    tt[::5] = -100
    for opts in DISTILL_OPTIONS:
        opts = dict(opts)
        offline, whole = opts.pop("offline", False), opts.pop("whole_teacher", False)
        if offline:
            teacher = dict(teacher_topk_ids=ids, teacher_topk_logprobs=lps)
            mine_teacher = dict(teacher_topk_ids=ids[a:z], teacher_topk_logprobs=lps[a:z])
            opts["beta"] = 0.0
        else:
            teacher = dict(teacher_input=xt, teacher_weight=wt, teacher_bias=bt)
            rows = slice(None) if whole else slice(lo, hi)
            mine_teacher = dict(teacher_input=xt[a:z], teacher_weight=wt[rows], teacher_bias=bt[rows])
        xf, wf, bf = (p.clone().requires_grad_() for p in (x, w, b))
        out = memops.linear_distillation_loss(xf, wf, tt, student_bias=bf, **teacher, **opts)
        outs = list(out) if isinstance(out, tuple) else [out]
        gx, gw, gb = _grads(outs[:1], (xf, wf, bf), 7)
        xs = x[a:z].clone().requires_grad_()
        ws, bs = w[lo:hi].clone().requires_grad_(), b[lo:hi].clone().requires_grad_()
        pout = vocab_parallel_distillation_loss(
            xs, ws, tt[a:z], student_bias=bs, sequence_parallel=sp, **mine_teacher, **opts
        )
        pouts = list(pout) if isinstance(pout, tuple) else [pout]
        per_token = opts.get("reduction") == "none"
        for k, (o, f) in enumerate(zip(pouts, outs)):
            _close(o, f[a:z] if (sp and (k > 0 or per_token)) else f, f"distill {opts} offline={offline} sp={sp}")
        go = torch.randn(outs[0].shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        mine_go = go[a:z] if (sp and per_token) else go
        sx, sw, sb = torch.autograd.grad((pouts[0] * mine_go).sum(), (xs, ws, bs))
        _close(sx, gx[a:z], f"distill grad input {opts} sp={sp}")
        _close(sw, gw[lo:hi], f"distill grad weight {opts} sp={sp}")
        _close(sb, gb[lo:hi], f"distill grad bias {opts} sp={sp}")


def case_dtensor_families():
    """DTensor front ends: the weight Shard(0) on a 1-D mesh, and on the tensor-parallel dimension of a 2-D
    (data x tensor) mesh with 4 ranks; the input Replicate() or Shard(0) along the tokens (sequence
    parallelism); outputs are DTensors placed like the input's tokens, gradients placed like their tensors;
    a placement memops cannot compute is a ValueError naming it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    from memops.distributed import vocab_parallel_distillation_loss, vocab_parallel_grpo_loss, vocab_parallel_logprobs

    world = dist.get_world_size()
    meshes = [(init_device_mesh("cpu", (world,)), 0)]
    if world == 4:
        meshes.append((init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp")), 1))
    x, w, b, t = _data(8)
    t = t.clamp(min=0)
    B, T = 8, N // 8
    g = torch.Generator().manual_seed(9)
    mask = (torch.rand(B, T, generator=g) > 0.3).to(torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    wt = torch.randn(V, 4, generator=g, dtype=torch.float64)
    xt = torch.randn(N, 4, generator=g, dtype=torch.float64)
    for mesh, tp in meshes:
        along = [Replicate()] * mesh.ndim
        along[tp] = Shard(0)

        def put(v, p, mesh=mesh):
            return distribute_tensor(v, mesh, p)

        for tokens in (Replicate(), Shard(0)):
            xp = [Replicate()] * mesh.ndim
            xp[tp] = tokens
            what = f"mesh {mesh.ndim}-D tokens {tokens}"
            # log-probs and entropy
            wd, bd = put(w, along).requires_grad_(), put(b, along).requires_grad_()
            xd = put(x, xp).requires_grad_()
            lp, ent = vocab_parallel_logprobs(xd, wd, put(t, xp), bd, return_entropy=True, temperature=0.9)
            assert isinstance(lp, DTensor) and tuple(lp.placements) == tuple(xp), (what, lp.placements)
            xf, wf, bf = (p.clone().requires_grad_() for p in (x, w, b))
            flp, fent = memops.linear_logprobs(xf, wf, t, bf, return_entropy=True, temperature=0.9)
            _close(lp.full_tensor(), flp, f"dtensor logprobs {what}")
            _close(ent.full_tensor(), fent, f"dtensor entropy {what}")
            go = torch.randn(N, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
            (lp * put(go, xp) + ent).sum().backward()
            (flp * go + fent).sum().backward()
            assert tuple(xd.grad.placements) == tuple(xp) and tuple(wd.grad.placements) == tuple(along)
            _close(xd.grad.full_tensor(), xf.grad, f"dtensor logprobs grad input {what}")
            _close(wd.grad.full_tensor(), wf.grad, f"dtensor logprobs grad weight {what}")
            _close(bd.grad.full_tensor(), bf.grad, f"dtensor logprobs grad bias {what}")
            # GRPO: completions split over the ranks with the tokens
            wd = put(w, along).requires_grad_()
            hd = put(x.view(B, T, D), xp).requires_grad_()
            loss, metrics = vocab_parallel_grpo_loss(
                hd, wd, put(t.view(B, T), xp), put(mask, xp), put(adv, xp), beta=0.0, loss_type="dapo"
            )
            assert isinstance(loss, DTensor) and all(p == Replicate() for p in loss.placements)
            hf, wf = x.view(B, T, D).clone().requires_grad_(), w.clone().requires_grad_()
            floss, fmetrics = memops.linear_grpo_loss(hf, wf, t.view(B, T), mask, adv, beta=0.0, loss_type="dapo")
            _close(loss.full_tensor(), floss, f"dtensor grpo {what}")
            for k in fmetrics:
                _close(metrics[k].full_tensor(), fmetrics[k], f"dtensor grpo {k} {what}")
            loss.backward()
            floss.backward()
            _close(hd.grad.full_tensor(), hf.grad, f"dtensor grpo grad input {what}")
            _close(wd.grad.full_tensor(), wf.grad, f"dtensor grpo grad weight {what}")
            # distillation: the teacher whole on every rank (replicated DTensor) or sharded like the student
            for teacher in (Replicate(), None):
                wd = put(w, along).requires_grad_()
                xd = put(x, xp).requires_grad_()
                twd = put(wt, [Replicate()] * mesh.ndim if teacher is not None else along)
                loss = vocab_parallel_distillation_loss(xd, wd, put(t, xp), put(xt, xp), twd, beta=0.3)
                xf, wf = x.clone().requires_grad_(), w.clone().requires_grad_()
                floss = memops.linear_distillation_loss(xf, wf, t, xt, wt, beta=0.3)
                _close(loss.full_tensor(), floss, f"dtensor distill {what} teacher {teacher}")
                loss.backward()
                floss.backward()
                _close(xd.grad.full_tensor(), xf.grad, f"dtensor distill grad input {what}")
                _close(wd.grad.full_tensor(), wf.grad, f"dtensor distill grad weight {what}")
        # placements memops cannot compute: refused by name, on every rank, before any collective
        bad_weight = [Replicate()] * mesh.ndim
        bad_weight[tp] = Shard(1)
        bad_input = [Replicate()] * mesh.ndim
        bad_input[tp] = Shard(1)
        refusals = [([Replicate()] * mesh.ndim, bad_weight, "Shard(dim=1)"), (bad_input, along, "Shard(dim=1)")]
        # [B, T, D] hidden states split along T: per-token ops take it (each rank's tokens) ...
        h3 = x.view(B, T, D)
        lp = vocab_parallel_logprobs(put(h3, bad_input).requires_grad_(), put(w, along), put(t.view(B, T), bad_input))
        _close(lp.full_tensor(), memops.linear_logprobs(h3, w, t.view(B, T)), "logprobs, tokens split along T")
        # ... GRPO needs whole completions per rank
        try:
            vocab_parallel_grpo_loss(
                put(h3, bad_input), put(w, along), put(t.view(B, T), bad_input), put(mask, bad_input), put(adv, xp)
            )
        except ValueError as e:
            assert "Shard(dim=1)" in str(e) and "k < 1" in str(e), str(e)
        else:
            raise AssertionError("GRPO with completions split along T was not refused")
        if mesh.ndim == 2:
            refusals.append(([Shard(0), Replicate()], along, "to_local"))
        for x_at, w_at, named in refusals:
            try:
                vocab_parallel_logprobs(put(x, x_at), put(w, w_at), t)
            except ValueError as e:
                assert named in str(e), str(e)
            else:
                raise AssertionError(f"not refused: {named}")
    # a transform needs whole logit rows: a sharded head is refused by name, pointing at the exact routes
    mesh = meshes[0][0]
    try:
        memops.linear_loss(x, distribute_tensor(w, mesh, [Shard(0)]), t, "focal")
    except ValueError as e:
        assert "weight is a DTensor" in str(e) and "whole logit rows" in str(e), str(e)
    else:
        raise AssertionError("a transform on a vocabulary-sharded DTensor weight was not refused")
    # GSPO needs whole sequences in one pass: refused with sequence parallelism
    try:
        vocab_parallel_grpo_loss(
            x.view(B, T, D)[:1],
            w[:2],
            t.view(B, T)[:1].clamp(max=1),
            mask[:1],
            adv[:1],
            vocab_start=2 * dist.get_rank(),
            vocab_size=2 * world,
            sequence_parallel=True,
            importance_sampling_level="sequence",
        )
    except ValueError as e:
        assert "GSPO" in str(e), str(e)
    else:
        raise AssertionError("GSPO with sequence parallelism was not refused")


def case_collectives_families():
    """Collectives per call of the other families and of sequence parallelism, counted on 2 ranks (one
    process group call each), 2 chunks of 64 rows over a 40000-row shard per rank."""
    from memops.distributed import vocab_parallel_logprobs
    from memops.ops import reducer as vp

    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2
    names = ("all_reduce", "all_gather", "broadcast", "reduce_to")
    originals = {k: getattr(vp, k) for k in names}
    counts = dict.fromkeys(names, 0)

    def counting(name, fn):
        def call(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)

        return call

    for k in names:
        setattr(vp, k, counting(k, originals[k]))
    try:
        g = torch.Generator().manual_seed(0)
        vocab, local = 80000, 40000
        x = torch.randn(128, 8, generator=g, dtype=torch.float64, requires_grad=True)
        w = torch.randn(vocab, 8, generator=g, dtype=torch.float64)[rank * local : (rank + 1) * local]
        w.requires_grad_(True)
        t = torch.randint(0, vocab, (128,), generator=g)
        layout = dict(vocab_start=rank * local, vocab_size=vocab, chunk_size=64)
        vocab_parallel_cross_entropy(x, w, t, **layout)  # the layout's one check, not counted below

        def counted(fn):
            counts.update(dict.fromkeys(names, 0))
            fn()
            return dict(counts)

        # log-probs and entropy, forward: per chunk the row max, then the sums (one all-reduce each)
        lp = {}
        c = counted(lambda: lp.update(out=vocab_parallel_logprobs(x, w, t, return_entropy=True, **layout)))
        assert c == dict(all_reduce=2 * 2, all_gather=0, broadcast=0, reduce_to=0), c
        # backward: which tokens have a gradient (1) and the logits' bound (1), agreed by every rank; the
        # chunks again (2 x 2); the input gradient's partial sums (1)
        logp, ent = lp["out"]
        c = counted(lambda: (logp.sum() + ent.sum()).backward())
        assert c == dict(all_reduce=1 + 1 + 2 * 2 + 1, all_gather=0, broadcast=0, reduce_to=0), c
        # with a sampling mask: the kept ids' maximum and sums ride on the same two all-reduces; the mask is never
        # gathered
        kept = torch.randint(-1, vocab, (128, 6), generator=g)
        c = counted(lambda: vocab_parallel_logprobs(x, w, t, sampling_mask=kept, entropy_over="kept", **layout))
        assert c == dict(all_reduce=2 * 2, all_gather=0, broadcast=0, reduce_to=0), c
        # sequence parallelism, 64 tokens per rank (chunk k = rank k's rows): the token counts and the targets
        # gathered once (2), per chunk its rows broadcast by their owner (1), the row max and sums (2), and the
        # input gradient's rows reduced to their owner (1); a trained scalar loss computes all in the forward
        xs = x[rank * 64 : (rank + 1) * 64].detach().clone().requires_grad_(True)
        ts = t[rank * 64 : (rank + 1) * 64]
        out = {}
        c = counted(lambda: out.update(loss=vocab_parallel_cross_entropy(xs, w, ts, sequence_parallel=True, **layout)))
        assert c == dict(all_reduce=2 * 2, all_gather=2, broadcast=2, reduce_to=2), c
        c = counted(lambda: out["loss"].backward())
        assert c == dict.fromkeys(names, 0), c
        if rank == 0:
            print("collectives per call: log-probs forward 4, backward 7; sequence-parallel CE 4 + 2 + 2 + 2")
    finally:
        for k in names:
            setattr(vp, k, originals[k])


def case_megatron():
    """Megatron-core 0.16's tensor-parallel group (``parallel_state``): memops' vocab-parallel CE from the hidden
    states against Megatron's ``vocab_parallel_cross_entropy`` on the vocab-parallel logits, per token and in
    every gradient, with and without Megatron's sequence parallelism (``[S / tp, B, D]`` hidden states).
    Megatron computes in fp32 whatever its input (``vocab_parallel_logits.float()``), so the exact answer is
    the float64 single-process reference: memops equals it to 1e-12 in float64, and in float64 and fp32 its
    error is at most Megatron's own (x2, a stated margin for two roundings of fp32 sums)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy as megatron_ce

    rank, world = dist.get_rank(), dist.get_world_size()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    try:
        tp = parallel_state.get_tensor_model_parallel_group()
        S, B, Dm, Vm = 8, 3, 6, 10 * world  # Megatron pads the vocabulary to a multiple of tp
        rows = Vm // world
        g = torch.Generator().manual_seed(3)
        hidden = torch.randn(S, B, Dm, generator=g, dtype=torch.float64)
        weight = torch.randn(Vm, Dm, generator=g, dtype=torch.float64)
        labels = torch.randint(0, Vm, (S, B), generator=g)
        go = torch.randn(S, B, generator=g, dtype=torch.float64)
        mine = slice(rank * rows, (rank + 1) * rows)
        seq = slice(rank * S // world, (rank + 1) * S // world)
        layout = dict(group=tp, vocab_start=rank * rows, vocab_size=Vm, reduction="none")
        hx, wx = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        exact_loss = reference.ref_linear_cross_entropy(hx, wx, labels, reduction="none")
        exact = (exact_loss, *torch.autograd.grad((exact_loss * go).sum(), (hx, wx)))
        exact = (exact[0], exact[1], exact[2][mine])
        for dtype in (torch.float64, torch.float32):
            hm, wm = hidden.to(dtype).requires_grad_(), weight[mine].to(dtype).requires_grad_()
            ref_loss = megatron_ce(torch.matmul(hm, wm.t()), labels)
            theirs = (ref_loss, *torch.autograd.grad((ref_loss * go.to(dtype)).sum(), (hm, wm)))
            for sp in (False, True):
                rows_of = seq if sp else slice(None)
                hs, ws = hidden[rows_of].to(dtype).requires_grad_(), weight[mine].to(dtype).requires_grad_()
                loss = vocab_parallel_cross_entropy(hs, ws, labels[rows_of], sequence_parallel=sp, **layout)
                ours = (loss, *torch.autograd.grad((loss * go[rows_of].to(dtype)).sum(), (hs, ws)))
                for k, (a, b, e) in enumerate(zip(ours, theirs, exact)):
                    what = ("loss", "grad hidden", "grad weight")[k]
                    e_mine = e if k == 2 else e[rows_of]
                    b = b if k == 2 else b[rows_of]
                    err, err_megatron = ((v.double() - e_mine).abs().max().item() for v in (a, b))
                    if dtype == torch.float64:
                        assert err <= 1e-12, (what, sp, err)
                    assert err <= 2 * err_megatron + 1e-12, (what, dtype, sp, err, err_megatron)
                if rank == 0 and dtype == torch.float32 and not sp:
                    print(f"megatron: fp32 weight-gradient error memops {err:.2e}, megatron {err_megatron:.2e}")
        _megatron_gathered(hidden, weight, labels, go, seq, mine, layout, exact)
    finally:
        parallel_state.destroy_model_parallel()


def _megatron_gathered(hidden, weight, labels, go, seq, mine, layout, exact):
    """Hidden states gathered by Megatron's own ``gather_from_sequence_parallel_region`` (its backward sums the
    ranks' gradients: a reduce-scatter), as verl's Megatron engine passes them: ``input_grad="partial"`` gives
    each rank's own tokens the exact gradient; the default ``"reduced"`` gives them ``world`` times it (the sum
    taken twice), which this checks too so that the test can tell the two apart."""
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    # megatron-core allocates the gathered and the reduce-scattered buffers on torch.cuda.current_device(): the
    # one CPU stand-in here points that lookup at the CPU; the gather, its backward and the collectives are
    # Megatron's own
    torch.cuda.current_device = lambda: "cpu"
    world = dist.get_world_size()
    for input_grad, factor in (("partial", 1.0), ("reduced", float(world))):
        hs, ws = hidden[seq].clone().requires_grad_(), weight[mine].clone().requires_grad_()
        full = gather_from_sequence_parallel_region(hs)
        loss = vocab_parallel_cross_entropy(full, ws, labels, input_grad=input_grad, **layout)
        gh, gw = torch.autograd.grad((loss * go).sum(), (hs, ws))
        _close(loss, exact[0], f"megatron gathered loss ({input_grad})")
        _close(gh, factor * exact[1][seq], f"megatron gathered grad hidden ({input_grad})")
        _close(gw, exact[2], f"megatron gathered grad weight ({input_grad})")
    # log-probs and entropy at a temperature (verl's fused head), both outputs carrying gradient
    hx, wx = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    g2 = torch.Generator().manual_seed(5)
    ge = torch.randn(labels.shape, generator=g2, dtype=torch.float64)
    ref = reference.ref_linear_logprobs(hx, wx, labels, temperature=0.7)
    want = (*ref, *torch.autograd.grad((ref[0] * go + ref[1] * ge).sum(), (hx, wx)))
    hs, ws = hidden[seq].clone().requires_grad_(), weight[mine].clone().requires_grad_()
    logp, ent = memops.distributed.vocab_parallel_logprobs(
        gather_from_sequence_parallel_region(hs),
        ws,
        labels,
        group=layout["group"],
        vocab_start=layout["vocab_start"],
        vocab_size=layout["vocab_size"],
        temperature=0.7,
        return_entropy=True,
        input_grad="partial",
    )
    gh, gw = torch.autograd.grad((logp * go + ent * ge).sum(), (hs, ws))
    for got, exp, what in zip((logp, ent, gh, gw), (want[0], want[1], want[2][seq], want[3][mine]), "lehw"):
        _close(got, exp, f"megatron gathered log-probs ({what})")


def _invariant_calls(lo, hi, dtype):
    """The vocabulary-parallel front ends as ``f(rows, sp) -> (x leaf, per-row outputs, scalar)`` on this rank's
    shard ``[lo, hi)``, for the batch-invariant case."""
    from memops.distributed import (
        vocab_parallel_distillation_loss,
        vocab_parallel_grpo_loss,
        vocab_parallel_logprobs,
    )

    g = torch.Generator().manual_seed(21)
    w = torch.randn(V, D, generator=g).to(dtype)
    b = torch.randn(V, generator=g).to(dtype)
    wt = torch.randn(V, D, generator=g).to(dtype)
    ws, bs, wts = w[lo:hi], b[lo:hi], wt[lo:hi]

    def ce(r, sp):
        x = r["x"].to(dtype).detach().clone().requires_grad_()
        loss, lse = vocab_parallel_cross_entropy(
            x, ws, r["t"], bs, reduction="none", return_lse=True, z_loss=1e-3, sequence_parallel=sp
        )
        return x, [loss, lse], loss.sum()

    def logprobs(r, sp):
        x = r["x"].to(dtype).detach().clone().requires_grad_()
        out = vocab_parallel_logprobs(
            x,
            ws,
            r["t"].clamp(min=0),
            bs,
            temperature=r["temp"],
            sampling_mask=r["keep"],
            return_entropy=True,
            extras=("is_top1",),
            softcap=3.0,
            sequence_parallel=sp,
        )
        lp, ent = out["log_probs"], out["entropy"]
        return x, [lp, ent, out["is_top1"]], lp.sum() + 0.1 * ent.sum()

    def distill(r, sp):
        x = r["x"].to(dtype).detach().clone().requires_grad_()
        loss = vocab_parallel_distillation_loss(
            x, ws, r["t"], r["x"].flip(1).to(dtype), wts, student_bias=bs, reduction="none", sequence_parallel=sp
        )
        return x, [loss], loss.sum()

    def grpo(r, sp):
        x = (
            r["x"].to(dtype).view(-1, 2, D).detach().clone().requires_grad_()
        )  # sequences of 2 tokens: a row here is a token
        t = r["t"].clamp(min=0).view(-1, 2)
        loss, _ = vocab_parallel_grpo_loss(
            x,
            ws,
            t,
            torch.ones_like(t),
            r["temp"].view(-1, 2)[:, 0],
            bias=bs,
            old_logprobs=-r["temp"].view(-1, 2),
            loss_type="dapo",
            num_items=8,
            sequence_parallel=sp,
        )
        return x, [], loss

    return {"cross_entropy": ce, "logprobs": logprobs, "distillation": distill, "grpo": grpo}


def case_invariant():
    """Batch-invariant mode, vocabulary-parallel: a row alone equals the row inside a batch (other rows, other
    position, chunk_size), bitwise, for every front end, replicated and sequence-parallel tokens, fp32 and bf16
    (per-row collectives, their sums in rank order)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    starts, sizes = _split(world, uneven=True)
    lo, hi = starts[rank], starts[rank] + sizes[rank]

    def rows(n, seed):
        g = torch.Generator().manual_seed(seed)
        t = torch.randint(0, V, (n,), generator=g)
        keep = torch.randint(-1, V, (n, 4), generator=g)
        keep[:, 0] = t
        return {"x": torch.randn(n, D, generator=g), "t": t, "keep": keep, "temp": torch.rand(n, generator=g) + 0.5}

    one = rows(2, 1)  # GRPO's sequences have two tokens: the pair is the row
    n, pos = 18, 10
    batch = rows(n, 2)
    for k in batch:
        batch[k][pos : pos + 2] = one[k]
    batch["t"][0] = batch["t"][15] = -100  # padding for CE and distillation
    for dtype in (torch.float32, torch.bfloat16):
        for name, fn in _invariant_calls(lo, hi, dtype).items():
            for sp in (False, True):
                if name == "grpo" and sp:
                    continue  # GRPO's sequence-parallel form splits sequences, covered with replicated tokens
                # sequence-parallel: rank r holds rows [6r, 6r + 6) of the batch's 18 on 3 ranks ([9r, 9r + 9)
                # on 2), so the pair sits at another offset there than alone
                per = n // world
                a, z = (rank * per, (rank + 1) * per) if sp else (0, n)
                owner = pos // per  # alone, the pair is on the rank that holds it in the batch, at offset 0
                mine_one = {k: v if (not sp or rank == owner) else v[:0] for k, v in one.items()}
                mine_batch = {k: v[a:z] for k, v in batch.items()}
                with memops.batch_invariant(rows=4):
                    x1, out1, s1 = fn(mine_one, sp)
                    s1.backward()
                    xb, outb, sb = fn(mine_batch, sp)
                    sb.backward()
                res1 = [o.detach() for o in out1] + [x1.grad.view(-1, D)]
                resb = [o.detach() for o in outb] + [xb.grad.view(-1, D)]
                if sp and not (a <= pos < z):
                    continue
                at = pos - a
                for k, (p1, pb) in enumerate(zip(res1, resb)):
                    assert torch.equal(p1[:2], pb[at : at + 2]), (
                        rank,
                        name,
                        sp,
                        str(dtype),
                        k,
                        p1[:2],
                        pb[at : at + 2],
                    )


MTP_OPTIONS = [
    dict(),
    dict(reduction="sum", label_smoothing=0.2, z_loss=1e-2, depth_weights=[1.0, 0.3, 0.1], chunk_size=7),
    dict(reduction="none", softcap=3.0, logit_scale=0.7, shifts=(1, 3, 0), packed=True),
    dict(class_weight=True, num_items=17.0, label_smoothing=0.1, packed=True, chunk_size=5),
]


def case_mtp():
    """Vocabulary-parallel multi-token prediction (3 depths, uneven shards) against the single-process op in
    float64: loss, per-depth losses, the input gradient and this shard's weight and bias gradients; refused
    with sequence parallelism."""
    from memops.distributed import vocab_parallel_mtp_cross_entropy

    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(31)
    hs = torch.randn(3, 2, N // 2, D, generator=g, dtype=torch.float64)
    _, w, b, t = _data(8)
    t = t.view(2, N // 2)
    pos = torch.arange(N // 2).repeat(2, 1)
    pos[0, 7:] -= 7  # a second document from position 7 of the first sequence
    for uneven in (False, True):
        starts, sizes = _split(world, uneven)
        lo, hi = starts[rank], starts[rank] + sizes[rank]
        for opts in MTP_OPTIONS:
            opts = dict(opts)
            mine = {}
            if opts.pop("class_weight", False):
                opts["class_weight"], mine["class_weight"] = CLASS_WEIGHT, CLASS_WEIGHT[lo:hi]
            if opts.pop("packed", False):
                opts["position_ids"] = pos
            full_in = [p.clone().requires_grad_() for p in (hs, w, b)]
            loss, per_depth = memops.linear_mtp_cross_entropy(full_in[0], full_in[1], t, full_in[2], **opts)
            go = torch.randn(loss.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
            gx, gw, gb = torch.autograd.grad((loss * go).sum(), full_in)
            xs = hs.clone().requires_grad_()
            ws, bs = w[lo:hi].clone().requires_grad_(), b[lo:hi].clone().requires_grad_()
            ploss, pdepth = vocab_parallel_mtp_cross_entropy(xs, ws, t, bs, **{**opts, **mine})
            _close(ploss, loss, f"mtp loss {opts}")
            _close(pdepth, per_depth, f"mtp per-depth {opts}")
            sx, sw, sb = torch.autograd.grad((ploss * go).sum(), (xs, ws, bs))
            _close(sx, gx, f"mtp grad input {opts}")
            _close(sw, gw[lo:hi], f"mtp grad weight {opts}")
            _close(sb, gb[lo:hi], f"mtp grad bias {opts}")
    # a DTensor head (Shard(0) on a 1-D mesh) with plain hidden states: layout and group from the mesh
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    wd = distribute_tensor(w, mesh, [Shard(0)]).requires_grad_()
    xs = hs.clone().requires_grad_()
    ploss, _ = vocab_parallel_mtp_cross_entropy(xs, wd, t, label_smoothing=0.1, position_ids=pos)
    full_in = [p.clone().requires_grad_() for p in (hs, w)]
    loss, _ = memops.linear_mtp_cross_entropy(*full_in, t, label_smoothing=0.1, position_ids=pos)
    _close(ploss, loss, "mtp dtensor loss")
    ploss.backward()
    loss.backward()
    _close(xs.grad, full_in[0].grad, "mtp dtensor grad input")
    _close(wd.grad.full_tensor(), full_in[1].grad, "mtp dtensor grad weight")
    try:
        vocab_parallel_mtp_cross_entropy(hs, wd, t, sequence_parallel=True)
    except ValueError as e:
        assert "sequence_parallel=True is not offered for multi-token prediction" in str(e), e
    else:
        raise AssertionError("sequence_parallel=True was not refused (DTensor head)")
    try:
        vocab_parallel_mtp_cross_entropy(distribute_tensor(hs, mesh, [Replicate()]), wd, t)
    except ValueError as e:
        assert "takes local hiddens" in str(e), e
    else:
        raise AssertionError("DTensor hidden states were not refused")
    starts, sizes = _split(world, False)
    lo, hi = starts[rank], starts[rank] + sizes[rank]
    try:
        vocab_parallel_mtp_cross_entropy(hs, w[lo:hi], t, sequence_parallel=True)
    except ValueError as e:
        assert "sequence_parallel=True is not offered for multi-token prediction" in str(e), e
    else:
        raise AssertionError("sequence_parallel=True was not refused")


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
