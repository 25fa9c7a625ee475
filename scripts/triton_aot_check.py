"""Compile the Triton heads' kernel variants for an sm_90 GPU (H100/H200) without one: Triton's CUDA backend lowers
each kernel to PTX on the CPU.  The interpreter runs the kernels as Python; this checks what only the
compiler sees (types, loop-carried values, constexpr branches).  Run without TRITON_INTERPRET.

    python scripts/triton_aot_check.py
"""

from __future__ import annotations

import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: the interpreter does not compile")

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from memops.ops import _triton_kernels as K

TARGET = GPUTarget("cuda", 90, 32)
# (logits block dtype, compute dtype): bf16/fp16/fp32 inputs compute in fp32, fp64 in fp64
DTYPES = [("*bf16", tl.float32), ("*fp16", tl.float32), ("*fp32", tl.float32), ("*fp64", tl.float64)]


def compile_one(fn, signature: dict, constants: dict) -> None:
    sig = dict(signature)
    sig.update({k: "constexpr" for k in constants})
    names = list(sig)
    src = ASTSource(fn, sig, {(names.index(k),): v for k, v in constants.items()})
    triton.compile(src, target=TARGET, options={"num_warps": 8})


def variants(names, fixed=None):
    """Combinations of the boolean flags ``names`` (``fixed`` set as given): none set, all set, and each one
    alone set or alone unset (every branch, each next to the others)."""
    n = len(names)
    rows = [(False,) * n, (True,) * n]
    rows += [tuple(i == j for j in range(n)) for i in range(n)]
    rows += [tuple(i != j for j in range(n)) for i in range(n)]
    for values in dict.fromkeys(rows):
        yield {**dict(zip(names, values)), **(fixed or {})}


def main() -> int:
    count = 0
    for zt, cdt in DTYPES:
        wide = zt in ("*bf16", "*fp64")  # each branch for these; none and all set for fp16 / fp32
        pick = (lambda v: v) if wide else (lambda v: [v[0], v[1]])
        pt = "*fp64" if cdt == tl.float64 else "*fp32"
        ce = dict(Z=zt, stride="i32", V="i32", P=pt, T="*i64", COEF=pt, LOSS=pt, LSE=pt, TOP1="*u8", ignore_index="i32")
        for flags in pick(
            list(
                variants(
                    ["SOFTCAP", "SMOOTH", "ZLOSS", "GRAD", "WANT_TOP1"],
                )
            )
        ):
            compile_one(K.ce_head, ce, {**flags, "RNE_BF16": zt == "*bf16", "BLOCK": 4096, "CDT": cdt})
            count += 1
        lp = dict(
            Z=zt, stride="i32", V="i32", P=pt, T="*i64", C1=pt, C2=pt, STATS=pt, LOGP=pt, ENT=pt, SQ=pt, MEAN=pt,
            TOP1="*u8",
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
            compile_one(K.logprobs_head, lp, {**flags, "RNE_BF16": False, "BLOCK": 4096, "CDT": cdt})
            count += 1
    print(f"compiled {count} kernel variants for sm_90 with triton {triton.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
