"""TopK: drop the patches least cosine-similar to [CLS], the same number at every vision pruning point."""
from __future__ import annotations

from ..base import ModelPlan, Reduction, Site, SiteContext, TokenMethod
from .. import scorers


class TopK(TokenMethod):
    name = "topk"

    def __init__(self, keep: int | float = 0.11, every: int = 1):
        scorers.resolve_keep(keep, 10**9)  # a bad keep fails here, not in the forward
        self.keep = keep
        self.every = every
        self._sites: list[Site] = []

    def sites(self, plan: ModelPlan) -> list[Site]:
        self._sites = scorers.vision_sites(plan, self.every, self.name)
        return self._sites

    def reduce(self, ctx: SiteContext) -> Reduction:
        target = scorers.resolve_keep(self.keep, ctx.n_visual)
        count = scorers.count_after(self._sites, ctx.site, ctx.n_visual, target)
        patches = scorers.gather_tokens(ctx.hidden, ctx.visual)
        similarity = scorers.cosine_to(patches, ctx.hidden[:, ctx.cls])
        return Reduction(keep=scorers.top_indices(similarity, count))
