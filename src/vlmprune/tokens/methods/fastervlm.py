"""FasterVLM: keep the top patches by head-mean [CLS] attention at the vision feature layer, once,
before the projector."""
from __future__ import annotations

from ..base import Reduction, SiteContext
from ..kinds import FeatureLayerMethod
from .. import scorers


class FasterVLM(FeatureLayerMethod):
    name = "fastervlm"

    def reduce(self, ctx: SiteContext) -> Reduction:
        count = scorers.resolve_keep(self.keep, ctx.n_visual)
        attention = scorers.cls_attention(ctx, ctx.site.layer - 1)
        return Reduction(keep=scorers.top_indices(attention, count))
