"""The command line's own behaviour: help without the heavy imports, unexpected errors as one line
with the traceback in a file, ``--debug`` for the traceback itself."""
from __future__ import annotations

import subprocess
import sys

import pytest

from vlmprune import cli

HELP = "import sys; from vlmprune.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n" \
       "print('TORCH' if 'torch' in sys.modules else 'NO TORCH')"


@pytest.mark.parametrize("argv", [["--help"], ["eval", "--help"], ["demo", "--help"]])
def test_help_imports_no_torch(argv):
    """The top-level help lists every command from the summaries; a light command's help stays light."""
    result = subprocess.run([sys.executable, "-c", HELP.format(argv=argv)], capture_output=True, text=True,
                            timeout=60)
    assert result.stdout.strip().endswith("NO TORCH"), result.stdout + result.stderr
    if argv == ["--help"]:
        for name in cli.COMMANDS:
            assert f"    {name} " in result.stdout


def test_only_the_named_command_is_imported(monkeypatch):
    imported = []
    monkeypatch.setattr(cli.importlib, "import_module", lambda name: imported.append(name) or _Stub())
    cli.build_parser(["flops"])
    assert imported == ["vlmprune.measure.command"]


class _Stub:
    @staticmethod
    def register(subparsers):
        subparsers.add_parser("flops")


def test_an_unexpected_error_is_one_line_and_a_log_file(monkeypatch, tmp_path, capsys):
    import vlmprune.measure.command as flops_command

    def broken(args):
        raise RuntimeError("size of tensor a (25) must match size of tensor b (37)\nsecond line")

    monkeypatch.setenv("VLMPRUNE_LOG_DIR", str(tmp_path))
    real_register = flops_command.register

    def register(subparsers):
        real_register(subparsers)
        subparsers.choices["flops"].set_defaults(func=broken)

    monkeypatch.setattr(flops_command, "register", register)
    assert cli.main(["flops", "--model", "llava-1.5-7b"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("vlmprune: unexpected error: RuntimeError: size of tensor a (25)")
    (log,) = tmp_path.glob("vlmprune-*.log")
    assert "Traceback" in log.read_text() and "second line" in log.read_text() and str(log) in err
    with pytest.raises(RuntimeError):
        cli.main(["--debug", "flops", "--model", "llava-1.5-7b"])
