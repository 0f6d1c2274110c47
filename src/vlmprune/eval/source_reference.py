"""Retention of a saved weight-pruned model without ``--reference``: against the dense model its pruning
record names, on the same items (that dense result is cached on disk, see :mod:`.dense_cache`)."""
from __future__ import annotations

from ..errors import VlmpruneError
from ..weights.saving import pruning_record


def source_reference(name_or_dir: str, tasks: list[str], limit: int | None,
                     batch_size: int = 32) -> tuple[dict | None, str | None]:
    """``(per-task dense accuracy of the source, None)``; ``(None, why)`` for a pruned directory whose
    source cannot be evaluated; ``(None, None)`` for a model that was not saved pruned."""
    record = pruning_record(name_or_dir)
    if record is None:
        return None, None
    source = record.get("source")
    if not source:
        return None, f"{name_or_dir} does not record the model it was pruned from"
    from .harness import dense_accuracy, load_items
    from .loading import load_model

    try:
        model, processor = load_model(source)
    except VlmpruneError as exc:
        return None, f"its source model {source} cannot be loaded: {exc}"
    return dense_accuracy(model, processor, load_items(tasks, limit), limit, batch_size), None
