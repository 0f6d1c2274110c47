"""Write a pruned model as a ``save_pretrained`` directory, all at once or not at all."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..errors import VlmpruneError

CONFIG_KEY = "vlmprune_pruning"


def save_pruned(model, processor, out: str | Path, record: dict[str, Any]) -> Path:
    """Save model and processor into ``out``, with ``record`` under ``config.json``'s
    ``"vlmprune_pruning"``. Written beside ``out`` first and renamed, so a failure leaves ``out``
    as it was; an existing ``out`` directory is replaced."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise VlmpruneError(f"--out {out} is a file: give a directory path")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    partial.chmod(0o777 & ~umask)          # mkdtemp makes it private; the result is an ordinary directory
    try:
        setattr(model.config, CONFIG_KEY, record)
        model.save_pretrained(partial)
        if processor is not None:
            processor.save_pretrained(partial)
        if out.exists():
            previous = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, previous / out.name)
            os.replace(partial, out)
            shutil.rmtree(previous, ignore_errors=True)
        else:
            os.replace(partial, out)
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
    return out


def pruning_spec(model) -> str | None:
    """The SPEC-style summary (``atv:sparsity=0.5,pattern=2:4``) of the record ``save_pruned`` wrote
    into a model's config; None for a model that was not saved pruned."""
    record = getattr(model.config, CONFIG_KEY, None)
    if not isinstance(record, dict) or not record.get("method"):
        return None
    spec = f"{record['method']}:sparsity={record.get('sparsity')}"
    return spec + (f",pattern={record['pattern']}" if record.get("pattern") else "")
