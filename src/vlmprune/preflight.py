"""Command-line checks that need neither torch nor a model, run before either loads.

Importing the library costs about ten seconds of CPU (torch, transformers, every model class), so a
mistyped method name or task found only after those imports keeps the user waiting for a one-line
error. The names the command line accepts (token and weight methods with their settings, toy models,
toy tasks) are recorded in ``catalogue.json``, written from the live registries by
``python -m vlmprune.preflight --write``; a test keeps the file equal to the registries. What only the
method itself can judge (a setting's value) is still checked when the method is built.

This module imports nothing heavy at module level; only :func:`live_catalogue` loads the library.
"""
from __future__ import annotations

import functools
import inspect
import json
import sys
from pathlib import Path

from .errors import VlmpruneError
from .spec import check_known, parse_spec

CATALOGUE = Path(__file__).with_name("catalogue.json")


@functools.lru_cache(maxsize=None)
def catalogue() -> dict:
    """``{"tokens": {name: [settings]}, "weights": {...}, "models": [...], "tasks": [...]}``."""
    return json.loads(CATALOGUE.read_text())


def check_spec(spec: str, kind: str) -> None:
    """Raise the one-line SpecError that building ``spec`` would raise for a bad name or setting key;
    ``kind`` is ``"tokens"`` or ``"weights"``."""
    name, settings = parse_spec(spec)
    check_known(name, settings, catalogue()[kind], "token method" if kind == "tokens" else "weight method")


def check_model(name_or_dir: str) -> None:
    """A shipped toy model's name or a directory holding a ``config.json``."""
    path = Path(name_or_dir)
    if not path.is_dir():
        if name_or_dir in catalogue()["models"]:
            return
        raise VlmpruneError(
            f"unknown model {name_or_dir!r}: give one of {', '.join(catalogue()['models'])} or a directory "
            "written by save_pretrained")
    if not (path / "config.json").is_file():
        raise VlmpruneError(f"{name_or_dir} has no config.json: give a directory written by save_pretrained")


def check_tasks(tasks: str | None) -> list[str]:
    """The toy task names in a comma-separated ``--tasks`` (all of them for ``None``)."""
    known = catalogue()["tasks"]
    if tasks is None:
        return list(known)
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    unknown = [t for t in names if t not in known]
    if unknown or not names:
        raise VlmpruneError(
            f"unknown task {unknown[0] if unknown else '(none given)'!r}; choose from: {', '.join(known)}")
    return names


def check_at_least(value: int | None, minimum: int, option: str) -> None:
    """``--limit``, ``--batch-size`` and the like: an integer option with a lower bound (None passes)."""
    if value is not None and value < minimum:
        raise VlmpruneError(f"{option} must be at least {minimum}, got {value}")


def _settings(factory) -> list[str] | None:
    """Constructor keywords of a method class, or None when it takes ``**kwargs`` (anything goes)."""
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return [name for name, p in params.items() if name != "self" and p.kind is not inspect.Parameter.VAR_POSITIONAL]


def live_catalogue() -> dict:
    """The catalogue as the installed library defines it (loads torch and every method)."""
    from . import toyworld
    from .tokens.methods import REGISTRY as TOKENS
    from .weights import REGISTRY as WEIGHTS

    return {"tokens": {name: _settings(cls) for name, cls in sorted(TOKENS.items())},
            "weights": {name: _settings(cls) for name, cls in sorted(WEIGHTS.items())},
            "models": list(toyworld.MODELS), "tasks": list(toyworld.TASKS)}


def main(argv: list[str] | None = None) -> int:
    """``python -m vlmprune.preflight --write`` rewrites catalogue.json; without it, checks it is current."""
    argv = sys.argv[1:] if argv is None else argv
    live = live_catalogue()
    if argv == ["--write"]:
        CATALOGUE.write_text(json.dumps(live, indent=1) + "\n")
        print(f"wrote {CATALOGUE}")
        return 0
    if json.loads(CATALOGUE.read_text()) != live:
        print(f"{CATALOGUE} is out of date: run python -m vlmprune.preflight --write", file=sys.stderr)
        return 1
    print(f"{CATALOGUE} is current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
