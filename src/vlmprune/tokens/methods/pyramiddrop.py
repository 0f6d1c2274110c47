"""PyramidDrop: after the LLM layers at 1/4, 1/2 and 3/4 depth keep ``ratio`` of the visual tokens
left, ranked by the last instruction token's attention in the layer before.

``keep`` (optional) sets the final count instead: then ``ratio = (keep / n_visual) ** (1 / 3)``."""
from __future__ import annotations

from ..base import ModelPlan, Reduction, Site, SiteContext, TokenMethod
from .. import scorers
from ...errors import VlmpruneError


class PyramidDrop(TokenMethod):
    name = "pyramiddrop"

    def __init__(self, ratio: float = 0.5, keep: int | float | None = None):
        if not 0 < ratio <= 1:
            raise VlmpruneError(f"pyramiddrop ratio={ratio} must be in (0, 1]")
        if keep is not None:
            scorers.resolve_keep(keep, 10**9)
        self.ratio = ratio
        self.keep = keep
        self._sites: list[Site] = []

    def sites(self, plan: ModelPlan) -> list[Site]:
        layers = sorted({max(1, round(plan.n_llm_layers * q / 4)) for q in (1, 2, 3)})
        self._sites = [Site("llm", layer) for layer in layers]
        return self._sites

    def recorded_layers(self, site: Site, plan: ModelPlan) -> list[int]:
        return [site.layer - 1]

    def _count_after(self, stage: int, n_visual: int) -> int:
        if self.keep is None:
            return max(1, round(n_visual * self.ratio ** (stage + 1)))
        target = scorers.resolve_keep(self.keep, n_visual)
        if stage == len(self._sites) - 1:
            return target
        return max(target, round(n_visual * (target / n_visual) ** ((stage + 1) / len(self._sites))))

    def reduce(self, ctx: SiteContext) -> Reduction:
        count = self._count_after(self._sites.index(ctx.site), ctx.n_visual)
        attention = scorers.row_attention(ctx, ctx.site.layer - 1, ctx.query)
        return Reduction(keep=scorers.top_indices(attention, min(count, ctx.visual.shape[1])))
