"""Random: drop visual tokens uniformly at random, the same number at each pruning point (seeded)."""
from __future__ import annotations

import torch

from ...errors import VlmpruneError
from .. import scorers
from ..base import ModelPlan, Reduction, Site, SiteContext, TokenMethod


class Random(TokenMethod):
    """``random:keep=0.25,seed=0``: ``keep`` (count or fraction of the visual tokens) survive the last
    site. ``where=llm,layers=0`` (default: before the LLM) or e.g. ``where=vision,layers=3/6``; each
    site removes an equal share. Each forward draws from a generator seeded with ``seed``."""

    name = "random"

    def __init__(self, keep: int | float = 0.5, seed: int = 0, where: str = "llm", layers: int | list[int] = 0):
        if where not in ("llm", "vision"):
            raise VlmpruneError(f"random where={where!r}: choose llm or vision")
        scorers.resolve_keep(keep, 10**9)
        self.keep = keep
        self.seed = seed
        self.where = where
        self.layers = layers

    def sites(self, plan: ModelPlan) -> list[Site]:
        layers = self.layers if isinstance(self.layers, list) else [self.layers]
        if not all(isinstance(layer, int) for layer in layers):
            raise VlmpruneError(f"random layers={self.layers!r} must be integers, e.g. layers=2/4")
        self._sites = [Site(self.where, layer) for layer in sorted(set(layers))]
        return self._sites

    def reduce(self, ctx: SiteContext) -> Reduction:
        target = scorers.resolve_keep(self.keep, ctx.n_visual)
        count = scorers.count_after(self._sites, ctx.site, ctx.n_visual, target)
        generator = torch.Generator().manual_seed(self.seed + self._sites.index(ctx.site))
        batch, present = ctx.visual.shape
        scores = torch.rand(batch, present, generator=generator).to(ctx.visual.device)
        return Reduction(keep=scorers.top_indices(scores, count))
