"""The ``vlmprune`` command line: argument parsing only; each command lives beside its library code.

Every command module exposes ``register(subparsers)``, which adds its parser and sets
``func(args) -> int``. Only the module of the command being run is imported (most import torch,
seconds of CPU), so ``vlmprune --help`` answers at once from the one-line summaries below.

A :class:`VlmpruneError` is printed as one line and exits 2. Any other exception is a bug or an
environment problem: one line naming the exception and the file its traceback went to, exit 1;
``--debug`` prints the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Iterable

from .errors import VlmpruneError, one_line
from .progress import quiet_library_bars

# command -> (module with register(), one-line summary for the top-level help)
COMMANDS = {
    "demo": ("vlmprune.eval.demo_command", "evaluate toy-large dense, with every token method and every weight method"),
    "eval": ("vlmprune.eval.command", "accuracy per toy task, retention, FLOPs and prefill latency"),
    "prune": ("vlmprune.weights.command",
              "weight pruning (ATV, Wanda, SparseGPT, TAMP, magnitude); writes a save_pretrained directory"),
    "flops": ("vlmprune.measure.command", "FLOPs by part (vision, projector, llm, extra, total), no weights needed"),
    "viz": ("vlmprune.viz.command", "kept-token overlays, survival maps, ATV drift plots"),
    "toy": ("vlmprune.toyworld.command", "the toy world"),
    "lmms-eval": ("vlmprune.integrations.command", "lmms-eval's command line with the vlmprune model and the toy tasks"),
}


def build_parser(full: Iterable[str] = COMMANDS) -> argparse.ArgumentParser:
    """The parser with the commands in ``full`` registered with all their options; the others are listed
    by name and summary only, so their modules are not imported."""
    parser = argparse.ArgumentParser(
        prog="vlmprune",
        description="Fewer visual tokens and fewer weights for vision-language models, measured.",
    )
    parser.add_argument("--debug", action="store_true", help="print the full traceback of an unexpected error")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, summary) in COMMANDS.items():
        if name in full:
            importlib.import_module(module).register(subparsers)
        else:
            subparsers.add_parser(name, help=summary)
    return parser


def _command_in(argv: list[str]) -> str | None:
    """The command named in ``argv`` (the first word that is one), else None."""
    return next((word for word in argv if word in COMMANDS), None)


def _write_traceback() -> Path:
    """The current exception's traceback in a new file under the temp directory (or $VLMPRUNE_LOG_DIR)."""
    directory = Path(os.environ.get("VLMPRUNE_LOG_DIR", tempfile.gettempdir()))
    directory.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    handle, name = tempfile.mkstemp(prefix=f"vlmprune-{stamp}-", suffix=".log", dir=directory)
    with os.fdopen(handle, "w") as log:
        log.write(f"vlmprune {' '.join(sys.argv[1:])}\n\n{traceback.format_exc()}")
    return Path(name)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = _command_in(argv)
    parser = build_parser([command] if command is not None else [])
    args = parser.parse_args(argv)
    quiet_library_bars()
    try:
        return int(args.func(args) or 0)
    except VlmpruneError as exc:
        print(f"vlmprune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vlmprune: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place that turns any failure into one line
        if args.debug:
            raise
        where = _write_traceback()
        print(f"vlmprune: unexpected error: {one_line(exc)} (traceback in {where}; --debug prints it)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
