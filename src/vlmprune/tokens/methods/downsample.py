"""Image downsampling: the vision tower sees a smaller image, so it makes fewer patch tokens.

How it fits the engine: at ``Site("vision", 0)`` (the input of the first encoder layer) the patch
tokens are replaced by those of the image resized to ``side x side`` patches (antialiased bilinear),
embedded by the tower's own patch embedding with bicubically interpolated position embeddings and
its pre-layer norm, exactly what the tower computes for a smaller input image. [CLS] is unchanged
(its embedding does not depend on the image). Each new token takes the slot of the original patch
nearest its cell centre, which fixes its place in the LLM sequence and on overlays. The tower comes
from the site context's model adapter. CLIP-family towers only; ``keep`` is rounded to a square,
``side**2``.
"""
from __future__ import annotations

import math

import torch.nn.functional as F

from ...errors import VlmpruneError
from ..base import ModelPlan, Reduction, Site, SiteContext
from ..kinds import BudgetMethod
from .. import scorers


class Downsample(BudgetMethod):
    name = "downsample"

    def sites(self, plan: ModelPlan) -> list[Site]:
        if plan.n_vision_layers == 0 or not plan.has_cls:
            raise VlmpruneError(f"downsample needs a CLIP-family vision tower, which {plan.family} lacks: "
                                "use pooling instead")
        return [Site("vision", 0)]

    def reduce(self, ctx: SiteContext) -> Reduction:
        grid = scorers.square_grid(ctx.n_visual)
        side = max(1, round(math.sqrt(scorers.resolve_keep(self.keep, ctx.n_visual))))
        tower = ctx.adapter.vision_transformer
        embeddings = tower.embeddings
        pixels = ctx.inputs["pixel_values"]
        size = side * embeddings.patch_size
        small = F.interpolate(pixels.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        tokens = tower.pre_layrnorm(embeddings(small.to(pixels.dtype), interpolate_pos_encoding=True))
        keep = scorers.cell_centres(grid, (side, side)).to(pixels.device).expand(pixels.shape[0], -1)
        return Reduction(keep=keep, hidden=tokens[:, 1:].to(ctx.hidden.dtype))
