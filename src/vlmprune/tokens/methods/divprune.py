"""DivPrune: before the LLM, keep a maximally diverse subset of the projector outputs (greedy max-min
under cosine distance). Needs no attention and no [CLS], so it works for every family."""
from __future__ import annotations

from ..base import Reduction, SiteContext
from ..kinds import BeforeLLMMethod
from .. import scorers


class DivPrune(BeforeLLMMethod):
    name = "divprune"

    def reduce(self, ctx: SiteContext) -> Reduction:
        count = scorers.resolve_keep(self.keep, ctx.n_visual)
        return Reduction(keep=scorers.max_min_diverse(scorers.gather_tokens(ctx.hidden, ctx.visual), count))
