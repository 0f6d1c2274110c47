"""ToMe: bipartite soft matching on the previous layer's keys at every vision pruning point, merging
``r`` tokens each time (r chosen so that ``keep`` tokens remain), with proportional attention sizes.

Our sites sit between layers, so the keys are those the previous layer computed (ToMe merges between
attention and MLP of the same layer; the matching metric is the same keys)."""
from __future__ import annotations

import torch

from ..base import ModelPlan, Reduction, Site, SiteContext
from ..kinds import EveryVisionLayerMethod
from .. import scorers


class ToMe(EveryVisionLayerMethod):
    name = "tome"

    def recorded_layers(self, site: Site, plan: ModelPlan) -> list[int]:
        return [site.layer - 1]

    def reduce(self, ctx: SiteContext) -> Reduction:
        count = self.count_after(ctx)
        tokens = scorers.gather_tokens(ctx.hidden, ctx.visual)
        metric = scorers.gather_tokens(ctx.keys(ctx.site.layer - 1), ctx.visual)
        sizes = ctx.sizes if ctx.sizes is not None else torch.ones(tokens.shape[:2], device=tokens.device)
        keep = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)
        while tokens.shape[1] > count:  # one matching merges at most half of the tokens
            r = min(tokens.shape[1] - count, tokens.shape[1] // 2)
            step, tokens, sizes = scorers.bipartite_soft_matching(metric, tokens, sizes, r)
            keep, metric = keep.gather(1, step), scorers.gather_tokens(metric, step)
        return Reduction(keep=keep, hidden=tokens, sizes=sizes)
