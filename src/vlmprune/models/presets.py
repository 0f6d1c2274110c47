"""Architecture presets: the configs of the real model families, written here so that FLOPs can be
counted without downloading anything, plus the standard input geometry each is counted at.

Geometry (one image per prompt, counted as the model's processor would feed it):

| preset | image (H x W) | vision tower sees | visual tokens in the LLM |
|---|---|---|---|
| llava-1.5-7b / 13b | 336 x 336 | 1 crop, 577 tokens ([CLS] + 24x24) | 576 |
| llava-next-8b | 672 x 672 (anyres 2x2) | 5 crops of 336 (base + 4) | 576 + 48x48 + 48 newlines = 2928 |
| llava-onevision-7b | 768 x 768 (anyres 2x2) | 5 crops of 384, 729 tokens each | 729 + 54x54 + 54 newlines = 3699 |
| qwen2-vl-7b, qwen2.5-vl-7b | 672 x 672 | 48x48 = 2304 patches | 576 (2x2 merge) |

A square image whose size is a grid pinpoint needs no unpadding, so these are the simplest
representative anyres settings. ``toy-large``/``toy-small`` and any directory with a ``config.json``
use the family's rule: the tower's own image size for LLaVA, twice it for the anyres families
(a 2x2 grid), 672 x 672 for Qwen.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig
from transformers.image_processing_utils import select_best_resolution

from ..errors import VlmpruneError

FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl")
QWEN_IMAGE_SIZE = 672


@dataclass
class Preset:
    """A model architecture (no weights) and the image geometry FLOPs are counted at."""

    name: str
    config: PretrainedConfig
    image_size: tuple[int, int]

    @property
    def family(self) -> str:
        return self.config.model_type

    @property
    def geometry(self) -> "VisualGeometry":
        return visual_geometry(self.config, self.image_size)


@dataclass(frozen=True)
class VisualGeometry:
    """How many tokens each stage sees for one image.

    ``crops``: images the vision tower encodes; ``tower_tokens``: sequence length per crop inside
    the tower ([CLS] included); ``projector_tokens``: features entering the projector (all crops);
    ``llm_tokens``: visual tokens placed in the LLM prompt (after packing, newlines, merging).
    """

    crops: int
    tower_tokens: int
    projector_tokens: int
    llm_tokens: int
    patch_grid: tuple[int, int]  # patches per crop (rows, cols); for Qwen the whole image


def _llama(hidden, intermediate, layers, heads, kv_heads, vocab, theta=10000.0, max_pos=4096):
    return dict(model_type="llama", hidden_size=hidden, intermediate_size=intermediate,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                vocab_size=vocab, rms_norm_eps=1e-5, rope_theta=theta, max_position_embeddings=max_pos)


def _qwen2_7b(vocab):
    return dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, vocab_size=vocab, rms_norm_eps=1e-6,
                rope_theta=1000000.0, max_position_embeddings=32768, tie_word_embeddings=False)


CLIP_L_336 = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                  num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14,
                  projection_dim=768, hidden_act="quick_gelu")
SIGLIP_SO400M_384 = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                         num_hidden_layers=26, num_attention_heads=16, image_size=384, patch_size=14,
                         vision_use_head=False)
QWEN2_VL_VISION = dict(depth=32, embed_dim=1280, hidden_size=3584, mlp_ratio=4, num_heads=16,
                       in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
QWEN2_5_VL_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, out_hidden_size=3584,
                         num_heads=16, in_channels=3, patch_size=14, spatial_merge_size=2,
                         temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                         hidden_act="silu", tokens_per_second=2)
QWEN_TEXT_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                    num_key_value_heads=4, vocab_size=152064, rms_norm_eps=1e-6, max_position_embeddings=32768,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                     "mrope_section": [16, 24, 24]})
QWEN_TOKENS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                   vision_end_token_id=151653)

# name -> (model_type, config keywords, image size)
_REAL = {
    "llava-1.5-7b": ("llava", dict(vision_config=CLIP_L_336, text_config=_llama(4096, 11008, 32, 32, 32, 32064),
                                   image_token_index=32000, vision_feature_layer=-2,
                                   vision_feature_select_strategy="default", projector_hidden_act="gelu"),
                     (336, 336)),
    "llava-1.5-13b": ("llava", dict(vision_config=CLIP_L_336, text_config=_llama(5120, 13824, 40, 40, 40, 32064),
                                    image_token_index=32000, vision_feature_layer=-2,
                                    vision_feature_select_strategy="default", projector_hidden_act="gelu"),
                      (336, 336)),
    "llava-next-8b": ("llava_next", dict(vision_config=CLIP_L_336,
                                         text_config=_llama(4096, 14336, 32, 32, 8, 128320, theta=500000.0,
                                                            max_pos=8192),
                                         image_token_index=128256, vision_feature_layer=-2,
                                         vision_feature_select_strategy="default",
                                         image_grid_pinpoints=[[336, 672], [672, 336], [672, 672],
                                                               [1008, 336], [336, 1008]]),
                      (672, 672)),
    "llava-onevision-7b": ("llava_onevision", dict(vision_config=SIGLIP_SO400M_384, text_config=_qwen2_7b(152128),
                                                   image_token_index=151646, vision_feature_layer=-1,
                                                   vision_feature_select_strategy="full",
                                                   vision_aspect_ratio="anyres_max_9"),
                           (768, 768)),
    "qwen2-vl-7b": ("qwen2_vl", dict(vision_config=QWEN2_VL_VISION, text_config=QWEN_TEXT_7B, **QWEN_TOKENS),
                    (QWEN_IMAGE_SIZE, QWEN_IMAGE_SIZE)),
    "qwen2.5-vl-7b": ("qwen2_5_vl", dict(vision_config=QWEN2_5_VL_VISION, text_config=QWEN_TEXT_7B, **QWEN_TOKENS),
                      (QWEN_IMAGE_SIZE, QWEN_IMAGE_SIZE)),
}
_TOY = ("toy-large", "toy-small")


def preset_names() -> list[str]:
    return [*_REAL, *_TOY]


def get_preset(name_or_dir: str) -> Preset:
    """A preset by name, or the architecture in ``DIR/config.json``; unknown -> VlmpruneError."""
    if name_or_dir in _REAL:
        model_type, kwargs, image_size = _REAL[name_or_dir]
        config = AutoConfig.for_model(model_type, **copy.deepcopy(kwargs))  # configs never share state
        return Preset(name_or_dir, config, image_size)
    if name_or_dir in _TOY:
        return _from_dir(name_or_dir, _toy_checkpoint(name_or_dir))
    path = Path(name_or_dir)
    if path.is_dir():
        return _from_dir(path.name, path)
    raise VlmpruneError(f"unknown model {name_or_dir!r}: give a directory with a config.json or one of: "
                        + ", ".join(preset_names()))


def _toy_checkpoint(name: str) -> Path:
    try:
        from ..toyworld import checkpoint_dir
        path = Path(checkpoint_dir(name))
    except (ImportError, AttributeError, VlmpruneError):
        path = None
    if path is None or not (path / "config.json").is_file():
        raise VlmpruneError(f"the toy checkpoint {name!r} is not available; run `vlmprune toy train` "
                            "or pass a directory with a config.json")
    return path


def _from_dir(name: str, path: Path) -> Preset:
    if not (path / "config.json").is_file():
        raise VlmpruneError(f"{path} has no config.json; give a saved model directory or a preset name")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise VlmpruneError(f"cannot read {path / 'config.json'}: {exc}".splitlines()[0]) from None
    if config.model_type not in FAMILIES:
        raise VlmpruneError(f"{path} holds a {config.model_type!r} model; supported: {', '.join(FAMILIES)}")
    return Preset(name, config, default_image_size(config))


def default_image_size(config: PretrainedConfig) -> tuple[int, int]:
    """The family's counting geometry (see the module docstring)."""
    family = config.model_type
    if family in ("qwen2_vl", "qwen2_5_vl"):
        return (QWEN_IMAGE_SIZE, QWEN_IMAGE_SIZE)
    side = config.vision_config.image_size
    return (2 * side, 2 * side) if family in ("llava_next", "llava_onevision") else (side, side)


