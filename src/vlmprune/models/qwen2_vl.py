"""Qwen2-VL and Qwen2.5-VL: native-resolution ViT with 2x2 patch merger, mRoPE in the LLM.

The merger's outputs are the visual tokens; there is no [CLS]. The LLM's rotary embedding is 3-D
(temporal, height, width), which the engine handles by gathering the cos/sin the model computed.
"""
from __future__ import annotations

from typing import Any

from .base import ModelAdapter


class Qwen2VLAdapter(ModelAdapter):
    family = "qwen2_vl"

    def __init__(self, model):
        super().__init__(model)
        self.vision_tower = self.core.visual
        self.projector = self.core.visual.merger
        self.vision_layers = None
        self.vision_feature_layer = len(self.core.visual.blocks) - 1
        self.has_cls = False

    def patch_grid(self, inputs: dict[str, Any]) -> tuple[int, int]:
        _, h, w = (int(x) for x in inputs["image_grid_thw"][0])
        merge = self.model.config.vision_config.spatial_merge_size
        return h // merge, w // merge


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    family = "qwen2_5_vl"
