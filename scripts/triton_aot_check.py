"""Compile the Triton heads' kernel variants for Hopper (sm_90: H100/H200), and Blackwell (sm_100) where this
Triton can target it, without a GPU, as the JIT compiles them at run time: the same constexpr flags the
launchers pass (``RNE_BF16=False``: compiled kernels round bf16 stores themselves), and the divisibility hints
the JIT adds (16-byte-aligned pointers; ``stride`` and ``V`` divisible by 16, as for every common vocabulary),
the launchers' options (``triton_heads.LAUNCH_CONFIGS``).  Registers and spill bytes are read from Triton's own
ptxas run (its flags, its cubin), with the resulting occupancy per variant.  Exits non-zero on any spill.
Run without TRITON_INTERPRET.

    python scripts/triton_aot_check.py             # every variant at the default launch configuration
    python scripts/triton_aot_check.py --configs   # and every configuration in LAUNCH_CONFIGS (a table)
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import types

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: the interpreter does not compile")
# a fresh compile cache: a cached kernel would skip ptxas, whose log this check reads
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="memops-aot-")

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia import compiler as nvidia_compiler
from triton.compiler import ASTSource

from memops.ops import _triton_kernels as K
from memops.ops.triton_heads import FP64_BLOCK, LAUNCH_CONFIGS

# (logits block dtype, compute dtype): bf16/fp16/fp32 inputs compute in fp32, fp64 in fp64
DTYPES = [("*bf16", tl.float32), ("*fp16", tl.float32), ("*fp32", tl.float32), ("*fp64", tl.float64)]
REGISTERS_PER_SM = 65536


class _PtxasLog:
    """Triton's own ptxas run (its flags: ``-lineinfo``, ``--regAllocOptLevel=2`` in newer releases, ...) with
    ``-v``: its log is read back from the file Triton hands it as stderr, so registers and spills are those of
    the cubin Triton builds, not of a ptxas call with other options."""

    def __init__(self):
        self.logs: list[str] = []
        real = subprocess.run

        def run(cmd, *args, **kwargs):
            result = real(cmd, *args, **kwargs)
            err = kwargs.get("stderr")
            if "ptxas" in os.path.basename(str(cmd[0])) and hasattr(err, "name"):
                err.flush()
                with open(err.name) as f:
                    self.logs.append(f.read())
            return result

        nvidia_compiler.subprocess = types.SimpleNamespace(**{**vars(subprocess), "run": run})


PTXAS = None


def compile_one(fn, signature: dict, constants: dict, arch: int, warps: int, stages: int, maxnreg: int) -> dict:
    """One variant compiled as the JIT compiles it: ``{"registers", "spill_bytes", "occupancy"}``."""
    global PTXAS
    PTXAS = PTXAS or _PtxasLog()
    names = list(fn.arg_names)  # the kernel's parameter order
    sig = {k: "constexpr" if k in constants else signature[k] for k in names}
    # the JIT's specialization: pointers 16-byte aligned, stride and V multiples of 16
    hinted = [i for i, k in enumerate(names) if sig[k].startswith("*") or k in ("stride", "V")]
    attrs = {(i,): [["tt.divisibility", 16]] for i in hinted}
    src = ASTSource(fn, sig, {(names.index(k),): v for k, v in constants.items()}, attrs)
    PTXAS.logs.clear()
    options = {"num_warps": warps, "num_stages": stages, "maxnreg": maxnreg}
    triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    if len(PTXAS.logs) != 1:
        raise RuntimeError(f"expected one ptxas log from triton.compile, got {len(PTXAS.logs)}")
    info = PTXAS.logs[0]
    regs = int(re.search(r"Used (\d+) registers", info).group(1))
    spills = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", info))
    threads = warps * 32
    return {"registers": regs, "spill_bytes": spills, "occupancy": REGISTERS_PER_SM // max(regs * threads, 1)}


def variants(names, fixed=None):
    """Combinations of the boolean flags ``names`` (``fixed`` set as given): none set, all set, and each one
    alone set or alone unset (every branch, each next to the others)."""
    n = len(names)
    rows = [(False,) * n, (True,) * n]
    rows += [tuple(i == j for j in range(n)) for i in range(n)]
    rows += [tuple(i != j for j in range(n)) for i in range(n)]
    for values in dict.fromkeys(rows):
        yield {**dict(zip(names, values)), **(fixed or {})}


def kernels():
    """``(name, kernel, signature, flags)`` of every variant the launchers use."""
    for zt, cdt in DTYPES:
        wide = zt in ("*bf16", "*fp64")  # each branch for these; none and all set for fp16 / fp32
        pick = (lambda v: v) if wide else (lambda v: [v[0], v[1]])
        pt = "*fp64" if cdt == tl.float64 else "*fp32"
        options = {f"{o}_{part}": "fp32" for o in ("scale", "cap", "eps", "zl") for part in ("hi", "lo")}
        ce = dict(Z=zt, stride="i32", V="i32", **options, T="*i64", COEF=pt, LOSS=pt, LSE=pt, TOP1="*u8",
                  ignore_index="i32")  # fmt: skip
        for flags in pick(list(variants(["SOFTCAP", "SMOOTH", "ZLOSS", "GRAD", "WANT_TOP1"]))):
            yield f"ce_head {zt[1:]}", K.ce_head, ce, {**flags, "CDT": cdt}
        options = {f"{o}_{part}": "fp32" for o in ("scale", "cap", "post") for part in ("hi", "lo")}
        lp = dict(
            Z=zt, stride="i32", V="i32", **options, T="*i64", C1=pt, C2=pt, STATS=pt, LOGP=pt, ENT=pt, SQ=pt,
            MEAN=pt, TOP1="*u8",
        )  # fmt: skip
        outputs = ["SOFTCAP", "ENTROPY", "SQUARES", "SUM", "WANT_TOP1"]
        grads = ["SOFTCAP", "ENTROPY", "HAS_C1", "HAS_C2"]
        launches = [  # the launcher's three kinds: forward only (saving statistics or not), fused, gradient only
            *pick(list(variants(outputs + ["SAVE"], dict(FORWARD=True, GRAD=False, HAS_C1=False, HAS_C2=False)))),
            *pick(list(variants(grads, dict(FORWARD=True, GRAD=True, SQUARES=True, SUM=True, WANT_TOP1=True,
                                            SAVE=False), ))),
            *pick(list(variants(grads, dict(FORWARD=False, GRAD=True, SQUARES=False, SUM=False, WANT_TOP1=False,
                                            SAVE=False), ))),
        ]  # fmt: skip
        for flags in launches:
            if flags["GRAD"] and not (flags["HAS_C1"] or flags["HAS_C2"]):
                continue  # the launcher never asks for a gradient without a coefficient
            yield f"logprobs_head {zt[1:]}", K.logprobs_head, lp, {**flags, "CDT": cdt}


_KERNELS = list(kernels())


def _compile_job(job) -> dict:
    """One entry of ``main``'s job list compiled (in a pool worker)."""
    arch, index, constants, cfg = job
    _, fn, sig, _ = _KERNELS[index]
    return compile_one(fn, sig, constants, arch, cfg.warps, cfg.stages, cfg.maxnreg)


