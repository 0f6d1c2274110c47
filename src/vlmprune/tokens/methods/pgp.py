"""PGP (posterior-guided pruning): a small VLM with LoRA and an information bottleneck reads the prompt
and the image once; the visual tokens whose posterior moved furthest from the prior (largest ``KL_i``)
are the ones the large model keeps, by default at its input. See :mod:`vlmprune.tokens.guidance.pgp`."""
from __future__ import annotations

from typing import Any

import torch

from ...errors import VlmpruneError
from .. import scorers
from ..base import ModelPlan, Reduction, Site, SiteContext, TokenMethod
from ..guidance.pairing import (guide_device, guide_location, is_shape_only, pair, shape_only_copy, spec_path,
                                spec_without_none)
from ..guidance.reuse import share_tower

SHIPPED_GUIDE = "toy-small-pgp"   # under toyworld/checkpoints: toy-small's adapters and module


class PGP(TokenMethod):
    """``pgp:keep=0.05``: keep (count or fraction) at LLM layer ``layer`` (default 0: before the LLM);
    ``share``: when the guide's vision tower holds the large model's weights, it reuses the large
    model's tower output (false: it runs its own, as the cost comparison needs);
    ``guide``: a directory written by ``vlmprune toy train-pgp`` (default: the shipped one for
    toy-large), or a loaded :class:`~vlmprune.tokens.guidance.pgp.PGPGuide`."""

    name = "pgp"

    def __init__(self, keep: int | float = 0.05, layer: int = 0, guide: Any = None, share: bool = True):
        scorers.resolve_keep(keep, 10**9)
        if not isinstance(layer, int) or layer < 0:
            raise VlmpruneError(f"pgp layer={layer!r} must be an LLM layer index >= 0")
        if not isinstance(share, bool):
            raise VlmpruneError(f"{self.name} share={share!r} must be true or false")
        guide = spec_path(guide)
        self.keep = keep
        self.layer = layer
        self.guide = guide if isinstance(guide, str) or guide is None else None
        self._guide: Any = None if self.guide is not None or guide is None else guide
        self.share = share
        self._paired = False
        self._shared_tower = False   # the pair's towers hold equal weights: the guide reuses the large one's output
        self._reuses: dict = {}
        self._shape_only: Any = None

    def sites(self, plan: ModelPlan) -> list[Site]:
        return [Site("llm", self.layer)]

    def guide_model(self, large: Any):
        """The trained guide, loaded and checked against ``large`` on first use."""
        from ..guidance.pgp import load_guide

        if self._guide is None:
            from ...toyworld import CHECKPOINTS
            location = guide_location(self.guide, large, self.name, str(CHECKPOINTS / SHIPPED_GUIDE))
            self._guide = load_guide(location, guide_device(large))
        if not self._paired:
            self._shared_tower = pair(self._guide.small, large).shared_tower
            self._paired = True
        return self._guide

    def runnable(self, large: Any):
        """The guide to run beside ``large`` (a weightless copy for a shape-only ``large``), set to
        reuse ``large``'s vision-tower output when the two towers hold equal weights."""
        guide = self.guide_model(large)
        if is_shape_only(large):
            if self._shape_only is None:
                from ..guidance.pgp import PGPGuide
                with torch.device("meta"):
                    self._shape_only = PGPGuide(shape_only_copy(guide.small), guide.settings).eval()
            guide = self._shape_only
        if self.share and self._shared_tower:
            share_tower(self._reuses, guide.small, large, self)
        return guide

    def prefill_starts(self, model: Any, inputs: dict[str, Any]) -> None:
        self.runnable(model)

    def spec(self) -> str:
        return spec_without_none(super().spec())

    def reduce(self, ctx: SiteContext) -> Reduction:
        guide = self.runnable(ctx.adapter.model)
        importance = guide.importance(ctx.inputs)
        count = scorers.resolve_keep(self.keep, ctx.n_visual)
        return Reduction(keep=scorers.top_indices(importance.to(ctx.hidden.device).gather(1, ctx.original), count))
