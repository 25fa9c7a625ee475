"""``python -m memops bench ...``: see ``memops.bench``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m memops", description="memops command line")
    sub = parser.add_subparsers(dest="command", required=True)
    from . import bench
    bench.add_arguments(sub.add_parser("bench", help="time and peak memory: memops vs unfused baselines"))
    args = parser.parse_args(argv)
    return bench.main(args)


if __name__ == "__main__":
    sys.exit(main())
