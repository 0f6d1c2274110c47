"""The row journal behind ``demo --resume``: what is kept, what runs again, what a failure records."""
from __future__ import annotations

import json

import pytest

from vlmprune.eval.rows import RowLog, write_errors


def _work(calls, value):
    def work():
        calls.append(value)
        return {"value": value, "pair": (1, 2)}
    return work


def test_resume_keeps_finished_rows_with_the_same_settings(tmp_path):
    calls = []
    log = RowLog(tmp_path)
    fresh = log.run("a", {"limit": (2, 3)}, _work(calls, 1), label="a")
    log.run("b", {"limit": (2, 3)}, _work(calls, 2))
    resumed = RowLog(tmp_path, resume=True)
    again = resumed.run("a", {"limit": (2, 3)}, _work(calls, 9), label="a")
    assert calls == [1, 2] and again == fresh and again["result"] == {"value": 1, "pair": [1, 2]}
    assert resumed.run("b", {"limit": 4}, _work(calls, 3))["result"]["value"] == 3   # other settings: runs
    assert RowLog(tmp_path, resume=True).finished("b", {"limit": 4})["result"]["value"] == 3


def test_a_failure_is_recorded_with_its_traceback_and_retried(tmp_path):
    def broken():
        raise ValueError("bad\nmore")

    row = RowLog(tmp_path).run("a", {}, broken)
    assert row["result"] is None and row["error"] == "ValueError: bad"
    assert "in broken" in row["traceback"] and row["traceback"].endswith("ValueError: bad\nmore\n")
    assert json.loads((tmp_path / "rows.jsonl").read_text())["error"] == "ValueError: bad"
    assert write_errors(tmp_path, [row]).read_text() == f"== a\n{row['traceback']}\n"
    calls = []
    assert RowLog(tmp_path, resume=True).run("a", {}, _work(calls, 1))["error"] is None and calls == [1]
    assert write_errors(tmp_path, []) is None and not (tmp_path / "errors.log").exists()


def test_an_interrupted_row_records_nothing_and_a_cut_line_is_skipped(tmp_path):
    log = RowLog(tmp_path)
    log.run("a", {}, _work([], 1))

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        log.run("b", {}, interrupted)
    with (tmp_path / "rows.jsonl").open("a") as handle:
        handle.write('{"key": "b", "sett')                       # killed while writing
    resumed = RowLog(tmp_path, resume=True)
    assert resumed.finished("a", {}) is not None and resumed.finished("b", {}) is None


def test_without_resume_the_journal_starts_afresh(tmp_path):
    RowLog(tmp_path).run("a", {}, _work([], 1))
    RowLog(tmp_path)
    assert (tmp_path / "rows.jsonl").read_text() == ""
    assert RowLog(tmp_path, resume=True).finished("a", {}) is None
