"""Spatial pooling: bilinear resize of the square visual-token grid before the LLM.

Only square grids are produced, so the count is ``round(sqrt(keep))**2`` (the length is only roughly
controllable, as the IVTP paper notes). Each pooled token takes the position of the source token
nearest its cell centre."""
from __future__ import annotations

import math

from ..base import Reduction, SiteContext
from ..kinds import BeforeLLMMethod
from .. import scorers


class SpatialPooling(BeforeLLMMethod):
    name = "pooling"

    def reduce(self, ctx: SiteContext) -> Reduction:
        grid = scorers.square_grid(ctx.visual.shape[1])
        side = max(1, round(math.sqrt(scorers.resolve_keep(self.keep, ctx.n_visual))))
        keep, hidden = scorers.spatial_pool(scorers.gather_tokens(ctx.hidden, ctx.visual), grid, (side, side))
        return Reduction(keep=keep, hidden=hidden)
