"""Resolve ``--model NAME_OR_DIR``: a shipped toy model by name, or a saved directory.

Models are loaded in float32 whatever their stored dtype: on the CPU, half-precision kernels make the
toy eval an order of magnitude slower. :func:`stored_dtype` says what the weights were stored in, so a
pruned copy can be saved the same way.
"""
from __future__ import annotations

import json
from pathlib import Path

from .. import toyworld
from ..errors import VlmpruneError
from ..preflight import check_model


def model_dir(name_or_dir: str) -> Path:
    """The ``save_pretrained`` directory behind ``toy-large``/``toy-small`` or a directory path."""
    check_model(name_or_dir)
    path = Path(name_or_dir)
    return path if path.is_dir() else toyworld.checkpoint_dir(name_or_dir)


def load_model(name_or_dir: str):
    """``(model, processor)`` in float32 and eval mode: ``toy-large``/``toy-small`` or a ``save_pretrained``
    directory holding both (as ``vlmprune prune`` writes)."""
    path = model_dir(name_or_dir)
    if not Path(name_or_dir).is_dir():
        return toyworld.load(name_or_dir)
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VlmpruneError(f"cannot load {name_or_dir}: {first_line}") from None
    model.eval()
    return model, processor


def stored_dtype(name_or_dir: str):
    """The floating dtype the model's weights are stored in (config.json's ``dtype``), or None if unsaid."""
    import torch

    config = json.loads((model_dir(name_or_dir) / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None
