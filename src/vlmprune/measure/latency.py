"""Wall-clock prefill latency and decode throughput, dense or with a token method attached.

Each measurement warms up first, then reports the median of ``repeats`` runs under
``torch.no_grad()`` (synchronising the GPU when the model is on one), so one slow run from a busy
machine does not move the result. A token method is attached with ``vlmprune.tokens.apply`` for the
measurement and removed afterwards.
"""
from __future__ import annotations

import inspect
import statistics
import time
from contextlib import contextmanager
from typing import Any, Callable

import torch
from torch import nn
from transformers import StoppingCriteria, StoppingCriteriaList

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


def last_logits_only(model: nn.Module) -> dict[str, int]:
    """``{"logits_to_keep": 1}`` where the model's forward takes it (every causal LM and VLM of recent
    ``transformers``), else nothing: the prefill ``generate`` runs scores the last position only, and
    an LM head over every prompt position is work no generation does (16% of a LLaVA-1.5-width prefill
    with 4 LLM layers)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def prefill_ms(model: nn.Module, inputs: dict[str, Any], method: TokenMethod | None = None,
               repeats: int = 5, warmup: int = 1) -> float:
    """Median time of one forward over the whole prompt (image encoding included) as ``generate``
    runs it, filling the KV cache and scoring the last position (:func:`last_logits_only`), in ms."""
    extra = last_logits_only(model)
    with attached(model, method):
        return 1000 * median_seconds(lambda: model(**inputs, use_cache=True, **extra), model, repeats, warmup)


class _StepClock(StoppingCriteria):
    """Notes the time after every generation step (the first right after the prefill); never stops."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        _synchronize(self.model)
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def generation_timing(model: nn.Module, inputs: dict[str, Any], new_tokens: int = 16) -> tuple[float, float]:
    """One greedy generation (a method, if any, already attached): the time to the first token in ms
    (``generate``'s own prefill with its set-up: what a user waits for) and the decode throughput
    after it in tokens per second per sequence (``new_tokens - 1`` steps over the time between the
    first generated token and the last)."""
    if new_tokens < 2:
        raise VlmpruneError(f"new_tokens={new_tokens}: decode throughput needs at least 2 new tokens")
    start, times = _stepped_generation(model, inputs, new_tokens)
    return 1000 * (times[0] - start), (len(times) - 1) / max(times[-1] - times[0], 1e-9)


def first_token_ms(model: nn.Module, inputs: dict[str, Any]) -> float:
    """The time to the first token of one greedy ``generate`` (as :func:`generation_timing` reads
    it), with no decode step after it."""
    start, times = _stepped_generation(model, inputs, 1)
    return 1000 * (times[0] - start)


def _stepped_generation(model: nn.Module, inputs: dict[str, Any], new_tokens: int) -> tuple[float, list[float]]:
    """The start time and the time after each generated token of one greedy ``generate``."""
    clock = _StepClock(model)
    with torch.no_grad():
        _synchronize(model)
        start = time.perf_counter()
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       stopping_criteria=StoppingCriteriaList([clock]))
    return start, clock.times


def decode_tokens_per_s(model: nn.Module, inputs: dict[str, Any], method: TokenMethod | None = None,
                        new_tokens: int = 16, repeats: int = 3, warmup: int = 1) -> float:
    """Greedy decode throughput after the prefill (:func:`generation_timing`), the median over
    ``repeats`` generations after ``warmup`` untimed ones."""
    if repeats < 1 or warmup < 0:
        raise VlmpruneError(f"repeats={repeats}, warmup={warmup}: use repeats >= 1 and warmup >= 0")
    with attached(model, method):
        rates = [generation_timing(model, inputs, new_tokens)[1] for _ in range(warmup + repeats)]
    return statistics.median(rates[warmup:])
