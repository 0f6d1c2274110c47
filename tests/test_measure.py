"""Latency and KV-cache helpers on a tiny random LLaVA: positive numbers, and the measured cache
size equal to the analytic one, dense and with FastV (no timing assertions)."""
from __future__ import annotations

import math

import pytest

from vlmprune import tokens
from vlmprune.errors import VlmpruneError
from vlmprune.models import get_adapter
from vlmprune.models.forward_args import layer_hidden
from vlmprune.measure.flops import TokenSchedule
from vlmprune.measure import latency
from vlmprune.measure.latency import decode_tokens_per_s, prefill_ms
from vlmprune.measure.memory import analytic_kv_cache_bytes, kv_cache_bytes


@pytest.fixture(scope="module")
def llava(tiny):
    model, make_inputs = tiny("llava")
    return model, make_inputs(text_lens=(6,))


def schedule(lengths: list[int]) -> TokenSchedule:
    return TokenSchedule(vision=[], crops=1, projector=0, llm=lengths, head=lengths[-1])


class FakeClock:
    """Stands in for ``time`` in the latency module: each reading advances by the next of ``steps`` (s)."""

    def __init__(self, steps):
        self.now, self.steps = 0.0, list(steps)

    def perf_counter(self):
        self.now += self.steps.pop(0) if self.steps else 0.0
        return self.now


def test_prefill_is_the_median_of_the_timed_runs_with_the_method_attached(llava, monkeypatch):
    model, inputs = llava
    lengths = []
    hook = get_adapter(model).llm_layers[-1].register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(layer_hidden(args, kwargs).shape[1]),
        with_kwargs=True)
    # the warm-up reads the clock once (at its start), each timed run twice: runs of 1, 3 and 2 s
    monkeypatch.setattr(latency, "time", FakeClock([100, 0, 1, 0, 3, 0, 2]))
    try:
        ms = prefill_ms(model, inputs, tokens.from_spec("fastv:layer=2,keep=0.5"), repeats=3, warmup=1)
    finally:
        hook.remove()
    assert ms == pytest.approx(2000.0)
    assert lengths == [inputs["input_ids"].shape[1] - 8] * 4          # pruned in every run, warm-up included
    assert getattr(model, "_vlmprune_engine", None) is None           # detached afterwards


def test_prefill_scores_the_last_position_only_as_generate_does(llava):
    model, inputs = llava
    head = get_adapter(model).lm_head
    rows = []
    hook = head.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[1]))
    try:
        prefill_ms(model, inputs, repeats=1, warmup=0)
    finally:
        hook.remove()
    assert rows == [1]


def test_decode_rate_counts_the_steps_after_the_first_token(llava, monkeypatch):
    model, inputs = llava
    # the clock is read once per generated token; 0.5 s apart: 3 decode steps in 1.5 s = 2 tokens/s
    monkeypatch.setattr(latency, "time", FakeClock([0.5] * 100))
    rate = decode_tokens_per_s(model, inputs, tokens.from_spec("fastv:layer=2,keep=0.5"), new_tokens=4,
                               repeats=2, warmup=1)
    assert rate == pytest.approx(2.0)
    assert math.isfinite(rate)


def test_generation_timing_splits_the_first_token_from_the_decode_steps(llava, monkeypatch):
    model, inputs = llava
    # the call's start, then one reading per generated token: 2 s to the first, then 0.5 s a step
    monkeypatch.setattr(latency, "time", FakeClock([0, 2, 0.5, 0.5, 0.5]))
    first_ms, rate = latency.generation_timing(model, inputs, new_tokens=4)
    assert first_ms == pytest.approx(2000.0) and rate == pytest.approx(2.0)


def test_kv_cache_bytes_measured_equals_analytic(llava):
    model, inputs = llava
    text = model.config.text_config
    length = inputs["input_ids"].shape[1]             # 25: BOS, 2 text, 16 visual, 6 text
    dense = kv_cache_bytes(model, inputs)
    assert dense == analytic_kv_cache_bytes(text, schedule([length] * 4), bytes_per_value=4)
    pruned = kv_cache_bytes(model, inputs, tokens.from_spec("fastv:layer=2,keep=0.5"))
    kept = length - 8
    assert pruned == analytic_kv_cache_bytes(text, schedule([length, length, kept, kept]), bytes_per_value=4)
    assert pruned < dense


def test_bad_settings_raise(llava):
    model, inputs = llava
    with pytest.raises(VlmpruneError, match="new_tokens"):
        decode_tokens_per_s(model, inputs, new_tokens=1)
    with pytest.raises(VlmpruneError, match="repeats"):
        prefill_ms(model, inputs, repeats=0)


def test_first_token_time_runs_no_decode_step(llava, monkeypatch):
    model, inputs = llava
    steps = []
    handle = model.register_forward_pre_hook(lambda *_: steps.append(1))
    monkeypatch.setattr(latency, "time", FakeClock([0, 1.5, 0.5, 0.5]))
    try:
        assert latency.first_token_ms(model, inputs) == pytest.approx(1500.0)
        assert len(steps) == 1                           # the prefill alone
    finally:
        handle.remove()
