"""Tiny random-weight models of the five supported classes, and valid inputs for them.

Tests (and anyone checking an engine change) need every family at a size that runs in milliseconds,
without a processor or a download. ``make_inputs`` lays out prompts the way each processor would:
the right number of image placeholder tokens (including LLaVA-NeXT/OneVision packing and the
Qwen merger), ``pixel_values`` in each family's layout, and a left-padded batch.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    SiglipVisionConfig,
)
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from ..errors import VlmpruneError

FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl")

VOCAB = 128
PAD, BOS = 0, 1
IMAGE_TOKEN = 127
VIDEO_TOKEN, VISION_START, VISION_END = 126, 125, 124
TEXT_TOKENS = (2, 100)          # ordinary text ids are drawn from this range

_TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
             pad_token_id=PAD, bos_token_id=BOS, eos_token_id=2)
_TILE = 28                      # LLaVA-NeXT/OneVision tile side (px); 14 px patches -> 2x2 per tile
_PINPOINTS = [[28, 56], [56, 28], [56, 56]]


def _config(family: str, text: dict, vision: dict, top: dict):
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                 image_size=_TILE, patch_size=14)
    if family == "llava":
        return LlavaConfig(**{
            "vision_config": CLIPVisionConfig(**{**tower, "num_hidden_layers": 4, "patch_size": 7, **vision}),
            "text_config": LlamaConfig(**{**_TEXT, **text}), "image_token_id": IMAGE_TOKEN,
            "vision_feature_layer": -2, "vision_feature_select_strategy": "default", **top})
    if family == "llava_next":
        return LlavaNextConfig(**{
            "vision_config": CLIPVisionConfig(**{**tower, **vision}), "text_config": LlamaConfig(**{**_TEXT, **text}),
            "image_grid_pinpoints": _PINPOINTS, "image_token_id": IMAGE_TOKEN, "vision_feature_layer": -2,
            "vision_feature_select_strategy": "default", **top})
    if family == "llava_onevision":
        return LlavaOnevisionConfig(**{
            "vision_config": SiglipVisionConfig(**{**tower, **vision}), "text_config": Qwen2Config(**{**_TEXT, **text}),
            "image_grid_pinpoints": _PINPOINTS, "image_token_index": IMAGE_TOKEN, "video_token_index": VIDEO_TOKEN,
            "vision_feature_layer": -1, "vision_feature_select_strategy": "full", **top})
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}
    text_config = {**_TEXT, "rope_parameters": rope, **text}
    ids = dict(image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
               vision_end_token_id=VISION_END)
    if family == "qwen2_vl":
        vision_config = {**dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=7,
                                temporal_patch_size=2, spatial_merge_size=2), **vision}
        return Qwen2VLConfig(**{"text_config": text_config, "vision_config": vision_config, **ids, **top})
    if family == "qwen2_5_vl":
        vision_config = {**dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                                patch_size=7, temporal_patch_size=2, spatial_merge_size=2, window_size=28,
                                fullatt_block_indexes=[1]), **vision}
        return Qwen2_5_VLConfig(**{"text_config": text_config, "vision_config": vision_config, **ids, **top})
    raise VlmpruneError(f"unknown tiny family {family!r}; choose one of: {', '.join(FAMILIES)}")


_CLASSES = {
    "llava": LlavaForConditionalGeneration,
    "llava_next": LlavaNextForConditionalGeneration,
    "llava_onevision": LlavaOnevisionForConditionalGeneration,
    "qwen2_vl": Qwen2VLForConditionalGeneration,
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
}


def build_tiny(family: str, seed: int = 0, text_config: dict | None = None, vision_config: dict | None = None,
               device: str | torch.device = "cpu", **overrides: Any) -> tuple[torch.nn.Module, Callable[..., dict]]:
    """A seeded tiny ``*ForConditionalGeneration`` of ``family`` in eval mode, float32, SDPA attention,
    and ``make_inputs(text_lens=(6,), image_size=None, seed=0)`` building a left-padded batch with one
    image per sample. ``text_config``/``vision_config`` update the sub-configs; other keywords the top
    config (``attn_implementation="eager"`` too). ``device="meta"`` builds the model without weights
    (inputs still come on the CPU)."""
    attention = overrides.pop("attn_implementation", "sdpa")
    config = _config(family, text_config or {}, vision_config or {}, overrides)
    config._attn_implementation = attention
    torch.manual_seed(seed)
    with torch.device(device):
        model = _CLASSES[family](config)
    model.eval()
    return model, lambda **kw: make_inputs(model, family, **kw)


def _default_image_size(family: str) -> tuple[int, int]:
    return (28, 28) if family == "llava" else (56, 56)


def make_inputs(model: torch.nn.Module, family: str, text_lens: tuple[int, ...] = (6,),
                image_size: tuple[int, int] | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch with one image per sample: ``BOS, 2 text, [vision start], <image>*n, [vision end],
    text_lens[i] text``, left-padded to a common length. Every sample uses the same image size."""
    gen = torch.Generator().manual_seed(seed)
    size = tuple(image_size or _default_image_size(family))
    batch = len(text_lens)
    vision, n_image = _vision_inputs(model, family, size, batch, gen)
    rows = []
    for n_text in text_lens:
        body = torch.randint(*TEXT_TOKENS, (2 + n_text,), generator=gen)
        image = [IMAGE_TOKEN] * n_image
        if family.startswith("qwen"):
            image = [VISION_START] + image + [VISION_END]
        rows.append([BOS] + body[:2].tolist() + image + body[2:].tolist())
    length = max(len(r) for r in rows)
    input_ids = torch.tensor([[PAD] * (length - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, **vision}
    if family.startswith("qwen"):
        inputs["mm_token_type_ids"] = (input_ids == IMAGE_TOKEN).int()
    return inputs


def _vision_inputs(model, family: str, size: tuple[int, int], batch: int, gen: torch.Generator):
    """``pixel_values`` (+ ``image_sizes`` / ``image_grid_thw``) and the visual-token count per image."""
    vc = model.config.vision_config
    if family == "llava":
        if size != (vc.image_size, vc.image_size):
            raise VlmpruneError(f"llava images must be {vc.image_size}x{vc.image_size} px")
        n = (vc.image_size // vc.patch_size) ** 2
        return {"pixel_values": torch.randn(batch, 3, *size, generator=gen)}, n
    if family in ("llava_next", "llava_onevision"):
        tiles = image_size_to_num_patches(list(size), model.config.image_grid_pinpoints, vc.image_size)
        pixel_values = torch.randn(batch, tiles, 3, vc.image_size, vc.image_size, generator=gen)
        image_sizes = torch.tensor([list(size)] * batch)
        return {"pixel_values": pixel_values, "image_sizes": image_sizes}, _packed_count(model, family, size, tiles)
    merge, patch = vc.spatial_merge_size, vc.patch_size
    if size[0] % (patch * merge) or size[1] % (patch * merge):
        raise VlmpruneError(f"qwen image sides must be multiples of {patch * merge} px")
    grid = [1, size[0] // patch, size[1] // patch]
    per_image = grid[1] * grid[2]
    width = vc.in_channels * vc.temporal_patch_size * patch * patch
    pixel_values = torch.randn(batch * per_image, width, generator=gen)
    return ({"pixel_values": pixel_values, "image_grid_thw": torch.tensor([grid] * batch)},
            per_image // merge ** 2)


def _packed_count(model, family: str, size: tuple[int, int], tiles: int) -> int:
    """Tokens after LLaVA-NeXT/OneVision packing, from the model's own packing code on zeros."""
    vc = model.config.vision_config
    side = vc.image_size // vc.patch_size
    width = model.config.text_config.hidden_size
    features = [torch.zeros(tiles, side * side, width)]
    newline = torch.zeros(width)
    sizes = torch.tensor([list(size)])
    core = model.model
    if family == "llava_next":
        packed, _ = core.pack_image_features(features, sizes, model.config.vision_feature_select_strategy, newline)
    else:
        packed, _ = core.pack_image_features(features, sizes, newline)
    return int(packed[0].shape[0])


def sample(inputs: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """Sample ``index`` of a ``make_inputs`` batch on its own, without its left padding."""
    keep = inputs["attention_mask"][index].bool()
    out = {key: inputs[key][index][keep][None] for key in ("input_ids", "attention_mask", "mm_token_type_ids")
           if key in inputs}
    if "image_grid_thw" in inputs:
        per_image = int(inputs["image_grid_thw"][index].prod())
        out["pixel_values"] = inputs["pixel_values"][index * per_image:(index + 1) * per_image]
        out["image_grid_thw"] = inputs["image_grid_thw"][index:index + 1]
    else:
        out["pixel_values"] = inputs["pixel_values"][index:index + 1]
    if "image_sizes" in inputs:
        out["image_sizes"] = inputs["image_sizes"][index:index + 1]
    return out
