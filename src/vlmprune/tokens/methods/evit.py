"""EViT: keep the most [CLS]-attended patches and fuse the rest into one token, at every vision
pruning point (the fused token competes again at the next point)."""
from __future__ import annotations

from ..base import ModelPlan, Reduction, Site, SiteContext, TokenMethod
from .. import scorers


class EViT(TokenMethod):
    name = "evit"

    def __init__(self, keep: int | float = 0.11, every: int = 1):
        scorers.resolve_keep(keep, 10**9)  # a bad keep fails here, not in the forward
        self.keep = keep
        self.every = every
        self._sites: list[Site] = []

    def sites(self, plan: ModelPlan) -> list[Site]:
        self._sites = scorers.vision_sites(plan, self.every, self.name)
        return self._sites

    def recorded_layers(self, site: Site, plan: ModelPlan) -> list[int]:
        return [site.layer - 1]

    def reduce(self, ctx: SiteContext) -> Reduction:
        target = scorers.resolve_keep(self.keep, ctx.n_visual)
        count = scorers.count_after(self._sites, ctx.site, ctx.n_visual, target)
        attention = scorers.cls_attention(ctx, ctx.site.layer - 1)
        keep, hidden = scorers.evit_fuse(scorers.gather_tokens(ctx.hidden, ctx.visual), attention, count)
        return Reduction(keep=keep, hidden=hidden)
