"""Latency and KV-cache helpers on a tiny random LLaVA: positive numbers, and the measured cache
size equal to the analytic one, dense and with FastV (no timing assertions)."""
from __future__ import annotations

import math

import pytest

from vlmprune import tokens
from vlmprune.errors import VlmpruneError
from vlmprune.measure.flops import TokenSchedule
from vlmprune.measure.latency import decode_tokens_per_s, prefill_ms
from vlmprune.measure.memory import analytic_kv_cache_bytes, kv_cache_bytes


@pytest.fixture(scope="module")
def llava(tiny):
    model, make_inputs = tiny("llava")
    return model, make_inputs(text_lens=(6,))


def schedule(lengths: list[int]) -> TokenSchedule:
    return TokenSchedule(vision=[], crops=1, projector=0, llm=lengths, head=lengths[-1])


def test_prefill_and_decode_are_positive_and_finite(llava):
    model, inputs = llava
    for method in (None, tokens.from_spec("fastv:layer=2,keep=0.5")):
        ms = prefill_ms(model, inputs, method, repeats=2, warmup=1)
        rate = decode_tokens_per_s(model, inputs, method, new_tokens=3, repeats=1, warmup=0)
        assert 0 < ms < 60_000 and math.isfinite(ms)
        assert rate > 0 and math.isfinite(rate)


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
