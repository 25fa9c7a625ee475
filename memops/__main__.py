"""``python -m memops bench ...`` (see ``memops.bench``), ``doctor``, ``train-demo``, ``models``, ``schemas``,
``traffic``."""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m memops", description="memops command line")
    sub = parser.add_subparsers(dest="command", required=True)
    from . import bench

    bench.add_arguments(sub.add_parser("bench", help="time and peak memory: memops vs unfused baselines"))
    from . import train_demo

    train_demo.add_arguments(
        sub.add_parser(
            "train-demo",
            help="train a small Llama unpatched and patched: loss parity, step time, peak memory (needs memops[hf])",
        )
    )
    from . import doctor

    doctor.add_arguments(
        sub.add_parser(
            "doctor",
            help="versions, the kernels and chunk plan memops picks here, a self-test of every family against "
            "float64 and a speed probe; paste its output into a bug report",
        )
    )
    models = sub.add_parser(
        "models", help="every installed transformers causal-LM type: verified, refused or unbuildable, and why"
    )
    models.add_argument("--json", metavar="FILE", help="also write the list as JSON")
    sub.add_parser("schemas", help="print every op's schema (forward and backward), one per line")
    sub.add_parser(
        "traffic",
        help="bytes per logit each chunk head moves, torch heads vs Triton heads (measured on CPU: "
        "meta tensors and the Triton interpreter)",
    )
    args = parser.parse_args(argv)
    if args.command == "traffic":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
        from .bench import traffic

        print(traffic.table())
        return 0
    if args.command == "models":
        from .integrations.hf import models as hf_models

        return hf_models.main(args)
    if args.command == "schemas":
        from .contract import schemas

        print("\n".join(schemas()))
        return 0
    if args.command == "doctor":
        return doctor.main(args)
    if args.command == "train-demo":
        return train_demo.main(args)
    return bench.main(args)


if __name__ == "__main__":
    sys.exit(main())
