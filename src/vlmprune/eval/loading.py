"""Resolve ``--model NAME_OR_DIR``: a shipped toy model by name, or a saved directory."""
from __future__ import annotations

from pathlib import Path

from .. import toyworld
from ..errors import VlmpruneError


def load_model(name_or_dir: str):
    """``(model, processor)`` in eval mode: ``toy-large``/``toy-small`` or a ``save_pretrained`` directory
    holding both (as ``vlmprune prune`` writes)."""
    path = Path(name_or_dir)
    if not path.is_dir():
        if name_or_dir in toyworld.MODELS:
            return toyworld.load(name_or_dir)
        raise VlmpruneError(
            f"unknown model {name_or_dir!r}: give one of {', '.join(toyworld.MODELS)} or a directory "
            "written by save_pretrained")
    if not (path / "config.json").is_file():
        raise VlmpruneError(f"{name_or_dir} has no config.json: give a directory written by save_pretrained")
    from transformers import AutoModelForImageTextToText, AutoProcessor
    try:
        model = AutoModelForImageTextToText.from_pretrained(path)
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VlmpruneError(f"cannot load {name_or_dir}: {first_line}") from None
    model.eval()
    return model, processor
