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
        for name in cli.COMMANDS:   # a name longer than argparse's column ends its line
            assert f"    {name} " in result.stdout or f"    {name}\n" in result.stdout


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


CHECKED = "import sys; from vlmprune.cli import main\nrc = main({argv!r})\n" \
          "print(rc, 'TORCH' if 'torch' in sys.modules else 'NO TORCH')"


@pytest.mark.parametrize("argv, message", [
    (["eval", "--model", "toy-huge"], "unknown model 'toy-huge'"),
    (["eval", "--model", "toy-large", "--tokens", "ivpt:keep=16"], "unknown token method 'ivpt'"),
    (["eval", "--model", "toy-large", "--tokens", "ivtp:kep=16"], "has no setting 'kep'"),
    (["eval", "--model", "toy-large", "--tasks", "countin"], "unknown task 'countin'"),
    (["eval", "--model", "toy-large", "--limit", "0"], "--limit must be at least 1"),
    (["prune", "--model", "toy-large", "--method", "atv:alfa=2", "--out", "{tmp}/p"], "has no setting 'alfa'"),
    (["prune", "--model", "toy-large", "--method", "wand", "--out", "{tmp}/p"], "unknown weight method 'wand'"),
    (["prune", "--model", "toy-large", "--method", "atv", "--out", "{tmp}/mine"], "holds files vlmprune did not write"),
])
def test_input_errors_answer_before_the_library_loads(argv, message, tmp_path):
    """A mistyped name is one line and exit 2 without torch in sys.modules (so no ten-second import);
    the user's own directory given as --out is refused and left as it was."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    argv = [arg.format(tmp=tmp_path) for arg in argv]
    result = subprocess.run([sys.executable, "-c", CHECKED.format(argv=argv)], capture_output=True, text=True,
                            timeout=60)
    assert result.stdout.strip() == "2 NO TORCH", result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine" and not (tmp_path / "p").exists()


def test_the_catalogue_of_names_matches_the_registries():
    """The preflight checks read catalogue.json; a method added or renamed without rewriting it fails here
    (fix: python -m vlmprune.preflight --write)."""
    from vlmprune import preflight

    assert preflight.catalogue() == preflight.live_catalogue()