def visual_geometry(config: PretrainedConfig, image_size: tuple[int, int]) -> VisualGeometry:
    """Token counts per stage for one image of ``image_size``, as the family's processor computes them."""
    family = config.model_type
    height, width = image_size
    if family in ("qwen2_vl", "qwen2_5_vl"):
        vision = config.vision_config
        rows, cols = height // vision.patch_size, width // vision.patch_size
        merged = (rows // vision.spatial_merge_size) * (cols // vision.spatial_merge_size)
        return VisualGeometry(1, rows * cols, rows * cols, merged, (rows, cols))
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    has_cls = vision.model_type == "clip_vision_model"
    per_crop = side * side + (1 if has_cls and config.vision_feature_select_strategy == "full" else 0)
    tower = side * side + (1 if has_cls else 0)
    if family == "llava":
        return VisualGeometry(1, tower, per_crop, per_crop, (side, side))
    best_h, best_w = select_best_resolution((height, width), config.image_grid_pinpoints)
    scale_h, scale_w = best_h // vision.image_size, best_w // vision.image_size
    crops = 1 + scale_h * scale_w
    rows, cols = _unpadded_grid(height, width, side * scale_h, side * scale_w)
    if family == "llava_onevision":
        max_patches = int(config.vision_aspect_ratio.removeprefix("anyres_max_"))
        ratio = math.sqrt(rows * cols / (max_patches * side * side))
        if ratio > 1.1:
            rows, cols = int(rows // ratio), int(cols // ratio)
    llm = per_crop + rows * cols + rows  # base crop, the unpadded grid, one newline per row
    return VisualGeometry(crops, tower, crops * per_crop, llm, (side, side))


def _unpadded_grid(height: int, width: int, rows: int, cols: int) -> tuple[int, int]:
    """Rows and columns of the anyres feature grid after removing the letterbox padding."""
    if width / height > cols / rows:
        new_rows = int(round(height * (cols / width), 7))
        rows -= 2 * ((rows - new_rows) // 2)
    else:
        new_cols = int(round(width * (rows / height), 7))
        cols -= 2 * ((cols - new_cols) // 2)
    return rows, cols
