"""Image downsampling: the vision tower sees a smaller image, so it makes fewer patch tokens.

How it fits the engine: at ``Site("vision", 0)`` (the input of the first encoder layer) the patch
tokens are replaced by those of the image resized to ``side x side`` patches (antialiased bilinear),
embedded by the tower's own patch embedding with bicubically interpolated position embeddings and
its pre-layer norm, exactly what the tower computes for a smaller input image. [CLS] is unchanged
(its embedding does not depend on the image). Each new token takes the slot of the original patch
nearest its cell centre, which fixes its place in the LLM sequence and on overlays. The engine hands
a method the model only in :meth:`scoring_token` (no scoring token is inserted here), and
``generate`` encodes the image before that call; then the tower is found through the engine that
holds this method. CLIP-family towers only; ``keep`` is rounded to a square, ``side**2``.
"""
from __future__ import annotations

import gc
import math
from typing import Any

import torch
from torch import nn
import torch.nn.functional as F

from ...errors import VlmpruneError
from ..base import ModelPlan, Reduction, Site, SiteContext, TokenMethod
from .. import scorers


class Downsample(TokenMethod):
    name = "downsample"

    def __init__(self, keep: int | float = 0.11):
        scorers.resolve_keep(keep, 10**9)
        self.keep = keep
        self._tower: Any = None

    def sites(self, plan: ModelPlan) -> list[Site]:
        if plan.n_vision_layers == 0 or not plan.has_cls:
            raise VlmpruneError(f"downsample needs a CLIP-family vision tower, which {plan.family} lacks: "
                                "use pooling instead")
        return [Site("vision", 0)]

    def scoring_token(self, model: Any, inputs: dict[str, Any]) -> None:
        self._bind(model)
        return None

    def _bind(self, model: Any) -> None:
        from ...models import get_adapter
        tower = get_adapter(model).vision_tower
        self._tower = getattr(tower, "vision_model", tower)

    def _applied_model(self) -> Any:
        """The model this method is applied to: the engine's attributes hold it next to this method."""
        for holder in gc.get_referrers(self):
            if getattr(holder, "method", None) is self and isinstance(getattr(holder, "model", None), nn.Module):
                return holder.model
        raise VlmpruneError("downsample is not applied to a model: use vlmprune.tokens.apply(model, method)")

    def reduce(self, ctx: SiteContext) -> Reduction:
        grid = scorers.square_grid(ctx.n_visual)
        side = max(1, round(math.sqrt(scorers.resolve_keep(self.keep, ctx.n_visual))))
        if self._tower is None:
            self._bind(self._applied_model())
        embeddings = self._tower.embeddings
        pixels = ctx.inputs["pixel_values"]
        size = side * embeddings.patch_size
        small = F.interpolate(pixels.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        tokens = self._tower.pre_layrnorm(embeddings(small.to(pixels.dtype), interpolate_pos_encoding=True))
        keep = scorers.cell_centres(grid, (side, side)).to(pixels.device).expand(pixels.shape[0], -1)
        return Reduction(keep=keep, hidden=tokens[:, 1:].to(ctx.hidden.dtype))
