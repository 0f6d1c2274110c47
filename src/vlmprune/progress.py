"""Progress of long work: a bar on a terminal, one line per finished unit everywhere else.

A bar redraws itself with carriage returns, which a log file or a CI console keeps as hundreds of
lines; a line per unit reads well there and still says how far the work is and how long is left.
Both go to stderr so that a command's stdout (a table, JSON) stays clean.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable, Iterable, Iterator, TextIO, TypeVar

T = TypeVar("T")


def quiet_library_bars(stream: TextIO | None = None) -> None:
    """Off a terminal, turn off the bars of the Hugging Face libraries too (loading and writing
    weights): they read ``HF_HUB_DISABLE_PROGRESS_BARS`` when first imported, and transformers, if
    already imported, is told directly. A user's own setting of the variable wins."""
    if (stream or sys.stderr).isatty():
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1":
        from transformers.utils import logging

        logging.disable_progress_bar()


def seconds_text(seconds: float) -> str:
    """``42 s``, ``3 min 5 s`` or ``1 h 2 min``: short enough for a progress line."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def remaining(elapsed: float, done: int, total: int) -> float | None:
    """Seconds left if the remaining units take as long as the finished ones did on average."""
    if done <= 0 or total <= 0:
        return None
    return elapsed / done * max(0, total - done)


def progress(items: Iterable[T], *, desc: str, unit: str, total: int | None = None, enabled: bool = True,
             label: Callable[[T], str] | None = None, stream: TextIO | None = None) -> Iterator[T]:
    """Yield ``items``, reporting each finished one: a tqdm bar when ``stream`` (default stderr) is a
    terminal, else ``desc: unit 3/10 done, 12 s elapsed, about 28 s left``. ``label(item)`` names the unit
    being worked on (on the bar) or just finished (on the line)."""
    stream = stream or sys.stderr
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if not enabled:
        yield from items
        return
    if stream.isatty():
        from tqdm.auto import tqdm

        bar = tqdm(items, desc=desc, unit=unit, total=total, leave=False, file=stream)
        for item in bar:
            if label is not None:
                bar.set_postfix_str(label(item))
            yield item
        return
    start = time.perf_counter()
    done = 0
    for item in items:
        yield item
        done += 1
        elapsed = time.perf_counter() - start
        left = remaining(elapsed, done, total or 0)
        of = f"/{total}" if total else ""
        tail = f", about {seconds_text(left)} left" if left is not None and done < (total or 0) else ""
        name = f" ({label(item)})" if label is not None else ""
        print(f"{desc}: {unit} {done}{of} done{name}, {seconds_text(elapsed)} elapsed{tail}", file=stream, flush=True)
