"""``vlmprune demo``: the toy-large report with every token and weight method."""
from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="evaluate toy-large dense, with every token method and every weight method",
        description="Write report.md, results.json and plots comparing every method on the toy world.")
    parser.add_argument("--out", default="demo-report", metavar="DIR", help="output directory (default: demo-report)")
    parser.add_argument("--quick", action="store_true", help="fewer items and methods: a few minutes on a laptop")
    parser.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from ..errors import VlmpruneError
    from .demo import run_demo

    if Path(args.out).is_file():
        raise VlmpruneError(f"--out {args.out} is a file: give a directory for the report")
    run_demo(args.out, quick=args.quick)
    return 0
