"""Write a pruned model as a ``save_pretrained`` directory that records how it was pruned."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..outputs import output_directory

CONFIG_KEY = "vlmprune_pruning"


def save_pruned(model, processor, out: str | Path, record: dict[str, Any], overwrite: bool = False) -> Path:
    """Save model and processor into ``out``, with ``record`` under ``config.json``'s
    ``"vlmprune_pruning"``, all at once or not at all (see :func:`vlmprune.outputs.output_directory`:
    a directory vlmprune did not write is refused unless ``overwrite``)."""
    with output_directory(out, overwrite=overwrite) as partial:
        setattr(model.config, CONFIG_KEY, record)
        model.save_pretrained(partial)
        if processor is not None:
            processor.save_pretrained(partial)
    return Path(out)


def run_record(report, source: str, targets, ignore, calibration_source: str, nsamples: int) -> dict[str, Any]:
    """The record of one pruning run (a :class:`~vlmprune.weights.sequential.PruneReport`): the method's
    settings, what was pruned with which calibration, and what it measured."""
    return {**report.method, "source": source,
            "targets": targets or "every Linear of the LLM decoder layers", "ignore": ignore or [],
            "calibration": calibration_source if nsamples else None, "nsamples": nsamples,
            "measured_sparsity": round(report.sparsity, 6), "pruned_layers": len(report.layer_sparsity),
            "seconds": round(report.total_seconds, 2)}


def pruning_record(directory: str | Path) -> dict[str, Any] | None:
    """The record ``save_pruned`` wrote into ``directory``'s config.json, read without loading the model;
    None for anything else (a model name, a dense directory, no readable config)."""
    try:
        record = json.loads((Path(directory) / "config.json").read_text()).get(CONFIG_KEY)
    except (OSError, ValueError, AttributeError):
        return None
    return record if isinstance(record, dict) else None


def pruning_spec(model) -> str | None:
    """The SPEC-style summary (``atv:sparsity=0.5,pattern=2:4``) of the record ``save_pruned`` wrote
    into a model's config; None for a model that was not saved pruned."""
    record = getattr(model.config, CONFIG_KEY, None)
    if not isinstance(record, dict) or not record.get("method"):
        return None
    spec = f"{record['method']}:sparsity={record.get('sparsity')}"
    return spec + (f",pattern={record['pattern']}" if record.get("pattern") else "")
