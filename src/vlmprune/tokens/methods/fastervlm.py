"""FasterVLM: keep the top patches by head-mean [CLS] attention at the vision feature layer, once,
before the projector."""
from __future__ import annotations

from ..base import ModelPlan, Reduction, Site, SiteContext, TokenMethod
from .. import scorers


class FasterVLM(TokenMethod):
    name = "fastervlm"

    def __init__(self, keep: int | float = 0.11):
        scorers.resolve_keep(keep, 10**9)  # a bad keep fails here, not in the forward
        self.keep = keep

    def sites(self, plan: ModelPlan) -> list[Site]:
        return scorers.vision_sites(plan, plan.vision_feature_layer + 1, self.name)

    def recorded_layers(self, site: Site, plan: ModelPlan) -> list[int]:
        return [site.layer - 1]

    def reduce(self, ctx: SiteContext) -> Reduction:
        count = scorers.resolve_keep(self.keep, ctx.n_visual)
        attention = scorers.cls_attention(ctx, ctx.site.layer - 1)
        return Reduction(keep=scorers.top_indices(attention, count))
