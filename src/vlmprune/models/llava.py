"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP tower with [CLS], MLP projector, Llama."""
from __future__ import annotations

from typing import Any

from .base import ClipTowerMixin, ModelAdapter


class LlavaAdapter(ClipTowerMixin, ModelAdapter):
    family = "llava"

    def __init__(self, model):
        super().__init__(model)
        self.vision_tower = self.core.vision_tower
        self.projector = self.core.multi_modal_projector
        self.vision_layers = self._prunable_tower_layers()
        self.vision_feature_layer = self._feature_layer_index()

    def patch_grid(self, inputs: dict[str, Any]) -> tuple[int, int]:
        cfg = self.model.config.vision_config
        side = cfg.image_size // cfg.patch_size
        return side, side
