"""Results as a Markdown table and as JSON files written whole or not at all."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence


def _percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.1f}"


def _flops(count: int | None) -> str:
    return "-" if count is None else f"{count / 1e9:.3g}"


def markdown_table(rows: Sequence[dict]) -> str:
    """One line per row. A row is ``{"label", "result"}`` (an eval result) or ``{"label", "error"}``.

    Accuracies in %, retention in %, total FLOPs in GFLOPs, prefill latency in ms."""
    tasks: list[str] = []
    for row in rows:
        for task in (row.get("result") or {}).get("tasks", {}):
            if task not in tasks:
                tasks.append(task)
    header = ["method", *tasks, "average", "retention %", "GFLOPs", "prefill ms"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        result = row.get("result")
        if result is None:
            cells = [row["label"], f"failed: {row.get('error', 'unknown error')}"] + [""] * (len(header) - 2)
        else:
            retention = result.get("retention")
            prefill = result.get("prefill_ms")
            cells = [
                row["label"],
                *(_percent(result["tasks"][t]["accuracy"]) if t in result["tasks"] else "-" for t in tasks),
                _percent(result["average"]),
                "-" if retention is None else f"{retention:.1f}",
                _flops((result.get("flops") or {}).get("total")),
                "-" if prefill is None else f"{prefill:.1f}",
            ]
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write through a temporary file and rename, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def write_json(path: str | os.PathLike, data) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")
