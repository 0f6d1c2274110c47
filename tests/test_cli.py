"""Bad input to ``vlmprune eval``, ``demo`` and ``viz``: exit 2, one line on stderr, no traceback,
no output file."""
from __future__ import annotations

import subprocess
import sys

import pytest

from vlmprune.cli import main


def _fails_cleanly(argv: list[str], capsys, outputs=()) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlmprune: error: ") and err.count("\n") == 1 and "Traceback" not in err
    for path in outputs:
        assert not path.exists(), f"{path} was written by a failing command"
    return err


@pytest.mark.parametrize("extra, message", [
    (["--model", "toy-huge"], "unknown model 'toy-huge'"),
    (["--model", "toy-large", "--tokens", "nosuchmethod:keep=4"], "unknown token method 'nosuchmethod'"),
    (["--model", "toy-large", "--tokens", "fastv:keep"], "cannot parse"),
    (["--model", "toy-large", "--limit", "0"], "--limit must be at least 1"),
    (["--model", "toy-large", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["--model", "toy-large", "--tasks", "existence,juggling"], "unknown task 'juggling'"),
])
def test_eval_bad_input(extra, message, capsys, tmp_path):
    out_json, out_md = tmp_path / "out.json", tmp_path / "out.md"
    err = _fails_cleanly(["eval", *extra, "--json", str(out_json), "--md", str(out_md)], capsys,
                         [out_json, out_md])
    assert message in err


def test_eval_directory_without_a_model(capsys, tmp_path):
    err = _fails_cleanly(["eval", "--model", str(tmp_path), "--json", str(tmp_path / "o.json")], capsys,
                         [tmp_path / "o.json"])
    assert "config.json" in err


def test_viz_tokens_missing_image(capsys, tmp_path):
    png = tmp_path / "kept.png"
    err = _fails_cleanly(["viz", "tokens", "--model", "toy-large", "--tokens", "random:keep=16",
                          "--question", "what colour is the square?", "--image", str(tmp_path / "none.png"),
                          "--out", str(png)], capsys, [png])
    assert "none.png" in err


def test_viz_tokens_unknown_method(capsys, tmp_path):
    png = tmp_path / "kept.png"
    err = _fails_cleanly(["viz", "tokens", "--model", "toy-large", "--tokens", "nosuch:keep=16",
                          "--question", "q", "--out", str(png)], capsys, [png])
    assert "unknown token method 'nosuch'" in err


def test_the_installed_command_prints_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "vlmprune.cli", "eval", "--model", "no-such-model",
                             "--json", str(tmp_path / "o.json")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "o.json").exists()
