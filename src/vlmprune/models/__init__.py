"""Model adapters: ``get_adapter(model)`` knows each supported family's module paths."""
from __future__ import annotations

from torch import nn

from ..errors import VlmpruneError
from .base import ModelAdapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .qwen2_vl import Qwen2_5_VLAdapter, Qwen2VLAdapter

ADAPTERS: dict[str, type[ModelAdapter]] = {
    "LlavaForConditionalGeneration": LlavaAdapter,
    "LlavaNextForConditionalGeneration": LlavaNextAdapter,
    "LlavaOnevisionForConditionalGeneration": LlavaOnevisionAdapter,
    "Qwen2VLForConditionalGeneration": Qwen2VLAdapter,
    "Qwen2_5_VLForConditionalGeneration": Qwen2_5_VLAdapter,
}

__all__ = ["get_adapter", "ModelAdapter", "ADAPTERS"]


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model`` (a ``*ForConditionalGeneration``), chosen by its class."""
    for cls in type(model).__mro__:
        if cls.__name__ in ADAPTERS:
            return ADAPTERS[cls.__name__](model)
    known = ", ".join(ADAPTERS)
    raise VlmpruneError(f"unsupported model class {type(model).__name__}; supported: {known}")
