"""TopK: drop the patches least cosine-similar to [CLS], the same number at every vision pruning point."""
from __future__ import annotations

from ..base import Reduction, SiteContext
from ..kinds import EveryVisionLayerMethod
from .. import scorers


class TopK(EveryVisionLayerMethod):
    name = "topk"

    def reduce(self, ctx: SiteContext) -> Reduction:
        count = self.count_after(ctx)
        patches = scorers.gather_tokens(ctx.hidden, ctx.visual)
        similarity = scorers.cosine_to(patches, ctx.hidden[:, ctx.cls])
        return Reduction(keep=scorers.top_indices(similarity, count))
