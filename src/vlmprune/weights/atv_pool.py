"""The ``atv`` calibration pool: the tokens ATV-Pruning's selection picks in a block (every text
token plus the top-``K_n`` drifting visual tokens of each sample), so that other statistics, such
as SparseGPT's Hessian, can be gathered over exactly the tokens ATV's Wanda statistics use."""
from __future__ import annotations

import torch

from .atv import ATV, budget


class _RankingRecorder(ATV):
    """ATV with its default settings that keeps, per sample, the visual-token ranking it computes."""

    def __init__(self):
        super().__init__()
        self.orders: list[torch.Tensor] = []

    def _order(self, s, x_visual, cap, generator):
        order = super()._order(s, x_visual, cap, generator)
        self.orders.append(order)
        return order


@torch.no_grad()
def atv_token_masks(ctx) -> list[torch.Tensor]:
    """Per calibration sample, (L,) bool: the tokens ATV selects in block ``ctx`` (one dense pass)."""
    atv = _RankingRecorder()
    atv.collect(ctx)
    sbar = atv.history[-1]["saliency"]
    masks = []
    for i, order in enumerate(atv.orders):
        visual = ctx.visual(i)
        keep = ~visual
        k = budget(sbar, atv.alpha, int(keep.sum()), int(visual.sum()))
        keep[visual.nonzero().flatten()[order[:k]]] = True
        masks.append(keep)
    return masks
