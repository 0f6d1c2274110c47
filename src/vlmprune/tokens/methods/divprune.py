"""DivPrune: before the LLM, keep a maximally diverse subset of the projector outputs (greedy max-min
under cosine distance). Needs no attention and no [CLS], so it works for every family."""
from __future__ import annotations

from ..base import ModelPlan, Reduction, Site, SiteContext, TokenMethod
from .. import scorers


class DivPrune(TokenMethod):
    name = "divprune"

    def __init__(self, keep: int | float = 0.11):
        scorers.resolve_keep(keep, 10**9)  # a bad keep fails here, not in the forward
        self.keep = keep

    def sites(self, plan: ModelPlan) -> list[Site]:
        return [Site("llm", 0)]

    def reduce(self, ctx: SiteContext) -> Reduction:
        count = scorers.resolve_keep(self.keep, ctx.n_visual)
        return Reduction(keep=scorers.max_min_diverse(scorers.gather_tokens(ctx.hidden, ctx.visual), count))
