"""The toy tasks' test splits as on-disk datasets for lmms-eval (one Parquet file per task).

lmms-eval reads a task's items from a dataset, not from Python; the shipped task YAMLs in
``toyworld_tasks/`` point at these files (relative paths, resolved against the YAML's folder). Each row
is one test item in test-split order: ``task``, ``index``, ``question``, ``answer`` and ``options``
(empty for free-form tasks), so ``--limit N`` in lmms-eval takes the same items as ``vlmprune eval
--limit N``. The images are not stored (they would weigh 20 MB as PNG): the tasks' ``doc_to_visual``
renders item ``index`` from its seeded scene, the same pixels vlmprune's harness sees. Regenerate with
``python -m vlmprune.integrations.task_export``.
"""
from __future__ import annotations

import sys
from pathlib import Path

from . import LMMS_TASKS_DIR as TASKS_DIR


def parquet_path(task: str, directory: Path = TASKS_DIR) -> Path:
    return directory / f"toyworld_{task}.parquet"


def export(directory: Path = TASKS_DIR) -> list[Path]:
    """Write every toy task's full test split as ``toyworld_<task>.parquet`` into ``directory``."""
    import datasets

    from .. import toyworld

    features = datasets.Features({
        "index": datasets.Value("int32"), "question": datasets.Value("string"),
        "task": datasets.Value("string"), "answer": datasets.Value("string"),
        "options": datasets.Sequence(datasets.Value("string"))})
    written = []
    for task in toyworld.TASKS:
        items = toyworld.test_split(task)
        rows = {"index": list(range(len(items))), "question": [item.question for item in items],
                "task": [task] * len(items), "answer": [item.answer for item in items],
                "options": [item.options or [] for item in items]}
        path = parquet_path(task, directory)
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
        written.append(path)
    return written


if __name__ == "__main__":
    for path in export(Path(sys.argv[1]) if len(sys.argv) > 1 else TASKS_DIR):
        print(path)
