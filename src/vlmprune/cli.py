"""The ``vlmprune`` command line: argument parsing only; each command lives beside its library code.

Every command module exposes ``register(subparsers)``, which adds its parser and sets
``func(args) -> int``. A :class:`VlmpruneError` is printed as one line and exits 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import VlmpruneError

COMMAND_MODULES = (
    "vlmprune.eval.demo_command",
    "vlmprune.eval.command",
    "vlmprune.weights.command",
    "vlmprune.measure.command",
    "vlmprune.viz.command",
    "vlmprune.toyworld.command",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlmprune",
        description="Fewer visual tokens and fewer weights for vision-language models, measured.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except VlmpruneError as exc:
        print(f"vlmprune: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
