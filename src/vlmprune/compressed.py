"""A compressed model directory, saved and loaded whole: pruned weights, the token method, the recipe.

``save_pretrained`` keeps the zeroed weights but knows nothing of visual-token pruning, which lives in
hooks. So the directory's config.json carries, under ``"vlmprune_pruning"``, the weight-pruning record
(as ``vlmprune prune`` writes it), the token method's SPEC under ``"tokens"`` and the recipe under
``"recipe"``; :func:`load` puts the token method back on, so the reloaded model computes what the
saved one did.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .weights.saving import pruning_record

CALIBRATION_SOURCE = "captions"


def token_spec(directory: str | Path) -> str | None:
    """The token method SPEC recorded in a saved directory (None: no token pruning, or not such a directory)."""
    record = pruning_record(directory)
    spec = record.get("tokens") if record else None
    return spec if isinstance(spec, str) and spec else None


def load(name_or_dir: str, tokens: bool = True):
    """``(model, processor)`` in float32 and eval mode, with the recorded token method attached (its
    handle is ``model.vlmprune_tokens``; ``.remove()`` takes it off). ``tokens=False`` leaves it off."""
    from . import tokens as token_api
    from .eval.loading import load_model

    model, processor = load_model(name_or_dir)
    spec = token_spec(name_or_dir) if tokens and Path(name_or_dir).is_dir() else None
    model.vlmprune_tokens = token_api.apply(model, token_api.from_spec(spec)) if spec else None
    return model, processor


def save(model, processor, out: str | Path, applied, source: str, overwrite: bool = False) -> Path:
    """Write ``model`` (pruned by ``applied``, a :class:`~vlmprune.recipes.AppliedRecipe`) and its
    processor into ``out``, recording the weight pruning, the token method and the recipe."""
    from .weights.saving import run_record, save_pruned

    weight_stage, token_stage = applied.recipe.stage("weights"), applied.recipe.stage("tokens")
    record: dict[str, Any] = {"source": source}
    if applied.report is not None:
        record = run_record(applied.report, source, weight_stage.targets, weight_stage.ignore,
                            CALIBRATION_SOURCE, applied.nsamples)
    record["tokens"] = token_stage.spec if token_stage else None
    record["recipe"] = applied.recipe.record()
    return save_pruned(model, processor, out, record, overwrite=overwrite)


def prune_to_directory(name_or_dir: str, recipe, out: str | Path, *, nsamples: int | None = None, seed: int = 0,
                       device=None, dtype=None, overwrite: bool = False):
    """``vlmprune prune --recipe``: load a model, apply the recipe's weight stage with the toy caption pool
    as calibration (``nsamples`` overrides the recipe's), and save it whole with the token stage recorded."""
    import torch

    from . import toyworld
    from .eval.loading import load_model, stored_dtype
    from .recipes import apply_recipe
    from .weights.command import dense_source

    torch.manual_seed(seed)
    model, processor = load_model(name_or_dir)
    applied = apply_recipe(model, recipe, lambda n: toyworld.calibration(processor, n=nsamples or n, seed=seed),
                           device=device, tokens=False)
    model.to(dtype or stored_dtype(name_or_dir) or model.dtype)
    save(model, processor, out, applied, dense_source(name_or_dir, model), overwrite=overwrite)
    return applied
