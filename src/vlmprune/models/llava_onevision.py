"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): SigLIP tiles, packing, Qwen2 LLM."""
from __future__ import annotations

from .llava_next import LlavaNextAdapter


class LlavaOnevisionAdapter(LlavaNextAdapter):
    family = "llava_onevision"
