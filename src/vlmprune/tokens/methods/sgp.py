"""SGP: a small VLM of the same family answers the prompt; the visual tokens its attention fell on,
summed over its layers, heads, the prompt after the image and its answer, are the ones the large model
keeps from its layer ``layer`` on (original positions kept). See :mod:`vlmprune.tokens.guidance.sgp`."""
from __future__ import annotations

from typing import Any

import torch

from ...errors import VlmpruneError
from ..guidance.guided import GuidedMethod
from ..guidance.pairing import load_small, shape_only_copy
from ..guidance.sgp import guide_answer

DEFAULT_DEPTH = 0.3  # METHODS.md 2.1: prune at 0.3 of the LLM's depth unless layer= says otherwise


class SGP(GuidedMethod):
    """``sgp:keep=0.05,layer=2``: keep (count or fraction) at LLM layer ``layer`` (default: 0.3 of the
    depth; 0 prunes before the LLM); ``guide``: the small model's directory (default: the shipped
    toy-small for toy-large; a loaded model is taken as it is); ``max_new_tokens``: the guide's greedy
    answer length; ``share``: when the guide's vision tower holds the large model's weights, it reuses
    the large model's tower output (false: it runs its own)."""

    name = "sgp"
    default_layer_depth = DEFAULT_DEPTH

    def __init__(self, keep: int | float = 0.3, layer: int | None = None, guide: Any = None,
                 max_new_tokens: int = 5, share: bool = True):
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise VlmpruneError(f"sgp max_new_tokens={max_new_tokens!r} must be an integer >= 1")
        super().__init__(keep, layer, guide, share)
        self.max_new_tokens = max_new_tokens

    def small_model(self, large: Any):
        """The guide, loaded and checked against ``large`` on first use."""
        return self.guide_model(large)

    def shipped_guide(self) -> str:
        return "toy-small"

    def load_guide(self, location: str, device: torch.device):
        return load_small(location, device)

    def shape_only_guide(self, guide):
        return shape_only_copy(guide)

    def scores(self, guide, inputs: dict[str, Any]) -> torch.Tensor:
        return guide_answer(guide, inputs, self.max_new_tokens).scores
