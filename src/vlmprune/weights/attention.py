"""Attention rows recorded while a decoder block runs, for selectors that rank tokens by attention.

The block keeps its own attention implementation (SDPA, eager, ...): a thin implementation
registered with transformers' ``AttentionInterface`` delegates to it and, on the side, turns the
post-rotary queries and keys it receives into head-mean probabilities for the requested rows.
Nothing here knows a model family's module paths or rotary scheme.
"""
from __future__ import annotations

import sys

import torch
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

_NAME = "vlmprune_record"
_active: list["AttentionRecorder"] = []


def _delegate(module, original: str):
    if original == "eager" or original is None:
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[original]


def _recording_attention(module, query, key, value, attention_mask, **kwargs):
    recorder = _active[-1]
    recorder.record(module, query, key, attention_mask, kwargs.get("scaling"))
    return _delegate(module, recorder.original)(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(_NAME, _recording_attention)


def attention_probs(query, key, attention_mask, scaling, rows: torch.Tensor | None) -> torch.Tensor:
    """Head-mean softmax attention (B, R, L) of the query rows ``rows`` (all rows when None)."""
    heads, kv_heads = query.shape[1], key.shape[1]
    key = key.repeat_interleave(heads // kv_heads, dim=1)
    length = key.shape[2]
    if rows is None:
        rows = torch.arange(query.shape[2], device=query.device)
    q = query[:, :, rows].float()
    scores = q @ key.float().transpose(2, 3) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    if attention_mask is None:  # causal, no padding (one sample per call)
        allowed = torch.arange(length, device=query.device)[None, :] <= rows[:, None]
        scores = scores.masked_fill(~allowed, float("-inf"))
    else:
        mask = attention_mask[:, :, rows, :length]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    return torch.softmax(scores, dim=-1).mean(dim=1)


class AttentionRecorder:
    """While active, each attention call of the model records ``probs``: (R, L) for ``rows``.

    ``rows`` (indices into the sequence) is set by the caller before each forward; the sequence
    is one sample (batch 1)."""

    def __init__(self, config):
        self.config = config
        self.original = None
        self.rows: torch.Tensor | None = None
        self.probs: torch.Tensor | None = None

    def record(self, module, query, key, attention_mask, scaling) -> None:
        scaling = scaling if scaling is not None else getattr(module, "scaling", None)
        self.probs = attention_probs(query, key, attention_mask, scaling, self.rows)[0]

    def __enter__(self) -> "AttentionRecorder":
        self.original = self.config._attn_implementation
        self.config._attn_implementation = _NAME
        _active.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _active.remove(self)
        self.config._attn_implementation = self.original
