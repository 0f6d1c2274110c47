"""A small/large model pair for guidance: the small model's visual tokens must be the large one's.

A guide's scores are indexed by visual token, so they only mean something to a large model whose
image gives the same tokens in the same order: same family (same packing), same patch grid, same
visual-token count, and prompts the two models read alike (the same image placeholder id). The
default guides for the shipped toy-large live here too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...errors import VlmpruneError
from ...models import get_adapter
from ...models.presets import default_image_size, visual_geometry
from .reuse import same_tower

# What a guide reads from the large model's inputs (the KV cache, positions and the like stay behind).
GUIDE_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_sizes", "image_grid_thw", "mm_token_type_ids")
# The parts of toy-large's config that tell it apart from any other model.
_TOY_FINGERPRINT = (("text_config", "num_hidden_layers"), ("text_config", "hidden_size"),
                    ("text_config", "vocab_size"), ("vision_config", "image_size"), ("vision_config", "patch_size"),
                    ("vision_config", "hidden_size"), ("vision_config", "num_hidden_layers"))


@dataclass(frozen=True)
class GuidePair:
    """A checked pair: ``small`` scores, ``large`` keeps; ``grid`` and ``n_visual`` (visual tokens per
    image) are shared, at the family's default image size (Qwen's vary with the image);
    ``shared_tower``: the two vision towers hold equal weights, so one run of either serves both."""

    small: nn.Module
    large: nn.Module
    grid: tuple[int, int]
    n_visual: int
    shared_tower: bool


def _geometry(model: nn.Module) -> tuple[str, tuple[int, int], int]:
    config = model.config
    geometry = visual_geometry(config, default_image_size(config))
    return config.model_type, geometry.patch_grid, geometry.llm_tokens


def pair(small: nn.Module, large: nn.Module) -> GuidePair:
    """Check that ``small`` can guide ``large`` and return the pair; a one-line error says what differs."""
    small_adapter, large_adapter = get_adapter(small), get_adapter(large)
    (small_family, small_grid, small_n), (large_family, large_grid, large_n) = _geometry(small), _geometry(large)
    if small_family != large_family:
        raise VlmpruneError(f"a guide must be of the large model's family: {small_family} cannot guide {large_family}")
    if small_grid != large_grid:
        raise VlmpruneError(f"the guide's patch grid {small_grid} differs from the large model's {large_grid}: "
                            "pick a small model with the same vision encoder")
    if small_n != large_n:
        raise VlmpruneError(f"the guide gives {small_n} visual tokens per image, the large model {large_n}: "
                            "pick a small model with the same vision encoder and projector layout")
    if small_adapter.image_token_id != large_adapter.image_token_id:
        raise VlmpruneError(f"the guide's image token id {small_adapter.image_token_id} differs from the large "
                            f"model's {large_adapter.image_token_id}: the two must share a tokenizer")
    return GuidePair(small, large, large_grid, large_n, same_tower(small, large))


def guide_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """The prompt and image entries of a large model's forward inputs, to run the guide on."""
    return {key: inputs[key] for key in GUIDE_INPUTS if inputs.get(key) is not None}


def visual_positions(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, V) positions of the visual tokens in each row (every row holds one image's V tokens); index
    arithmetic on the ids alone, so it also serves a shape-only (``meta``) forward."""
    is_visual = get_adapter(model).image_token_mask(input_ids)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    return positions[is_visual].view(input_ids.shape[0], -1)


def is_toy_large(model: nn.Module) -> bool:
    """Whether ``model`` has the shipped toy-large's architecture (a meta-device copy counts too)."""
    from ...toyworld import checkpoint_dir
    from transformers import AutoConfig

    toy = AutoConfig.from_pretrained(checkpoint_dir("toy-large"))
    if model.config.model_type != toy.model_type:
        return False
    return all(getattr(getattr(model.config, part), key, None) == getattr(getattr(toy, part), key)
               for part, key in _TOY_FINGERPRINT)


def spec_path(value: Any) -> Any:
    """A path given in a SPEC string: the SPEC parser reads ``a/b/c`` as a list, so join it back;
    anything else (None, a string, a loaded guide) passes through."""
    return "/".join(str(part) for part in value) if isinstance(value, list) else value


def spec_without_none(spec: str) -> str:
    """A guided method's SPEC without its unset settings (``guide=None``: the shipped guide; SGP's
    ``layer=None``: the default depth), which the SPEC parser could not read back."""
    return ",".join(part for part in spec.split(",") if not part.endswith("=None"))


def guide_location(guide: str | None, large: nn.Module, method: str, toy_default: str) -> str:
    """``guide``, or ``toy_default`` (a shipped guide) when the large model is toy-large."""
    if guide is not None:
        return guide
    if is_toy_large(large):
        return toy_default
    raise VlmpruneError(f"{method} has a shipped guide only for toy-large: name one with guide=PATH")


def guide_device(large: nn.Module) -> torch.device:
    """Where the guide runs: beside the large model's vision tower (the CPU for a shape-only copy)."""
    device = next(get_adapter(large).vision_tower.parameters()).device
    return torch.device("cpu") if device.type == "meta" else device


def is_shape_only(model: nn.Module) -> bool:
    """Whether ``model`` has no weights (a ``meta``-device copy, as FLOP counting runs)."""
    return next(model.parameters()).is_meta


def shape_only_copy(model: nn.Module) -> nn.Module:
    """The same architecture with its weights on the ``meta`` device, for a shape-only (FLOP-counting)
    forward of the large model: a guide with real weights cannot take ``meta`` activations."""
    with torch.device("meta"):
        copy = type(model)(model.config)
    return copy.eval()


def load_small(path: str, device: torch.device | str = "cpu") -> nn.Module:
    """A guide from a ``save_pretrained`` directory (or a shipped toy name), float32, eval mode."""
    from pathlib import Path
    from transformers import AutoModelForImageTextToText

    from ...toyworld import MODELS, checkpoint_dir
    directory = checkpoint_dir(path) if path in MODELS else Path(path)
    if not (directory / "config.json").is_file():
        raise VlmpruneError(f"guide {path!r} is neither toy-small nor a directory written by save_pretrained")
    model = AutoModelForImageTextToText.from_pretrained(directory, dtype=torch.float32)
    return model.to(device).eval()
