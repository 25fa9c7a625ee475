"""``python -m memops bench --tp N``: vocabulary-parallel cross-entropy and log-probs over N processes.

N ranks (gloo on CPU, NCCL on CUDA: one GPU per rank) each hold ``V / N`` rows of the head.  Methods, each
a forward + backward of the loss on the same inputs (fp32 unless ``--dtype``):

* ``memops_tp``: ``memops.distributed.vocab_parallel_*``, the hidden states replicated on every rank;
* ``memops_sp``: the same with ``sequence_parallel=True`` (each rank holds ``N / tp`` tokens; rows are
  gathered one chunk at a time, the next chunk's broadcasts started before the current chunk's work);
  ``memops_sp_serial`` the same without that prefetch (what overlapping buys on this backend);
* ``memops_gather_partial``: each rank's ``N / tp`` tokens all-gathered by a differentiable all-gather (its
  backward a reduce-scatter that sums the ranks' gradients: Megatron's ``gather_from_sequence_parallel_region``,
  what verl's Megatron engine does before its fused head), then ``memops_tp`` with ``input_grad="partial"``
  (``--loss logprobs`` only, even token shards);
* ``gathered``: what a user would write instead: each rank's logits ``x @ W_r.T`` (fp32), all-gathered
  into the full ``[N, V]`` logits, then ``F.cross_entropy`` / ``log_softmax`` (differentiable all-gather);
* ``single``: the single-process memops op with the whole head, on rank 0 only.

Time: median of ``--reps`` steps on rank 0 (every rank steps together).  Memory: the largest per-rank peak
above the memory before the step, less the gradients it returns (CPU: ``VmHWM`` after resetting it through
``/proc/self/clear_refs``, the ranks started with ``MALLOC_MMAP_THRESHOLD_=65536``; CUDA:
``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import time

METHODS = ("memops_tp", "memops_sp", "memops_sp_serial", "memops_gather_partial", "gathered", "single")
LOSSES = ("cross_entropy", "logprobs")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(args) -> int:
    """Start ``args.tp`` ranks of this module and print their table."""
    loss = args.loss if args.loss in LOSSES else None
    if loss is None:
        raise SystemExit(f"--tp runs --loss cross_entropy or logprobs, got {args.loss!r}")
    tokens = args.tokens or 2048
    hidden, vocab = args.hidden or 1024, args.vocab or 32000
    env = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        WORLD_SIZE=str(args.tp),
        MALLOC_MMAP_THRESHOLD_="65536",
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
    )
    spec = json.dumps(dict(loss=loss, tokens=tokens, hidden=hidden, vocab=vocab, dtype=args.dtype, reps=args.reps))
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "memops.bench.tp", spec],
            env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
            stdout=subprocess.PIPE,
            text=True,
        )
        for r in range(args.tp)
    ]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        for r, out in enumerate(outs):
            sys.stderr.write(f"rank {r}:\n{out}\n")
        return 1
    ranks = [json.loads(out.strip().splitlines()[-1]) for out in outs]
    rows: list[dict] = []
    for m in METHODS:
        if m not in ranks[0]:  # not run for this loss / token split
            continue
        peak = max(r[m]["peak_mib"] for r in ranks)
        rows.append(dict(method=m, ms=ranks[0][m]["ms"], peak_mib=peak))
    base = next(r for r in rows if r["method"] == "gathered")
    print(
        f"# --tp {args.tp}: {loss}, N={tokens} D={hidden} V={vocab} ({vocab // args.tp} rows per rank), "
        f"{args.dtype}, {ranks[0]['device']}, torch {ranks[0]['torch']}, {ranks[0]['threads']} thread(s) per rank"
    )
    print("| method | ms per step | vs gathered | peak MiB per rank (max) | vs gathered |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['method']} | {row['ms']:.1f} | {row['ms'] / base['ms']:.2f}x | {row['peak_mib']:.1f} | "
            f"{row['peak_mib'] / max(base['peak_mib'], 1e-9):.2f}x |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(tp=args.tp, loss=loss, rows=rows, ranks=ranks), f, indent=1)
    return 0


def _rank(spec: dict) -> dict:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    import memops
    from memops.bench.worker import reset_peak_rss, status_kib
    from memops.distributed import vocab_parallel_cross_entropy, vocab_parallel_logprobs
    from memops.ops import reducer as vp

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dtype = getattr(torch, spec["dtype"])
    n, d, v = spec["tokens"], spec["hidden"], spec["vocab"]
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, d, generator=g, device=device, dtype=dtype)
    w = (torch.randn(v, d, generator=g, device=device, dtype=dtype) * d**-0.5).contiguous()
    t = torch.randint(0, v, (n,), generator=g, device=device)
    sizes = [v // world + (r < v % world) for r in range(world)]
    lo = sum(sizes[:rank])
    w_r = w[lo : lo + sizes[rank]].clone()
    per = [n // world + (r < n % world) for r in range(world)]
    a = sum(per[:rank])
    layout = dict(vocab_start=lo, vocab_size=v)
    logprobs = spec["loss"] == "logprobs"
    if rank != 0:
        del w  # only rank 0 runs the single-process op

    def memops_call(xx, ww, tt, **kw):
        if logprobs:
            lp, ent = vocab_parallel_logprobs(xx, ww, tt, return_entropy=True, **layout, **kw)
            return lp.sum() + 0.1 * ent.sum()
        return vocab_parallel_cross_entropy(xx, ww, tt, **layout, **kw)

    def gather_partial(xx, ww, tt):
        import torch.distributed._functional_collectives as funcol

        gather = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd
        return memops_call(gather(xx, 0, dist.group.WORLD), ww, tt, input_grad="partial")

    def gathered(xx, ww, tt):
        import torch.distributed._functional_collectives as funcol

        z = F.linear(xx, ww).float()
        gather = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd  # torch 2.11
        full = gather(z, 1, dist.group.WORLD)
        if logprobs:
            logp = torch.log_softmax(full, dim=1)
            ent = -(logp.exp() * logp).sum(1)
            return logp.gather(1, tt[:, None]).sum() + 0.1 * ent.sum()
        return F.cross_entropy(full, tt)

    def single(xx, ww, tt):
        if logprobs:
            lp, ent = memops.linear_logprobs(xx, ww, tt, return_entropy=True)
            return lp.sum() + 0.1 * ent.sum()
        return memops.linear_cross_entropy(xx, ww, tt)

    steps = {
        "memops_tp": lambda: (x, w_r, t, {}),
        "memops_sp": lambda: (x[a : a + per[rank]], w_r, t[a : a + per[rank]], dict(sequence_parallel=True)),
        "memops_sp_serial": lambda: (x[a : a + per[rank]], w_r, t[a : a + per[rank]], dict(sequence_parallel=True)),
        "memops_gather_partial": lambda: (x[a : a + per[rank]], w_r, t, "gather_partial"),
        "gathered": lambda: (x, w_r, t, None),
        "single": lambda: (x, w if rank == 0 else None, t, "single"),
    }
    result = dict(
        device=torch.cuda.get_device_name(device) if cuda else "cpu",
        torch=torch.__version__,
        threads=torch.get_num_threads(),
    )
    for m in METHODS:
        if m == "memops_gather_partial" and (not logprobs or len(set(per)) > 1):
            continue  # reported as not run: log-probs (verl's head) with even token shards only
        xx, ww, tt, kw = steps[m]()
        vp.PREFETCH = m != "memops_sp_serial"

        def step(xx=xx, ww=ww, tt=tt, kw=kw):
            if kw == "single":
                if rank != 0:
                    return None
                xg, wg = xx.detach().requires_grad_(), ww.detach().requires_grad_()
                single(xg, wg, tt).backward()
                return xg, wg
            xg, wg = xx.detach().requires_grad_(), ww.detach().requires_grad_()
            if kw == "gather_partial":
                gather_partial(xg, wg, tt).backward()
            else:
                (gathered(xg, wg, tt) if kw is None else memops_call(xg, wg, tt, **kw)).backward()
            return xg, wg

        step()  # warm-up
        dist.barrier()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            reset_peak_rss()
            base = status_kib("VmRSS") * 1024
        out = step()
        if cuda:
            torch.cuda.synchronize()
        grads = 0 if out is None else sum(p.grad.numel() * p.grad.element_size() for p in out)
        peak = (torch.cuda.max_memory_allocated() if cuda else status_kib("VmHWM") * 1024) - base - grads
        del out
        times = []
        for _ in range(spec["reps"]):
            dist.barrier()
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        dist.barrier()
        result[m] = dict(ms=1e3 * statistics.median(times), peak_mib=max(peak, 0) / 2**20)
    vp.PREFETCH = True
    dist.destroy_process_group()
    return result


if __name__ == "__main__":
    print(json.dumps(_rank(json.loads(sys.argv[1]))), flush=True)
