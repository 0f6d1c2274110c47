"""Bridges to other tools, above the engines: lmms-eval (a model and the toy tasks) and export for serving.

Nothing here is imported by ``import vlmprune``; each bridge loads its tool only when used, from the
optional extras ``[lmms]`` and ``[export]``.
"""
from __future__ import annotations

from pathlib import Path

LMMS_TASKS_DIR = Path(__file__).resolve().parent / "toyworld_tasks"


def lmms_eval_manifest():
    """The ``lmms_eval.models`` entry point: registers the model ``vlmprune`` without importing it (lmms-eval
    imports :class:`vlmprune.integrations.lmms_eval.VlmpruneLMM` when a run asks for it)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="vlmprune", simple_class_path="vlmprune.integrations.lmms_eval.VlmpruneLMM")
