"""A sweep's rows journaled one JSON line each as they finish, so an interrupted sweep loses at most the
row it was running and ``--resume`` picks up where it stopped.

A row that raises is recorded with its one-line error and its traceback instead of stopping the sweep;
the tracebacks go to ``errors.log`` beside the report, and a failed row is run again on resume.
"""
from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path
from typing import Callable

from ..errors import one_line
from .report import write_text

ROWS = "rows.jsonl"
ERRORS = "errors.log"


def _as_json(value):
    """``value`` as it reads back from JSON (tuples become lists), so resumed and fresh rows compare equal."""
    return json.loads(json.dumps(value))


def _read(path: Path) -> dict[str, dict]:
    """The last recorded row of each key; a line cut short by a kill is skipped."""
    rows: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
                rows[row["key"]] = row
            except (ValueError, KeyError, TypeError):
                continue
    return rows


class RowLog:
    """``OUT/rows.jsonl``: started afresh, or with ``resume`` read for the rows already finished."""

    def __init__(self, directory: str | os.PathLike, resume: bool = False):
        self.path = Path(directory) / ROWS
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._done = _read(self.path) if resume else {}
        if not resume:
            self.path.write_text("")

    def finished(self, key: str, settings: dict) -> dict | None:
        """The row recorded for ``key`` with these settings, unless it failed."""
        row = self._done.get(key)
        if row is None or row.get("settings") != _as_json(settings) or row.get("error") is not None:
            return None
        return row

    def run(self, key: str, settings: dict, work: Callable[[], dict], **fields) -> dict:
        """The finished row for ``key`` and ``settings`` if there is one, else ``work()`` run now and recorded.

        ``fields`` (e.g. kind, label) are stored in the row. KeyboardInterrupt records nothing."""
        row = self.finished(key, settings)
        if row is not None:
            return row
        start = time.perf_counter()
        try:
            result, error, trace = work(), None, None
        except Exception as exc:  # a failing row is recorded, not the end of the sweep
            result, error, trace = None, one_line(exc), traceback.format_exc()
        row = _as_json({"key": key, "settings": settings, **fields, "result": result, "error": error,
                        "traceback": trace, "seconds": round(time.perf_counter() - start, 2)})
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self._done[key] = row
        return row


def write_errors(directory: str | os.PathLike, rows: list[dict]) -> Path | None:
    """The full traceback of each failed row in ``directory/errors.log``; with none, no file (a stale one is
    removed, so the file always belongs to the report beside it)."""
    path = Path(directory) / ERRORS
    failed = [row for row in rows if row.get("error") is not None]
    if not failed:
        path.unlink(missing_ok=True)
        return None
    write_text(path, "".join(f"== {row['key']}\n{row.get('traceback') or row['error']}\n" for row in failed))
    return path
