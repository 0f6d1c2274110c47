"""Base classes for the common shapes of token method, so a method file holds only its scoring.

``BudgetMethod`` checks ``keep`` when the method is built (a bad budget fails before any forward);
the three subclasses fix where such a method prunes.
"""
from __future__ import annotations

from . import scorers
from .base import ModelPlan, Site, SiteContext, TokenMethod


class BudgetMethod(TokenMethod):
    """A method configured by a ``keep`` budget (count or fraction of the visual tokens)."""

    def __init__(self, keep: int | float = 0.11):
        scorers.resolve_keep(keep, 10**9)  # a bad keep fails here, not in the forward
        self.keep = keep


class BeforeLLMMethod(BudgetMethod):
    """Prunes once, on the projector outputs before the first LLM layer (every family has this site)."""

    def sites(self, plan: ModelPlan) -> list[Site]:
        return [Site("llm", 0)]


class FeatureLayerMethod(BudgetMethod):
    """Prunes once, after the vision layer the LLM reads, from that layer's recorded attention."""

    def sites(self, plan: ModelPlan) -> list[Site]:
        return scorers.vision_sites(plan, plan.vision_feature_layer + 1, self.name)

    def recorded_layers(self, site: Site, plan: ModelPlan) -> list[int]:
        return [site.layer - 1]


class EveryVisionLayerMethod(BudgetMethod):
    """Prunes after every ``every`` vision layers up to the one the LLM reads, removing the same number
    of tokens each time so that ``keep`` remain after the last site."""

    def __init__(self, keep: int | float = 0.11, every: int = 1):
        super().__init__(keep)
        self.every = every
        self._sites: list[Site] = []

    def sites(self, plan: ModelPlan) -> list[Site]:
        self._sites = scorers.vision_sites(plan, self.every, self.name)
        return self._sites

    def count_after(self, ctx: SiteContext) -> int:
        """Visual tokens this site leaves."""
        target = scorers.resolve_keep(self.keep, ctx.n_visual)
        return scorers.count_after(self._sites, ctx.site, ctx.n_visual, target)
