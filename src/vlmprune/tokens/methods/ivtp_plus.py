"""IVTP+ (not in the paper): IVTP's ranking for part of the budget, spatial coverage for the rest.

IVTP keeps what the question points at (its significance to [CLS] in the ViT, to the pseudo-[CLS] in
the LLM), several tokens per salient object; a count needs one token on every object and a relation
the neighbours of both. So at each pruning site IVTP+ keeps the ``relevant`` share of that site's
count by IVTP's score and fills the rest by farthest-point sampling on the patch grid: each next token
is the one whose original grid cell is farthest (Euclidean, in cells) from every token kept so far.
``relevant=1.0`` is IVTP. Everything else (sites, budget, pseudo-[CLS], settings) is IVTP's.

Options not in IVTP (defaults keep the above): ``at`` moves the whole budget to one selection:
``input`` selects once before the LLM on the projector outputs, ``feature`` once at the output of the
vision layer the LLM reads (before the projector); neither prunes inside the ViT or the LLM, and the
relevance is IVTP's vision score (the [CLS] rollout row of the last ViT group times the value norms)
at the feature layer. ``fill=diverse`` fills the rest of the count by DivPrune's greedy max-min
cosine distance on the site's features, started from the relevant tokens, instead of the grid.
``merge=mean`` averages every dropped token into the kept token most similar to it (cosine on the
site's features) instead of discarding it.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from ...errors import VlmpruneError
from ..base import ModelPlan, Reduction, Site, SiteContext
from .. import scorers
from .ivtp import IVTP

SPREAD_AT = ("all", "last")
AT = ("sites", "input", "feature")
FILLS = ("grid", "diverse")
MERGES = ("drop", "mean")


def farthest_points(cells: torch.Tensor, chosen: torch.Tensor, count: int) -> torch.Tensor:
    """Greedy farthest-point sampling. ``cells``: (B, V, 2) distinct grid coordinates of the candidates;
    ``chosen``: (B, c) indices already kept (c >= 1). Returns (B, count) more indices, each the
    candidate farthest from its nearest kept one (ties to the lower index); a kept token is at
    distance 0 from itself, so it is never picked again while ``count`` <= V - c."""
    return scorers.farthest_from(torch.cdist(cells.float(), cells.float()), chosen, count)


class IVTPPlus(IVTP):
    """``ivtp_plus:keep=0.11,relevant=0.5``: every IVTP setting, plus ``relevant`` (default 0.5, in
    (0, 1]: the share of each site's count kept by IVTP's score, at least one token) and ``spread_at``
    (default ``all``: every pruning site splits its count; ``last``: only the last site, the earlier
    ones are IVTP's). ``at`` (default ``sites``: IVTP's sites; ``input``: one selection before the LLM;
    ``feature``: one at the feature layer's output), ``fill`` (default ``grid``: farthest points on the
    patch grid; ``diverse``: max-min cosine on the features) and ``merge`` (default ``drop``: discard them; ``mean``:
    dropped tokens are averaged into their most similar kept token; only with ``at`` input or
    feature). ``fill=grid`` needs a square patch grid; ``at`` input or feature needs a tower with [CLS]."""

    name = "ivtp_plus"

    def __init__(self, keep: int | float = 0.11, relevant: float = 0.5, spread_at: str = "all", at: str = "sites",
                 fill: str = "grid", merge: str = "drop", **ivtp_settings):
        super().__init__(keep=keep, **ivtp_settings)
        if isinstance(relevant, bool) or not isinstance(relevant, (int, float)) or not 0 < relevant <= 1:
            raise VlmpruneError(f"ivtp_plus relevant={relevant!r} must be a share in (0, 1]")
        if spread_at not in SPREAD_AT:
            raise VlmpruneError(f"ivtp_plus spread_at={spread_at!r}; choose one of: {', '.join(SPREAD_AT)}")
        if at not in AT:
            raise VlmpruneError(f"ivtp_plus at={at!r}; choose one of: {', '.join(AT)}")
        if fill not in FILLS:
            raise VlmpruneError(f"ivtp_plus fill={fill!r}; choose one of: {', '.join(FILLS)}")
        if merge not in MERGES:
            raise VlmpruneError(f"ivtp_plus merge={merge!r}; choose one of: {', '.join(MERGES)}")
        if merge != "drop" and at == "sites":
            raise VlmpruneError(f"ivtp_plus merge={merge} needs one selection: use at=input or at=feature")
        self.relevant, self.spread_at = float(relevant), spread_at
        self.at, self.fill, self.merge = at, fill, merge
        self._sites: list[Site] = []

    def spec(self) -> str:
        """IVTP's SPEC with the options not in it left out at their defaults (journals key runs by it)."""
        name, _, settings = super().spec().partition(":")
        return name + ":" + ",".join(s for s in settings.split(",") if s not in ("at=sites", "fill=grid", "merge=drop"))

    # -- one selection (at=input / at=feature) -------------------------------------------------
    def sites(self, plan: ModelPlan) -> list[Site]:
        if self.at == "sites":
            return super().sites(plan)
        if plan.n_vision_layers == 0 or not plan.has_cls:
            raise VlmpruneError(f"ivtp_plus at={self.at} ranks by the tower's [CLS], which {plan.family} lacks")
        self._vit_sites, self._llm_sites = [], []          # no IVTP stage: no pseudo-[CLS] either
        feature = Site("vision", plan.vision_feature_layer + 1)
        self._sites = [feature] if self.at == "feature" else [feature, Site("llm", 0)]
        return self._sites

    def recorded_layers(self, site: Site, plan: ModelPlan) -> list[int]:
        if self.at == "sites":
            return super().recorded_layers(site, plan)
        if site.where == "llm":
            return []
        ends = scorers.group_ends(site.layer, site.layer if self.group == "all" else self.group)
        return list(range(ends[-2] if len(ends) > 1 else 0, site.layer))   # the last ViT group's layers

    def reduce(self, ctx: SiteContext) -> Reduction:
        if self.at == "sites":
            return super().reduce(ctx)
        if ctx.site.where == "vision":
            score = self.significance(ctx, self.recorded_layers(ctx.site, None))
            if self.at == "input":      # prunes nothing here: the score waits for the projector outputs
                ctx.state["relevance"] = score
                return Reduction(keep=torch.arange(ctx.visual.shape[1], device=ctx.visual.device).expand_as(ctx.visual))
        else:
            score = ctx.state.pop("relevance")
        count = scorers.resolve_keep(self.keep, ctx.n_visual)
        keep = self.select(ctx, score, count)
        if self.merge == "drop":
            return Reduction(keep=keep)
        return Reduction(keep=keep, hidden=merge_into_kept(scorers.gather_tokens(ctx.hidden, ctx.visual), keep))

    def select(self, ctx: SiteContext, score: torch.Tensor, count: int) -> torch.Tensor:
        last = self._sites[-1] if self.at != "sites" else (self._llm_sites or self._vit_sites)[-1]
        if self.spread_at == "last" and ctx.site != last:
            return super().select(ctx, score, count)
        relevant = max(1, round(self.relevant * count))
        chosen = scorers.top_indices(score, relevant)
        if self.fill == "diverse":   # DivPrune's cosine distance (a matmul, so the FLOP count sees it)
            distance = scorers.cosine_distance(scorers.gather_tokens(ctx.hidden, ctx.visual))
            extra = scorers.farthest_from(distance, chosen, count - relevant)
        else:
            side = scorers.square_grid(ctx.n_visual)[1]
            extra = farthest_points(torch.stack([ctx.original // side, ctx.original % side], dim=-1), chosen,
                                    count - relevant)
        return torch.cat([chosen, extra], dim=1)


def merge_into_kept(tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B, V, D) tokens and (B, k) kept indices -> (B, k, D): each kept token's mean with the dropped
    tokens whose most cosine-similar kept token it is (a kept token is its own nearest)."""
    normed = F.normalize(tokens.float(), dim=-1)
    kept = scorers.gather_tokens(normed, keep)                                        # (B, k, D)
    nearest = (normed @ kept.transpose(1, 2)).argmax(-1)                              # (B, V)
    nearest = nearest.scatter(1, keep, torch.arange(keep.shape[1], device=keep.device).expand_as(keep))
    assign = F.one_hot(nearest, keep.shape[1]).to(tokens.dtype)                       # (B, V, k)
    return (assign.transpose(1, 2) @ tokens) / assign.sum(1)[..., None]


# SPEC checks and the command line's catalogue read a method's settings from its signature: IVTP's and the two above
IVTPPlus.__signature__ = inspect.signature(IVTP).replace(parameters=[
    *inspect.signature(IVTP).parameters.values(),
    *(parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY)
      for name, parameter in inspect.signature(IVTPPlus.__init__).parameters.items() if name in ("relevant", "spread_at", "at", "fill", "merge"))])
