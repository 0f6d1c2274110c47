"""EViT: keep the most [CLS]-attended patches and fuse the rest into one token, at every vision
pruning point (the fused token competes again at the next point)."""
from __future__ import annotations

from ..base import ModelPlan, Reduction, Site, SiteContext
from ..kinds import EveryVisionLayerMethod
from .. import scorers


class EViT(EveryVisionLayerMethod):
    name = "evit"

    def recorded_layers(self, site: Site, plan: ModelPlan) -> list[int]:
        return [site.layer - 1]

    def reduce(self, ctx: SiteContext) -> Reduction:
        count = self.count_after(ctx)
        attention = scorers.cls_attention(ctx, ctx.site.layer - 1)
        keep, hidden = scorers.evit_fuse(scorers.gather_tokens(ctx.hidden, ctx.visual), attention, count)
        return Reduction(keep=keep, hidden=hidden)
