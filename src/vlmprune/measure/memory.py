"""KV-cache size after the prefill: measured from the cache the model returns, and analytic.

Token pruning in the LLM leaves a different sequence length in each layer's cache (layers before a
pruning site keep every token), so both values sum over layers.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..models.forward_args import output_cache
from ..tokens.base import TokenMethod
from .flops import TokenSchedule, attention_widths
from .latency import attached


def cache_bytes(cache: Any) -> int:
    """Bytes of every key and value tensor held by a ``transformers`` cache."""
    total = 0
    for layer in cache.layers:
        for tensor in (layer.keys, layer.values):
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
    return total


def kv_cache_bytes(model: nn.Module, inputs: dict[str, Any], method: TokenMethod | None = None) -> int:
    """Bytes of the KV cache after one prefill of ``inputs`` (``method`` attached when given)."""
    with attached(model, method), torch.no_grad():
        outputs = model(**inputs, use_cache=True)
    return cache_bytes(output_cache(outputs))


def analytic_kv_cache_bytes(text_config, schedule: TokenSchedule, bytes_per_value: int, batch: int = 1) -> int:
    """Keys and values of every decoder layer at the sequence length ``schedule`` gives it."""
    _, _, kv_width = attention_widths(text_config)
    return sum(2 * batch * length * kv_width * bytes_per_value for length in schedule.llm)
