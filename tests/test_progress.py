"""Progress reporting: a line per finished unit with the time left when the output is not a terminal."""
from __future__ import annotations

import io

from vlmprune import progress as progress_module
from vlmprune.progress import progress, remaining, seconds_text


class _Clock:
    """perf_counter that advances 10 s per unit of work (set by the loop body)."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_line_per_unit_with_elapsed_and_remaining_time(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(progress_module.time, "perf_counter", clock)
    stream = io.StringIO()           # not a terminal
    seen = []
    for item in progress(["a", "b", "c", "d"], desc="eval", unit="batch", stream=stream, label=str.upper):
        clock.now += 10 if item != "b" else 30
        seen.append(item)
    lines = stream.getvalue().splitlines()
    assert seen == ["a", "b", "c", "d"]
    assert lines == ["eval: batch 1/4 done (A), 10 s elapsed, about 30 s left",
                     "eval: batch 2/4 done (B), 40 s elapsed, about 40 s left",
                     "eval: batch 3/4 done (C), 50 s elapsed, about 17 s left",
                     "eval: batch 4/4 done (D), 1 min 0 s elapsed"]
    assert "\r" not in stream.getvalue()


def test_disabled_progress_prints_nothing():
    stream = io.StringIO()
    assert list(progress(range(3), desc="x", unit="run", enabled=False, stream=stream)) == [0, 1, 2]
    assert stream.getvalue() == ""


def test_a_terminal_gets_a_bar():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    assert list(progress(range(3), desc="demo", unit="run", stream=stream)) == [0, 1, 2]
    assert "\r" in stream.getvalue() and "demo" in stream.getvalue()


def test_time_arithmetic():
    assert remaining(elapsed=30.0, done=3, total=10) == 70.0
    assert remaining(elapsed=5.0, done=0, total=10) is None
    assert [seconds_text(s) for s in (0.4, 59, 61, 3725)] == ["0 s", "59 s", "1 min 1 s", "1 h 2 min"]


def test_a_command_writing_to_a_log_prints_no_bar(tmp_path):
    """Off a terminal the Hugging Face bars (loading and writing weights) are off too: stderr holds
    only whole lines, with vlmprune's own per-block progress among them."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    result = subprocess.run([sys.executable, "-m", "vlmprune.cli", "prune", "--model", "toy-large",
                             "--method", "magnitude", "--out", str(tmp_path / "pruned")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr and "it/s" not in result.stderr
    assert "magnitude: block 8/8 done" in result.stderr
