"""VisionZip: dominant patches by [CLS] attention at the vision feature layer plus contextual tokens
merged by key similarity from the rest (54 + 10 of 64 in the paper: ``contextual`` defaults to the
same 10/64 share of ``keep``)."""
from __future__ import annotations

from ..base import Reduction, SiteContext
from ..kinds import FeatureLayerMethod
from .. import scorers
from ...errors import VlmpruneError


class VisionZip(FeatureLayerMethod):
    name = "visionzip"

    def __init__(self, keep: int | float = 0.11, contextual: int | float = 10 / 64):
        super().__init__(keep)
        self.contextual = contextual

    def reduce(self, ctx: SiteContext) -> Reduction:
        count = scorers.resolve_keep(self.keep, ctx.n_visual)
        contextual = round(self.contextual * count) if self.contextual < 1 else int(self.contextual)
        if not 0 <= contextual < count:
            raise VlmpruneError(f"visionzip contextual={self.contextual} leaves no dominant token of {count}: lower it")
        layer = ctx.site.layer - 1
        keep, hidden = scorers.visionzip_select(
            scorers.gather_tokens(ctx.hidden, ctx.visual), scorers.cls_attention(ctx, layer),
            scorers.gather_tokens(ctx.keys(layer), ctx.visual), count - contextual, contextual)
        return Reduction(keep=keep, hidden=hidden)