def spill_probe() -> int:
    """Spill bytes of a kernel that does spill (fp64 cross-entropy, every option, a 16384 tile, 16 warps:
    more live values than 128 registers hold): shows the spill count is read, not assumed zero."""
    for name, fn, sig, flags in _KERNELS:
        if name == "ce_head fp64" and all(v for k, v in flags.items() if k != "CDT"):
            return compile_one(fn, sig, {**flags, "RNE_BF16": False, "BLOCK": 16384}, 90, 16, 3, 128)["spill_bytes"]
    raise LookupError("no fp64 ce_head variant with every option")


def main() -> int:
    if "--spill-probe" in sys.argv:
        print(f"spill probe: {spill_probe()} bytes")
        return 0
    every_config = "--configs" in sys.argv
    table = "--table" in sys.argv or every_config
    archs = [90]
    try:  # Blackwell, where this Triton and its ptxas target it
        _, fn, sig, flags = _KERNELS[0]
        compile_one(fn, sig, {**flags, "RNE_BF16": False, "BLOCK": 1024}, 100, 4, 3, 255)
        archs.append(100)
    except Exception as exc:  # noqa: BLE001 - any failure means: not targetable here
        print(f"sm_100: not compiled ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
    jobs, done = [], set()
    for arch in archs:
        seen = set()
        for index, (name, _, _, flags) in enumerate(_KERNELS):
            configs = LAUNCH_CONFIGS[:1]
            if every_config:  # each kernel and dtype's all-off and all-on variants at every configuration
                first = name not in seen
                seen.add(name)
                if first or all(v for k, v in flags.items() if k != "CDT"):
                    configs = LAUNCH_CONFIGS
            for cfg in configs:
                block = min(cfg.block, FP64_BLOCK) if flags["CDT"] == tl.float64 else cfg.block
                constants = {**flags, "RNE_BF16": False, "BLOCK": block}
                launch = (arch, name, tuple(constants.items()), cfg.warps, cfg.stages)
                if launch in done:  # the same kernel as another configuration gives (fp64's narrower tile)
                    continue
                done.add(launch)
                jobs.append((arch, index, constants, dataclasses.replace(cfg, block=block)))
    # one compile per core (Triton's passes and ptxas are single-threaded); fresh interpreters, not forks of
    # one that has already run Triton's compiler
    with multiprocessing.get_context("spawn").Pool(min(os.cpu_count() or 1, len(jobs))) as pool:
        results = pool.map(_compile_job, jobs, chunksize=1)
    count, spilled, worst = len(jobs), [], {}
    for (arch, index, _, cfg), r in zip(jobs, results, strict=True):
        name, _, _, flags = _KERNELS[index]
        key = (arch, name, cfg)
        if r["registers"] > worst.get(key, {"registers": -1})["registers"]:
            worst[key] = r
        if r["spill_bytes"]:
            spilled.append((arch, name, cfg, flags, r))
    print(
        f"compiled {count} kernel variants for sm_{', sm_'.join(map(str, archs))} with triton {triton.__version__} "
        f"({'every launch configuration' if every_config else f'launch configuration {LAUNCH_CONFIGS[0]}'}): "
        f"{len(spilled)} with spills"
    )
    if table or spilled:
        print("arch   kernel                 BLOCK warps stages  max registers  spill bytes  blocks/SM")
        for (arch, name, cfg), r in sorted(worst.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2].block)):
            print(
                f"sm_{arch} {name:22s} {cfg.block:5d} {cfg.warps:5d} {cfg.stages:6d}  {r['registers']:13d}  "
                f"{r['spill_bytes']:11d}  {r['occupancy']:9d}"
            )
    for arch, name, cfg, flags, r in spilled:
        print(f"SPILL sm_{arch} {name} {cfg} {flags}: {r}")
    return 1 if spilled else 0


if __name__ == "__main__":
    sys.exit(main())
