"""``vlmprune demo``: the toy-large report with every token and weight method."""
from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="evaluate toy-large dense, with every token method and every weight method",
        description="Write report.md, results.json and plots comparing every method on the toy world. "
                    "Each finished run is kept in DIR/rows.jsonl; a method that fails is reported, its "
                    "traceback written to DIR/errors.log, and the command exits 1 after the others finish.")
    parser.add_argument("--out", default="demo-report", metavar="DIR", help="output directory (default: demo-report)")
    parser.add_argument("--quick", action="store_true", help="fewer items and methods: a few minutes on a laptop")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs DIR/rows.jsonl records as finished with the same settings; "
                             "run the rest (failed ones again)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into DIR even though it holds files vlmprune did not write")
    parser.set_defaults(func=run)


def run(args) -> int:
    import sys
    from pathlib import Path

    from ..outputs import check_output, mark_output
    from .demo import run_demo
    from .rows import ERRORS

    check_output(args.out, args.overwrite)      # a file, or the user's own files, are never written over
    mark_output(args.out)
    results = run_demo(args.out, quick=args.quick, resume=args.resume)
    failed = [row for row in results["rows"] if row["error"] is not None]
    for row in failed:
        print(f"vlmprune: demo: {row['label']} failed: {row['error']} (traceback in {Path(args.out) / ERRORS})",
              file=sys.stderr)
    return 1 if failed else 0
