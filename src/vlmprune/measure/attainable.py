"""What a token method's schedule can buy on this machine: the same sites and kept counts with picks
that cost nothing.

A FLOPs-ideal speedup assumes time falls with FLOPs; a pruned prompt's few rows run each matrix
product less efficiently, and work FLOPs do not count (activations, norms) stays. A
:class:`FreeSelection` replays the counts one prefill of a method kept at each of its sites, keeping
the first tokens present, with no q/k/v recorded and no scoring token: its speedup is what this
machine and the engine allow that schedule, and a method's speedup over it is the share its own
scoring leaves.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..tokens.base import ModelPlan, Reduction, Site, SiteContext, TokenMethod
from .latency import attached, last_logits_only


class FreeSelection(TokenMethod):
    """Keep ``counts[site]`` visual tokens at each site (the first ones present), at no cost."""

    name = "free"

    def __init__(self, counts: dict[Site, int]):
        self._counts = dict(counts)

    def sites(self, plan: ModelPlan) -> list[Site]:
        return list(self._counts)

    def reduce(self, ctx: SiteContext) -> Reduction:
        count = self._counts[ctx.site]
        return Reduction(keep=torch.arange(count, device=ctx.visual.device).expand(ctx.visual.shape[0], count))

    def spec(self) -> str:
        """The counts by site, for reports (not a registered method: ``from_spec`` does not take it)."""
        return "free:" + ",".join(f"{site.where}{site.layer}={count}" for site, count in self._counts.items())


def free_selection(model: nn.Module, inputs: dict[str, Any], method: TokenMethod) -> FreeSelection:
    """The :class:`FreeSelection` of the counts one prefill of ``inputs`` with ``method`` keeps at
    each of its sites (``method`` is left as it was)."""
    counts: dict[Site, int] = {}
    reduce, own = method.reduce, "reduce" in vars(method)

    def counting(ctx: SiteContext) -> Reduction:
        reduction = reduce(ctx)
        counts[ctx.site] = reduction.keep.shape[1]
        return reduction

    method.reduce = counting
    try:
        with attached(model, method), torch.no_grad():
            model(**inputs, use_cache=True, **last_logits_only(model))
    finally:
        if own:
            method.reduce = reduce
        else:
            del method.reduce
    return FreeSelection(counts)
