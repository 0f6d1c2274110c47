"""``vlmprune eval --compare A.json B.json``: two eval results on the same items, compared item by item.

Per task and over all tasks pooled: both accuracies with 95% Wilson intervals, the discordant counts
(b: items only A answers correctly, c: items only B does), the exact McNemar p-value and a verdict (see
:mod:`.statistics`). Both files must come from ``vlmprune eval --json`` runs that recorded per-item
outcomes, on the same tasks and the same number of items per task (the first N of each fixed split).
"""
from __future__ import annotations

import json

from ..errors import VlmpruneError
from .report import write_json
from .statistics import ALPHA, compare_outcomes, compare_pooled


def _load(path: str) -> dict:
    """An eval result whose every task records its per-item outcomes."""
    try:
        with open(path) as handle:
            result = json.load(handle)
        tasks = result["tasks"]
        entries = list(tasks.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise VlmpruneError(f"{path} is not a readable vlmprune eval --json result") from None
    if not entries:
        raise VlmpruneError(f"{path} holds no task results")
    for task, entry in entries:
        correct = entry.get("correct") if isinstance(entry, dict) else None
        if not isinstance(correct, str):
            raise VlmpruneError(f"{path} has no per-item outcomes for task {task!r}; rerun vlmprune eval --json "
                                "with this version to record them")
        if len(correct) != entry.get("n"):
            raise VlmpruneError(f"{path}: task {task!r} records {len(correct)} outcomes for n={entry.get('n')} items")
    return result


def _label(result: dict) -> str:
    return " + ".join(str(part) for part in (result.get("model"), result.get("tokens")) if part) or "?"


def compare(path_a: str, path_b: str, alpha: float = ALPHA) -> dict:
    """The paired comparison of two ``eval --json`` files: ``{"a", "b", "alpha", "tasks", "pooled"}``.

    ``a`` and ``b`` name each file and what it measured; ``tasks`` maps each task (in A's order) and
    ``pooled`` holds all items together, each as :func:`.statistics.compare_outcomes` returns it."""
    result_a, result_b = _load(path_a), _load(path_b)
    tasks_a, tasks_b = result_a["tasks"], result_b["tasks"]
    if set(tasks_a) != set(tasks_b):
        raise VlmpruneError(f"--compare needs the same tasks: {path_a} has {', '.join(tasks_a)}; "
                            f"{path_b} has {', '.join(tasks_b)}")
    for task in tasks_a:
        if tasks_a[task]["n"] != tasks_b[task]["n"]:
            raise VlmpruneError(f"--compare needs the same items: task {task!r} has {tasks_a[task]['n']} items in "
                                f"{path_a} and {tasks_b[task]['n']} in {path_b}; rerun both with the same --limit")
    names = list(tasks_a)
    outcomes_a = {task: tasks_a[task]["correct"] for task in names}
    outcomes_b = {task: tasks_b[task]["correct"] for task in names}
    return {
        "a": {"path": str(path_a), "label": _label(result_a)},
        "b": {"path": str(path_b), "label": _label(result_b)},
        "alpha": alpha,
        "tasks": {task: compare_outcomes(outcomes_a[task], outcomes_b[task], alpha) for task in names},
        "pooled": compare_pooled(outcomes_a, outcomes_b, names, alpha),
    }


def _accuracy_cell(accuracy: float, interval: list[float]) -> str:
    return f"{100 * accuracy:.1f} [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"


def markdown(comparison: dict) -> str:
    """The comparison as a Markdown table (readable as plain text too), one row per task and a pooled row."""
    rows = [*comparison["tasks"].items(), ("all tasks (pooled)", comparison["pooled"])]
    lines = [f"A: {comparison['a']['label']} ({comparison['a']['path']})",
             f"B: {comparison['b']['label']} ({comparison['b']['path']})",
             "",
             f"Accuracy in % [95% Wilson interval]; b: items only A answers correctly, c: items only B does; "
             f"exact two-sided McNemar test on those, verdict at p < {comparison['alpha']:g} (per task, not "
             "corrected for multiple testing).",
             "",
             "| task | n | A % | B % | b | c | verdict |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {task} | {row['n']} | {_accuracy_cell(row['accuracy_a'], row['interval_a'])} | "
              f"{_accuracy_cell(row['accuracy_b'], row['interval_b'])} | {row['b']} | {row['c']} | {row['verdict']} |"
              for task, row in rows]
    return "\n".join(lines) + "\n"


def run_compare(path_a: str, path_b: str, json_out: str | None) -> int:
    """Print the comparison of two eval results, write it as JSON to ``json_out`` if given; exit code 0."""
    comparison = compare(path_a, path_b)
    if json_out:
        write_json(json_out, comparison)
    print(markdown(comparison), end="")
    return 0
