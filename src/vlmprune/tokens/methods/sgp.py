"""SGP: a small VLM of the same family answers the prompt; the visual tokens its attention fell on,
summed over its layers, heads, the prompt after the image and its answer, are the ones the large model
keeps from its layer ``layer`` on (original positions kept). See :mod:`vlmprune.tokens.guidance.sgp`."""
from __future__ import annotations

from typing import Any

from ...errors import VlmpruneError
from .. import scorers
from ..base import ModelPlan, Reduction, Site, SiteContext, TokenMethod
from ..guidance.pairing import guide_device, guide_location, spec_path, load_small, pair, shape_only_copy
from ..guidance.sgp import guide_answer

DEFAULT_DEPTH = 0.3  # METHODS.md 2.1: prune at 0.3 of the LLM's depth unless layer= says otherwise


class SGP(TokenMethod):
    """``sgp:keep=0.05,layer=2``: keep (count or fraction) at LLM layer ``layer`` (default: 0.3 of the
    depth; 0 prunes before the LLM); ``guide``: the small model's directory (default: the shipped
    toy-small for toy-large; a loaded model is taken as it is); ``max_new_tokens``: the guide's greedy
    answer length."""

    name = "sgp"

    def __init__(self, keep: int | float = 0.3, layer: int | None = None, guide: Any = None,
                 max_new_tokens: int = 5):
        scorers.resolve_keep(keep, 10**9)
        if layer is not None and (not isinstance(layer, int) or layer < 0):
            raise VlmpruneError(f"sgp layer={layer!r} must be an LLM layer index >= 0")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise VlmpruneError(f"sgp max_new_tokens={max_new_tokens!r} must be an integer >= 1")
        guide = spec_path(guide)
        self.keep = keep
        self.layer = layer
        self.guide = guide if isinstance(guide, str) or guide is None else None
        self.max_new_tokens = max_new_tokens
        self._small: Any = None if self.guide is not None or guide is None else guide
        self._paired = False
        self._shape_only: Any = None

    def sites(self, plan: ModelPlan) -> list[Site]:
        layer = self.layer if self.layer is not None else round(DEFAULT_DEPTH * plan.n_llm_layers)
        return [Site("llm", layer)]

    def small_model(self, large: Any):
        """The guide, loaded and checked against ``large`` on first use."""
        if self._small is None:
            self._small = load_small(guide_location(self.guide, large, self.name, "toy-small"), guide_device(large))
        if not self._paired:
            pair(self._small, large)
            self._paired = True
        return self._small

    def reduce(self, ctx: SiteContext) -> Reduction:
        small = self.small_model(ctx.adapter.model)
        if ctx.hidden.is_meta:
            self._shape_only = self._shape_only or shape_only_copy(small)
            small = self._shape_only
        scores = guide_answer(small, ctx.inputs, self.max_new_tokens).scores
        count = scorers.resolve_keep(self.keep, ctx.n_visual)
        return Reduction(keep=scorers.top_indices(scores.to(ctx.hidden.device).gather(1, ctx.original), count))
