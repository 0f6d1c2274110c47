"""The token method a small guide model drives (SGP, PGP): one place for what they share.

The guide is loaded on first use (the shipped one for toy-large unless ``guide=`` names another),
checked against the large model (:func:`.pairing.pair`), given the large model's vision-tower output
when the two towers hold equal weights (``share``, :mod:`.reuse`), and replaced by a weightless copy
for a shape-only (FLOP-counting) forward. A subclass says how a guide loads, what its weightless copy
is, and how it scores the visual tokens; the large model keeps the top ``keep`` at LLM layer ``layer``.
"""
from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch
from torch import nn

from ...errors import VlmpruneError
from .. import scorers
from ..base import ModelPlan, Reduction, Site, SiteContext, TokenMethod
from .pairing import guide_device, guide_location, is_shape_only, pair, spec_path, spec_without_none
from .reuse import share_tower


class GuidedMethod(TokenMethod):
    """``keep`` (count or fraction) at LLM layer ``layer``; ``guide``: a path, or a loaded guide taken
    as it is; ``share``: reuse the large model's tower output when the towers hold equal weights."""

    default_layer_depth: float | None = None   # layer=None: this share of the LLM's depth

    def __init__(self, keep: int | float, layer: int | None, guide: Any, share: bool):
        scorers.resolve_keep(keep, 10**9)
        if layer is not None and (not isinstance(layer, int) or layer < 0):
            raise VlmpruneError(f"{self.name} layer={layer!r} must be an LLM layer index >= 0")
        if not isinstance(share, bool):
            raise VlmpruneError(f"{self.name} share={share!r} must be true or false")
        guide = spec_path(guide)
        self.keep, self.layer, self.share = keep, layer, share
        self.guide = guide if isinstance(guide, str) or guide is None else None
        self._guide: Any = None if self.guide is not None or guide is None else guide
        self._paired = False
        self._shared_tower = False   # the pair's towers hold equal weights: the guide reuses the large one's output
        self._reuses: dict = {}
        self._shape_only: Any = None

    # -- what a guided method defines ---------------------------------------------------------------
    @abstractmethod
    def shipped_guide(self) -> str:
        """Where the guide for toy-large lies (a path or a shipped toy name)."""

    @abstractmethod
    def load_guide(self, location: str, device: torch.device) -> Any:
        """The guide stored at ``location``, on ``device``, in eval mode."""

    def guide_small(self, guide: Any) -> nn.Module:
        """The small VLM inside ``guide`` (the one paired with the large model)."""
        return guide

    @abstractmethod
    def shape_only_guide(self, guide: Any) -> Any:
        """A weightless copy of ``guide`` for a shape-only forward of the large model."""

    @abstractmethod
    def scores(self, guide: Any, inputs: dict[str, Any]) -> torch.Tensor:
        """(B, V) importance of each visual token, in image order."""

    # -- shared -------------------------------------------------------------------------------------
    def sites(self, plan: ModelPlan) -> list[Site]:
        layer = self.layer if self.layer is not None else round(self.default_layer_depth * plan.n_llm_layers)
        return [Site("llm", layer)]

    def guide_model(self, large: Any) -> Any:
        """The guide, loaded and checked against ``large`` on first use."""
        if self._guide is None:
            location = guide_location(self.guide, large, self.name, self.shipped_guide())
            self._guide = self.load_guide(location, guide_device(large))
        if not self._paired:
            self._shared_tower = pair(self.guide_small(self._guide), large).shared_tower
            self._paired = True
        return self._guide

    def runnable(self, large: Any) -> Any:
        """The guide to run beside ``large`` (a weightless copy for a shape-only ``large``), set to
        reuse ``large``'s vision-tower output when the two towers hold equal weights."""
        guide = self.guide_model(large)
        if is_shape_only(large):
            self._shape_only = self._shape_only or self.shape_only_guide(guide)
            guide = self._shape_only
        if self.share and self._shared_tower:
            share_tower(self._reuses, self.guide_small(guide), large, self)
        return guide

    def prefill_starts(self, model: Any, inputs: dict[str, Any]) -> None:
        self.runnable(model)

    def spec(self) -> str:
        return spec_without_none(super().spec())

    def reduce(self, ctx: SiteContext) -> Reduction:
        importance = self.scores(self.runnable(ctx.adapter.model), ctx.inputs)
        count = scorers.resolve_keep(self.keep, ctx.n_visual)
        return Reduction(keep=scorers.top_indices(importance.to(ctx.hidden.device).gather(1, ctx.original), count))
