"""SGP's scores (METHODS.md 2.1): how much the small model's attention, over every layer and head,
falls on each visual token while it reads the prompt after the image and while it answers.

Score of visual token v = sum over layers, heads and rows r of ``A[r, v]``, where the rows are the
prompt tokens after the image (from the end of the image onward) and every generated token that the
small model reads back while it answers greedily. Raw sums, no normalisation.

Decision (which generated rows): ``generate``'s attentions give a row for each generated token that is
fed back, i.e. every generated token but the last; a token at or after a sample's end-of-sequence is
fed only because another sample of the batch goes on, so it does not count (a batch scores as its
samples do alone).

The small model's attention is read from ``output_attentions``, which needs eager attention: it is
switched on for the scoring and back afterwards (the large model keeps SDPA).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .pairing import guide_inputs, visual_positions


@dataclass
class GuideAnswer:
    """What one greedy run of the guide gives: ``scores`` (B, V) per visual token, in image order;
    ``tokens`` (B, T) the generated ids; ``logits`` (B, T, vocab) of each generated step;
    ``answered`` (B, T) True up to and including each sample's end-of-sequence."""

    scores: torch.Tensor
    tokens: torch.Tensor
    logits: torch.Tensor
    answered: torch.Tensor


@contextmanager
def eager_attention(model: nn.Module):
    """Eager attention while inside (attention probabilities can only be read from it)."""
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        model.set_attn_implementation(before)


def _stop_ids(model: nn.Module) -> list[int]:
    eos = model.generation_config.eos_token_id
    return [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]


def answered_mask(tokens: torch.Tensor, stop_ids: list[int]) -> torch.Tensor:
    """(B, T) True for each generated token up to and including the first stop token."""
    stops = torch.isin(tokens, torch.tensor(stop_ids, dtype=tokens.dtype, device=tokens.device))
    before = torch.cumsum(stops.long(), dim=1) - stops.long()
    return before == 0


def _rows_to_visual(attentions: tuple[torch.Tensor, ...], rows: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """Sum over layers, heads and the rows weighted by ``rows`` (B, Q) of the attention each layer's
    (B, H, Q, K) map gives the key positions ``visual`` (B, V)."""
    total = torch.stack([a.float().sum(1) for a in attentions]).sum(0)            # (B, Q, K)
    per_key = (total * rows[..., None].to(total.dtype)).sum(1)                    # (B, K)
    return per_key.gather(1, visual)


@torch.no_grad()
def guide_answer(small: nn.Module, inputs: dict[str, Any], max_new_tokens: int = 5) -> GuideAnswer:
    """Greedy answer of ``small`` to the large model's ``inputs`` and the SGP score of every visual token.

    On a shape-only (``meta``) run, as FLOP counting makes, the guide reads the prompt once without
    decoding: the prompt rows are scored and no tokens come back."""
    inputs = guide_inputs(inputs)
    input_ids = inputs["input_ids"]
    length = input_ids.shape[1]
    visual = visual_positions(small, input_ids)
    after_image = torch.arange(length, device=input_ids.device) > visual[:, -1:]
    meta = inputs["pixel_values"].is_meta
    with eager_attention(small):
        if meta:
            out = small(**inputs, output_attentions=True, use_cache=False)
            scores = _rows_to_visual(out.attentions, after_image, visual)
            empty = input_ids[:, :0]
            return GuideAnswer(scores, empty, out.logits[:, :0], empty.bool())
        stop = _stop_ids(small)
        pad = small.generation_config.pad_token_id
        out = small.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, output_attentions=True,
                             output_logits=True, return_dict_in_generate=True,
                             pad_token_id=pad if pad is not None else (stop[0] if stop else 0))
    tokens = out.sequences[:, length:]
    answered = answered_mask(tokens, stop) if stop else torch.ones_like(tokens, dtype=torch.bool)
    scores = _rows_to_visual(out.attentions[0], after_image, visual)
    for step in range(1, tokens.shape[1]):      # step t reads generated token t-1 back
        read_back = answered[:, step:step + 1]  # no end-of-sequence among tokens 0..t-1
        scores = scores + _rows_to_visual(out.attentions[step], read_back, visual)
    return GuideAnswer(scores, tokens, torch.stack(out.logits, 1), answered)
