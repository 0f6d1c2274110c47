"""FastV: at LLM layer K, keep the visual tokens the last prompt token attended to most at layer K-1."""
from __future__ import annotations

from ...errors import VlmpruneError
from .. import scorers
from ..base import ModelPlan, Reduction, Site, SiteContext, TokenMethod


class FastV(TokenMethod):
    """``fastv:layer=2,keep=0.5``: head-mean attention of the last prompt token at layer ``layer-1``
    ranks the visual tokens; the top ``keep`` (count or fraction) go on from layer ``layer``."""

    name = "fastv"

    def __init__(self, layer: int = 2, keep: int | float = 0.5):
        if not isinstance(layer, int) or layer < 1:
            raise VlmpruneError(f"fastv layer={layer!r} must be an integer >= 1 (it ranks by layer-1's attention)")
        scorers.resolve_keep(keep, 10**9)  # rejects keep <= 0 and non-numbers before any forward
        self.layer = layer
        self.keep = keep

    def sites(self, plan: ModelPlan) -> list[Site]:
        return [Site("llm", self.layer)]

    def recorded_layers(self, site: Site, plan: ModelPlan) -> list[int]:
        return [self.layer - 1]

    def reduce(self, ctx: SiteContext) -> Reduction:
        count = scorers.resolve_keep(self.keep, ctx.visual.shape[1])
        attention = scorers.row_attention(ctx, self.layer - 1, ctx.query)
        return Reduction(keep=scorers.top_indices(attention, count))
