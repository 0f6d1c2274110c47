"""Calibration pools: which tokens of a multimodal sample feed a layer's statistics."""
from __future__ import annotations

import torch

from ..errors import VlmpruneError

# "mixed" is the papers' name for every token of the image-text samples (Wanda's default);
# "all" is the same pool under its plain name. All non-visual tokens count as text.
POOLS = ("mixed", "all", "text", "visual")


def check_pool(pool: str) -> str:
    if pool not in POOLS:
        raise VlmpruneError(f"unknown calibration pool {pool!r}; choose one of: {', '.join(POOLS)}")
    return pool


def pool_mask(visual: torch.Tensor, pool: str) -> torch.Tensor:
    """(L,) bool: the tokens of the sample (``visual``: (L,) bool) that belong to ``pool``."""
    if pool == "text":
        return ~visual
    if pool == "visual":
        return visual.clone()
    return torch.ones_like(visual)
