"""Output directories written whole or not at all, never over something vlmprune did not write.

The work goes into a hidden ``.NAME.<pid>-<random>.partial`` directory beside the target and is moved
into place only when complete. Every directory written this way holds a ``.vlmprune-output`` marker:
a later run replaces such a directory (after its own output is complete), an empty one, or anything
else only with ``overwrite``. SIGTERM and Ctrl-C during the write remove the partial directory; one
left by ``kill -9`` is removed by the next write to the same target, once its process is gone.
"""
from __future__ import annotations

import glob
import os
import shutil
import signal
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import VlmpruneError

MARKER = ".vlmprune-output"
MARKER_TEXT = "written by vlmprune: a later run may replace this directory\n"
PARTIAL = ".partial"
ASIDE = ".old"          # a replaced output, between moving it aside and deleting it
SIGNALS = (signal.SIGTERM, signal.SIGINT)


def is_output(path: str | Path) -> bool:
    """Whether ``path`` is a directory this module wrote."""
    return (Path(path) / MARKER).is_file()


def check_output(path: str | Path, overwrite: bool = False) -> Path:
    """Refuse a target that is a file, or a directory holding files vlmprune did not write (unless
    ``overwrite``), before any work is spent on it."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise VlmpruneError(f"{target} is a file: give a directory path for the output")
    if target.is_dir() and not overwrite and not is_output(target) and any(target.iterdir()):
        raise VlmpruneError(f"{target} holds files vlmprune did not write: give another output directory, "
                            "or --overwrite to replace it")
    return target


def mark_output(path: str | Path) -> None:
    """Record that vlmprune writes into ``path`` (created if needed), for work that must write in place
    (a journal that a resumed run reads back) rather than through :func:`output_directory`."""
    target = Path(path)
    target.mkdir(parents=True, exist_ok=True)
    (target / MARKER).write_text(MARKER_TEXT)


@contextmanager
def output_directory(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """``with output_directory(out) as tmp:`` write into ``tmp``; on a clean exit it becomes ``out``.

    On an exception, SIGTERM (exit status 143) or Ctrl-C, ``tmp`` is removed and ``out`` is as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(target)
    check_output(target, overwrite)
    with _cleanup_on_signals():
        partial = _hidden_dir(target, PARTIAL)
        try:
            (partial / MARKER).write_text(MARKER_TEXT)
            yield partial
            _commit(partial, target, overwrite)
        finally:
            shutil.rmtree(partial, ignore_errors=True)


def _hidden_dir(target: Path, suffix: str) -> Path:
    """A new ``.NAME.<pid>-<random><suffix>`` beside ``target``, with ordinary permissions (mkdtemp's are private)."""
    made = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}-", suffix=suffix, dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    made.chmod(0o777 & ~umask)
    return made


def _commit(partial: Path, target: Path, overwrite: bool) -> None:
    """Move ``partial`` to ``target``; a previous output is moved aside first and deleted last. Signals wait
    until this is done, so no interruption leaves the target missing."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        check_output(target, overwrite)       # again: something may have appeared there during the work
        if not (target.exists() or target.is_symlink()):
            os.replace(partial, target)
            return
        aside = _hidden_dir(target, ASIDE)
        os.replace(target, aside / target.name)
        try:
            os.replace(partial, target)
        except BaseException:
            os.replace(aside / target.name, target)
            raise
        shutil.rmtree(aside, ignore_errors=True)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


@contextmanager
def _cleanup_on_signals() -> Iterator[None]:
    """Turn SIGTERM into ``SystemExit(143)`` and SIGINT into ``KeyboardInterrupt`` while writing, so the
    ``finally`` that removes the partial directory runs; an ignored signal stays ignored."""
    if threading.current_thread() is not threading.main_thread():   # only the main thread may set handlers
        yield
        return
    handlers = {signal.SIGTERM: _terminate, signal.SIGINT: signal.default_int_handler}
    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
    replaced = [signum for signum, handler in previous.items() if handler not in (signal.SIG_IGN, None)]
    for signum in replaced:
        signal.signal(signum, handlers[signum])
    try:
        yield
    finally:
        for signum in replaced:
            signal.signal(signum, previous[signum])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                                 # another user's process
        pass
    return True


def _clean_stale(target: Path) -> None:
    """Remove what a killed run left beside ``target``: partial directories, and a replaced output moved
    aside (put back instead when the target is missing). Only directories this module made, of processes
    that are gone; each is named on stderr."""
    for stale in sorted(target.parent.glob(f".{glob.escape(target.name)}.*")):
        pid, _, rest = stale.name[len(target.name) + 2:].partition("-")
        if not (pid.isdigit() and stale.is_dir() and not stale.is_symlink()) or _pid_alive(int(pid)):
            continue
        contents = {entry.name for entry in stale.iterdir()}
        if rest.endswith(ASIDE) and contents <= {target.name}:
            if contents and not (target.exists() or target.is_symlink()):
                os.replace(stale / target.name, target)
                stale.rmdir()
                print(f"vlmprune: warning: put {target} back from {stale}, where an interrupted run had moved it",
                      file=sys.stderr)
                continue
        elif not (rest.endswith(PARTIAL) and (MARKER in contents or not contents)):
            continue                                        # not made by this module: leave it alone
        shutil.rmtree(stale, ignore_errors=True)
        print(f"vlmprune: warning: removed {stale}, left by an interrupted run", file=sys.stderr)
