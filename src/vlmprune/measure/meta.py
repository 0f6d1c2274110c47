"""Running a full-size model without weights: parameters and activations on the ``meta`` device,
integer bookkeeping (token ids, image grids, masks) kept real on the CPU.

A pure ``meta`` forward fails wherever a model reads a value into Python (placeholder checks,
Qwen's rotary index, window splits); those values only ever depend on the inputs, never on the
weights. :class:`ShapeOnlyMode` therefore keeps integer and boolean tensors on the CPU, and moves a
CPU tensor to ``meta`` only when an operation mixes it with ``meta`` tensors. FLOPs depend on shapes
alone, so counting on such a model is exact.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForImageTextToText

from ..models.presets import Preset


def _is_meta(value) -> bool:
    return isinstance(value, torch.Tensor) and value.device.type == "meta"


def _to_meta(value):
    if isinstance(value, torch.Tensor):
        return value.to("meta") if value.device.type != "meta" and value.dim() > 0 else value
    if isinstance(value, (list, tuple)):
        return type(value)(_to_meta(item) for item in value)
    return value


def _touches_meta(values) -> bool:
    """Whether any argument (or a tensor in a list argument) is on ``meta``; a flat scan, since
    this runs for every operation and aten arguments nest at most one level."""
    for value in values:
        if _is_meta(value) or (isinstance(value, (list, tuple)) and any(_is_meta(item) for item in value)):
            return True
    return False


class ShapeOnlyMode(TorchDispatchMode):
    """Integer/boolean tensors stay real on the CPU; anything that touches ``meta`` becomes ``meta``."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and not _is_meta(args[0]) and not args[0].is_floating_point():
            device = kwargs.get("device")
            if device is not None and torch.device(device).type == "meta":
                return func(*args, **{k: v for k, v in kwargs.items() if k != "device"})
        if _touches_meta(args) or _touches_meta(kwargs.values()):
            args = tuple(_to_meta(value) for value in args)
            kwargs = {key: _to_meta(value) for key, value in kwargs.items()}
        return func(*args, **kwargs)


def build_meta_model(preset: Preset) -> nn.Module:
    """The preset's ``*ForConditionalGeneration`` with every parameter on ``meta`` (no memory, no init)."""
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(preset.config)
    return model.eval()


def counting_inputs(preset: Preset, text_tokens: int) -> dict[str, torch.Tensor]:
    """One prompt: the image's visual tokens followed by ``text_tokens`` text tokens, with pixel
    values on ``meta`` in the family's layout and the integer inputs on the CPU."""
    config, geometry = preset.config, preset.geometry
    height, width = preset.image_size
    vision = config.vision_config
    input_ids = torch.cat([torch.full((1, geometry.llm_tokens), config.image_token_id),
                           torch.ones(1, text_tokens, dtype=torch.long)], dim=1)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if preset.family in ("qwen2_vl", "qwen2_5_vl"):
        rows, cols = geometry.patch_grid
        width_in = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
        inputs["pixel_values"] = torch.empty(rows * cols, width_in, device="meta")
        inputs["image_grid_thw"] = torch.tensor([[1, rows, cols]])
        inputs["mm_token_type_ids"] = (input_ids == config.image_token_id).int()
    elif preset.family == "llava":
        inputs["pixel_values"] = torch.empty(1, 3, height, width, device="meta")
    else:
        side = vision.image_size
        inputs["pixel_values"] = torch.empty(1, geometry.crops, 3, side, side, device="meta")
        inputs["image_sizes"] = torch.tensor([[height, width]])
    return inputs
