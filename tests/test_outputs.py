"""Never lose a user's work: refused and replaced output directories, interrupted writes, stale partial
directories, the saved dtype, and retention of a saved pruned model against its recorded source."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

import pytest
from safetensors import safe_open

from vlmprune.cli import main
from vlmprune.errors import VlmpruneError
from vlmprune.outputs import MARKER, output_directory
from vlmprune.weights.saving import CONFIG_KEY

PRUNE = ["prune", "--model", "toy-small", "--method", "magnitude"]


def _beside(target) -> list[str]:
    """Everything in ``target``'s parent other than ``target`` itself (hidden leftovers included)."""
    return sorted(p.name for p in target.parent.iterdir() if p != target)


def _dtypes(directory) -> set[str]:
    with safe_open(str(directory / "model.safetensors"), "pt") as weights:
        return {weights.get_slice(name).get_dtype() for name in weights.keys()}


@pytest.fixture
def user_dir(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("three weeks of results")
    return mine


def test_refused_out_keeps_the_users_files(user_dir, capsys, monkeypatch):
    def no_loading(name):
        raise AssertionError("refused only after loading the model")
    monkeypatch.setattr("vlmprune.eval.loading.load_model", no_loading)
    assert main([*PRUNE, "--out", str(user_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlmprune: error: ") and err.count("\n") == 1 and "--overwrite" in err
    assert (user_dir / "notes.txt").read_text() == "three weeks of results"
    assert _beside(user_dir) == []


def test_output_directory_refuses_a_directory_it_did_not_write(user_dir):
    with pytest.raises(VlmpruneError, match="vlmprune did not write"):
        with output_directory(user_dir) as partial:
            (partial / "result.txt").write_text("new")
    assert sorted(p.name for p in user_dir.iterdir()) == ["notes.txt"] and _beside(user_dir) == []
    with output_directory(user_dir, overwrite=True) as partial:
        (partial / "result.txt").write_text("new")
    assert sorted(p.name for p in user_dir.iterdir()) == [MARKER, "result.txt"] and _beside(user_dir) == []


def test_a_directory_made_during_the_work_is_not_replaced(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(VlmpruneError, match="vlmprune did not write"):
        with output_directory(target) as partial:
            (partial / "result.txt").write_text("new")
            target.mkdir()
            (target / "notes.txt").write_text("made meanwhile")
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt"] and _beside(target) == []


def test_overwrite_replaces_the_users_directory(user_dir):
    assert main([*PRUNE, "--out", str(user_dir), "--overwrite"]) == 0
    assert not (user_dir / "notes.txt").exists() and (user_dir / MARKER).is_file()
    assert _beside(user_dir) == []


def test_saved_in_the_stored_dtype_unless_told(tmp_path):
    out = tmp_path / "pruned"
    assert main([*PRUNE, "--out", str(out)]) == 0
    assert _dtypes(out) == {"F16"}                       # toy-small is stored in float16
    assert main([*PRUNE, "--out", str(out), "--dtype", "float32"]) == 0     # a vlmprune output: replaced
    assert _dtypes(out) == {"F32"} and _beside(out) == []


def test_previous_output_replaced_and_intact_when_the_new_write_fails(tmp_path):
    out = tmp_path / "out"
    with output_directory(out) as partial:
        (partial / "result.txt").write_text("first")
    with pytest.raises(OSError, match="disk full"):
        with output_directory(out) as partial:
            (partial / "result.txt").write_text("half")
            raise OSError("disk full")
    assert (out / "result.txt").read_text() == "first" and _beside(out) == []
    with output_directory(out) as partial:
        (partial / "second.txt").write_text("second")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "second.txt"] and _beside(out) == []


def test_handlers_are_restored_after_the_write(tmp_path):
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with output_directory(tmp_path / "out"):
        assert signal.getsignal(signal.SIGTERM) is not before[0]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def _slow_writer(target) -> subprocess.Popen:
    """A child process that is midway through writing ``target`` when it prints 'writing'."""
    # a shell starts background jobs with SIGINT ignored, and an ignored signal stays ignored by design:
    # the child takes Ctrl-C as an interactive command does
    code = textwrap.dedent(f"""
        import signal, time
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from vlmprune.outputs import output_directory
        with output_directory({str(target)!r}) as partial:
            (partial / "weights.bin").write_bytes(b"x" * 1000)
            print("writing", flush=True)
            time.sleep(60)
    """)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "writing\n"
    return child


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGINT, -signal.SIGINT)],
                         ids=["SIGTERM", "SIGINT"])
def test_signal_during_a_write_leaves_no_partial_directory(tmp_path, signum, status):
    target = tmp_path / "out"
    child = _slow_writer(target)
    assert any(name.endswith(".partial") for name in _beside(target))
    child.send_signal(signum)
    assert child.wait(timeout=30) == status
    assert list(tmp_path.iterdir()) == []


def test_partial_directory_of_a_killed_run_is_removed_next_time(tmp_path, capsys):
    target = tmp_path / "out"
    child = _slow_writer(target)
    child.kill()
    child.wait(timeout=30)
    [stale] = _beside(target)
    foreign = tmp_path / f".out.{child.pid}-notmine.partial"   # a dead process's, but not written by vlmprune
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with output_directory(target) as partial:
        (partial / "result.txt").write_text("done")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning: removed" in err and stale in err
    assert _beside(target) == [foreign.name] and (foreign / "keep.txt").exists()
    assert (target / "result.txt").read_text() == "done"


def test_output_moved_aside_by_a_killed_run_is_put_back(tmp_path, capsys):
    target = tmp_path / "out"
    with output_directory(target) as partial:
        (partial / "result.txt").write_text("first")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    aside = tmp_path / f".out.{dead.pid}-killed.old"     # as a kill -9 between the two renames leaves it
    aside.mkdir()
    target.rename(aside / "out")
    with pytest.raises(OSError):
        with output_directory(target):
            raise OSError("the new write fails")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "put" in err and str(aside) in err
    assert (target / "result.txt").read_text() == "first" and _beside(target) == []


def test_partial_directory_of_a_running_writer_is_left_alone(tmp_path, capsys):
    target = tmp_path / "out"
    child = _slow_writer(target)
    [running] = _beside(target)
    with output_directory(target) as partial:
        (partial / "result.txt").write_text("done")
    assert _beside(target) == [running] and capsys.readouterr().err == ""
    child.terminate()
    assert child.wait(timeout=30) == 128 + signal.SIGTERM
    assert _beside(target) == [] and (target / "result.txt").read_text() == "done"


def test_eval_of_a_pruned_directory_reports_retention(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VLMPRUNE_CACHE", str(tmp_path / "cache"))
    out, result = tmp_path / "pruned", tmp_path / "result.json"
    assert main([*PRUNE, "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())[CONFIG_KEY]["source"] == "toy-small"
    argv = ["eval", "--model", str(out), "--tasks", "existence", "--limit", "4", "--json", str(result)]
    assert main(argv) == 0
    assert isinstance(json.loads(result.read_text())["retention"], float)
    capsys.readouterr()

    config = json.loads((out / "config.json").read_text())
    config[CONFIG_KEY]["source"] = str(tmp_path / "gone")
    (out / "config.json").write_text(json.dumps(config))
    assert main(argv) == 0
    assert json.loads(result.read_text())["retention"] is None
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("vlmprune:")]
    assert len(lines) == 1 and "cannot be loaded" in lines[0] and str(tmp_path / "gone") in lines[0]
