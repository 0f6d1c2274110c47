"""SGP: a small VLM of the same family answers the prompt; the visual tokens its attention fell on,
summed over its layers, heads, the prompt after the image and its answer, are the ones the large model
keeps from its layer ``layer`` on (original positions kept). See :mod:`vlmprune.tokens.guidance.sgp`."""
from __future__ import annotations

from typing import Any

from ...errors import VlmpruneError
from .. import scorers
from ..base import ModelPlan, Reduction, Site, SiteContext, TokenMethod
from ..guidance.pairing import (guide_device, guide_location, is_shape_only, load_small, pair, shape_only_copy,
                                spec_path, spec_without_none)
from ..guidance.reuse import share_tower
from ..guidance.sgp import guide_answer

DEFAULT_DEPTH = 0.3  # METHODS.md 2.1: prune at 0.3 of the LLM's depth unless layer= says otherwise


class SGP(TokenMethod):
    """``sgp:keep=0.05,layer=2``: keep (count or fraction) at LLM layer ``layer`` (default: 0.3 of the
    depth; 0 prunes before the LLM); ``guide``: the small model's directory (default: the shipped
    toy-small for toy-large; a loaded model is taken as it is); ``max_new_tokens``: the guide's greedy
    answer length; ``share``: when the guide's vision tower holds the large model's weights, it reuses
    the large model's tower output (false: it runs its own)."""

    name = "sgp"

    def __init__(self, keep: int | float = 0.3, layer: int | None = None, guide: Any = None,
                 max_new_tokens: int = 5, share: bool = True):
        scorers.resolve_keep(keep, 10**9)
        if layer is not None and (not isinstance(layer, int) or layer < 0):
            raise VlmpruneError(f"sgp layer={layer!r} must be an LLM layer index >= 0")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise VlmpruneError(f"sgp max_new_tokens={max_new_tokens!r} must be an integer >= 1")
        if not isinstance(share, bool):
            raise VlmpruneError(f"{self.name} share={share!r} must be true or false")
        guide = spec_path(guide)
        self.keep = keep
        self.layer = layer
        self.guide = guide if isinstance(guide, str) or guide is None else None
        self.max_new_tokens = max_new_tokens
        self._small: Any = None if self.guide is not None or guide is None else guide
        self.share = share
        self._paired = False
        self._shared_tower = False   # the pair's towers hold equal weights: the guide reuses the large one's output
        self._reuses: dict = {}
        self._shape_only: Any = None

    def sites(self, plan: ModelPlan) -> list[Site]:
        layer = self.layer if self.layer is not None else round(DEFAULT_DEPTH * plan.n_llm_layers)
        return [Site("llm", layer)]

    def small_model(self, large: Any):
        """The guide, loaded and checked against ``large`` on first use."""
        if self._small is None:
            self._small = load_small(guide_location(self.guide, large, self.name, "toy-small"), guide_device(large))
        if not self._paired:
            self._shared_tower = pair(self._small, large).shared_tower
            self._paired = True
        return self._small

    def runnable(self, large: Any):
        """The guide to run beside ``large`` (a weightless copy for a shape-only ``large``), set to
        reuse ``large``'s vision-tower output when the two towers hold equal weights."""
        small = self.small_model(large)
        if is_shape_only(large):
            self._shape_only = self._shape_only or shape_only_copy(small)
            small = self._shape_only
        if self.share and self._shared_tower:
            share_tower(self._reuses, small, large, self)
        return small

    def prefill_starts(self, model: Any, inputs: dict[str, Any]) -> None:
        self.runnable(model)

    def spec(self) -> str:
        return spec_without_none(super().spec())

    def reduce(self, ctx: SiteContext) -> Reduction:
        small = self.runnable(ctx.adapter.model)
        scores = guide_answer(small, ctx.inputs, self.max_new_tokens).scores
        count = scorers.resolve_keep(self.keep, ctx.n_visual)
        return Reduction(keep=scorers.top_indices(scores.to(ctx.hidden.device).gather(1, ctx.original), count))
