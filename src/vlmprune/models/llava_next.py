"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): any-resolution tiles packed with newline tokens.

Visual tokens reach the LLM after packing, so in-encoder pruning is not offered here (the tiles of
one image are separate encoder sequences); pruning starts at ``Site("llm", 0)``.
"""
from __future__ import annotations

from typing import Any

from .base import ClipTowerMixin, ModelAdapter


class LlavaNextAdapter(ClipTowerMixin, ModelAdapter):
    family = "llava_next"

    def __init__(self, model):
        super().__init__(model)
        self.vision_tower = self.core.vision_tower
        self.projector = self.core.multi_modal_projector
        self.vision_layers = None
        self.vision_feature_layer = self._feature_layer_index()

    def patch_grid(self, inputs: dict[str, Any]) -> tuple[int, int]:
        cfg = self.model.config.vision_config
        side = cfg.image_size // cfg.patch_size
        return side, side
