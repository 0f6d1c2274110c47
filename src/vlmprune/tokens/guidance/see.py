"""SEE, SGP's early exit (METHODS.md 2.1): when the small model is sure of its answer, it answers and
the large model is never run.

``S_conf``: geometric mean of the probabilities of the small model's greedy tokens. ``S_cons``: the
product of the probabilities of those same tokens when the small model reads the prompt again with
only ``keep`` of its visual tokens (chosen by its own SGP scores, pruned before its first layer). Exit
when ``(S_conf + S_cons) / 2 > threshold``.

Decision: the answer's tokens are the generated ones up to and including the end-of-sequence token
(tokens a batch generates after it are padding); ``threshold`` defaults to 0.9, a value the papers do
not fix.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import scorers
from ..base import ModelPlan, Reduction, Site, SiteContext, TokenMethod
from ..engine import apply
from .pairing import guide_inputs
from .sgp import guide_answer


@dataclass
class EarlyExit:
    """One item's decision: ``answer`` (generated ids up to and including end-of-sequence)."""

    exited: bool
    answer: list[int]
    confidence: float
    consistency: float


class _GivenTokens(TokenMethod):
    """Keeps visual tokens chosen in advance, before the first LLM layer."""

    name = "given-tokens"

    def __init__(self, keep: torch.Tensor):
        self.keep = keep

    def sites(self, plan: ModelPlan) -> list[Site]:
        return [Site("llm", 0)]

    def reduce(self, ctx: SiteContext) -> Reduction:
        return Reduction(keep=self.keep.to(ctx.hidden.device))


def _token_log_probs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(B, T, vocab) logits and (B, T) tokens -> (B, T) log-probabilities of those tokens."""
    return logits.float().log_softmax(-1).gather(2, tokens[..., None]).squeeze(-1)


def with_answer(inputs: dict[str, Any], tokens: torch.Tensor) -> dict[str, Any]:
    """The prompt followed by ``tokens`` (B, T) as text (per-token entries extended alike)."""
    out = dict(inputs)
    out["input_ids"] = torch.cat([inputs["input_ids"], tokens], 1)
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(inputs["input_ids"]) if mask is None else mask
    out["attention_mask"] = torch.cat([mask, torch.ones_like(tokens)], 1)
    if "mm_token_type_ids" in inputs:
        out["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(tokens).int()], 1)
    return out


@torch.no_grad()
def early_exit(small: nn.Module, inputs: dict[str, Any], threshold: float = 0.9, keep: int | float = 0.05,
               max_new_tokens: int = 5) -> list[EarlyExit]:
    """Per item of the batch ``inputs``: whether the small model answers alone, and its answer."""
    inputs = guide_inputs(inputs)
    run = guide_answer(small, inputs, max_new_tokens)
    answered = run.answered.float()
    confidence = ((_token_log_probs(run.logits, run.tokens) * answered).sum(1) / answered.sum(1)).exp()
    chosen = scorers.top_indices(run.scores, scorers.resolve_keep(keep, run.scores.shape[1]))
    steps = run.tokens.shape[1]
    with apply(small, _GivenTokens(chosen)):
        logits = small(**with_answer(inputs, run.tokens), use_cache=False).logits[:, -steps - 1:-1]
    consistency = ((_token_log_probs(logits, run.tokens) * answered).sum(1)).exp()
    exits = (confidence + consistency) / 2 > threshold
    return [EarlyExit(bool(exits[i]), run.tokens[i][run.answered[i]].tolist(), float(confidence[i]),
                      float(consistency[i])) for i in range(run.tokens.shape[0])]
