"""Wall-clock prefill latency and decode throughput, dense or with a token method attached.

Each measurement warms up first, then reports the median of ``repeats`` runs under
``torch.no_grad()`` (synchronising the GPU when the model is on one), so one slow run from a busy
machine does not move the result. A token method is attached with ``vlmprune.tokens.apply`` for the
measurement and removed afterwards.
"""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from typing import Any, Callable

import torch
from torch import nn

from ..errors import VlmpruneError
from ..tokens.base import TokenMethod


@contextmanager
def attached(model: nn.Module, method: TokenMethod | None):
    """``method`` installed on ``model`` for the duration of the block (nothing when ``None``)."""
    if method is None:
        yield
        return
    from .. import tokens

    handle = tokens.apply(model, method)
    try:
        yield
    finally:
        handle.remove()


def _synchronize(model: nn.Module) -> None:
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(run: Callable[[], Any], model: nn.Module, repeats: int, warmup: int) -> float:
    """Median wall time of ``run()`` over ``repeats`` calls after ``warmup`` untimed ones."""
    if repeats < 1 or warmup < 0:
        raise VlmpruneError(f"repeats={repeats}, warmup={warmup}: use repeats >= 1 and warmup >= 0")
    times = []
    with torch.no_grad():
        for index in range(warmup + repeats):
            _synchronize(model)
            start = time.perf_counter()
            run()
            _synchronize(model)
            if index >= warmup:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def prefill_ms(model: nn.Module, inputs: dict[str, Any], method: TokenMethod | None = None,
               repeats: int = 5, warmup: int = 1) -> float:
    """Median time of one forward over the whole prompt (image encoding included), in ms."""
    with attached(model, method):
        return 1000 * median_seconds(lambda: model(**inputs, use_cache=True), model, repeats, warmup)


def decode_tokens_per_s(model: nn.Module, inputs: dict[str, Any], method: TokenMethod | None = None,
                        new_tokens: int = 16, repeats: int = 3, warmup: int = 1) -> float:
    """Greedy decode throughput after the prefill, in tokens per second per sequence.

    ``generate`` of ``new_tokens`` tokens costs one prefill plus ``new_tokens - 1`` decode steps, and
    of one token just the prefill, so the decode time is the difference of the two medians."""
    if new_tokens < 2:
        raise VlmpruneError(f"new_tokens={new_tokens}: decode throughput needs at least 2 new tokens")

    def generate(count: int) -> Callable[[], Any]:
        return lambda: model.generate(**inputs, max_new_tokens=count, min_new_tokens=count, do_sample=False)

    with attached(model, method):
        full = median_seconds(generate(new_tokens), model, repeats, warmup)
        prefill = median_seconds(generate(1), model, repeats, warmup)
    return (new_tokens - 1) / max(full - prefill, 1e-9)
