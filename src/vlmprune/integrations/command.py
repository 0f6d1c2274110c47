"""``vlmprune lmms-eval ARGS``: lmms-eval's own command line, with the shipped toy tasks on its task path.

lmms-eval already finds the ``vlmprune`` model through its entry point; what it cannot find by itself
is the toy tasks' folder, so this adds ``--include_path`` with it (unless given) and hands every
argument, unchanged, to lmms-eval's CLI. ``lmms-eval ... --include_path <folder>`` is the same run.

The exit status is lmms-eval's own, and lmms-eval 0.7.3 exits 0 after an exception during evaluation
(it logs "Error during evaluation" and writes no results): read its log, or pass ``--verbosity DEBUG``
to have it raise.
"""
from __future__ import annotations

import argparse
import sys

from ..errors import VlmpruneError


def register(subparsers) -> None:
    # No option prefix of its own, so that every word after the command, --help included, is lmms-eval's.
    parser = subparsers.add_parser(
        "lmms-eval", add_help=False, prefix_chars="\0", help="lmms-eval's command line with the vlmprune model and the toy tasks",
        description="Every argument goes to lmms-eval (its --help lists them); the toy tasks' folder is added "
                    "as --include_path.")
    parser.add_argument("arguments", nargs=argparse.REMAINDER)
    parser.set_defaults(func=run)


def lmms_eval_argv(arguments: list[str]) -> list[str]:
    """``arguments`` with ``--include_path`` naming the shipped toy tasks when none is given."""
    from . import LMMS_TASKS_DIR

    given = any(word == "--include_path" or word.startswith("--include_path=") for word in arguments)
    return list(arguments) if given or not arguments else [*arguments, "--include_path", str(LMMS_TASKS_DIR)]


def run(args) -> int:
    try:
        from lmms_eval.cli.dispatch import main as lmms_eval_main
    except ImportError:
        raise VlmpruneError("lmms-eval is not installed: pip install 'vlmprune[lmms]'") from None
    sys.argv = ["lmms-eval", *lmms_eval_argv(args.arguments)]
    try:
        lmms_eval_main()
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    return 0
