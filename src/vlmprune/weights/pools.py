"""Calibration pools: which tokens of a multimodal sample feed a layer's statistics."""
from __future__ import annotations

import torch

from ..errors import VlmpruneError

# "mixed" is the papers' name for every token of the image-text samples (Wanda's default);
# "all" is the same pool under its plain name. All non-visual tokens count as text.
# "atv" is ATV-Pruning's selection: every text token plus each block's most drifting visual tokens.
POOLS = ("mixed", "all", "text", "visual", "atv")


def check_pool(pool: str) -> str:
    if pool not in POOLS:
        raise VlmpruneError(f"unknown calibration pool {pool!r}; choose one of: {', '.join(POOLS)}")
    return pool


def pool_mask(visual: torch.Tensor, pool: str) -> torch.Tensor:
    """(L,) bool: the tokens of the sample (``visual``: (L,) bool) that belong to a fixed ``pool``."""
    if pool == "text":
        return ~visual
    if pool == "visual":
        return visual.clone()
    return torch.ones_like(visual)


def pool_masks(ctx, pool: str) -> list[torch.Tensor]:
    """Per calibration sample of the block ``ctx``, (L,) bool: its tokens in ``pool``. The ``atv``
    pool depends on the block (a dense pass measures drift), the others only on the sample."""
    if pool == "atv":
        from .atv_pool import atv_token_masks   # here, not above: atv.py builds on this module

        return atv_token_masks(ctx)
    return [pool_mask(ctx.visual(i), pool) for i in range(ctx.n_samples)]
