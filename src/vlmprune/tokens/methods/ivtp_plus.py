"""IVTP+ (not in the paper): IVTP's ranking for part of the budget, spatial coverage for the rest.

IVTP keeps what the question points at (its significance to [CLS] in the ViT, to the pseudo-[CLS] in
the LLM), several tokens per salient object; a count needs one token on every object and a relation
the neighbours of both. So at each pruning site IVTP+ keeps the ``relevant`` share of that site's
count by IVTP's score and fills the rest by farthest-point sampling on the patch grid: each next token
is the one whose original grid cell is farthest (Euclidean, in cells) from every token kept so far.
``relevant=1.0`` is IVTP. Everything else (sites, budget, pseudo-[CLS], settings) is IVTP's.
"""
from __future__ import annotations

import inspect

import torch

from ...errors import VlmpruneError
from ..base import SiteContext
from .. import scorers
from .ivtp import IVTP

SPREAD_AT = ("all", "last")


def farthest_points(cells: torch.Tensor, chosen: torch.Tensor, count: int) -> torch.Tensor:
    """Greedy farthest-point sampling. ``cells``: (B, V, 2) distinct grid coordinates of the candidates;
    ``chosen``: (B, c) indices already kept (c >= 1). Returns (B, count) more indices, each the
    candidate farthest from its nearest kept one (ties to the lower index); a kept token is at
    distance 0 from itself, so it is never picked again while ``count`` <= V - c."""
    distance = torch.cdist(cells.float(), cells.float())                                 # (B, V, V)
    batch, n, _ = distance.shape
    nearest = distance.gather(1, chosen[:, :, None].expand(-1, -1, n)).amin(1)           # (B, V)
    picks = []
    for _ in range(count):
        pick = nearest.argmax(-1)
        picks.append(pick)
        nearest = torch.minimum(nearest, distance.gather(1, pick.view(batch, 1, 1).expand(-1, 1, n)).squeeze(1))
    return torch.stack(picks, 1) if picks else chosen[:, :0]


class IVTPPlus(IVTP):
    """``ivtp_plus:keep=0.11,relevant=0.5``: every IVTP setting, plus ``relevant`` (default 0.5, in
    (0, 1]: the share of each site's count kept by IVTP's score, at least one token) and ``spread_at``
    (default ``all``: every pruning site splits its count; ``last``: only the last site, the earlier
    ones are IVTP's). Needs a square patch grid."""

    name = "ivtp_plus"

    def __init__(self, keep: int | float = 0.11, relevant: float = 0.5, spread_at: str = "all", **ivtp_settings):
        super().__init__(keep=keep, **ivtp_settings)
        if isinstance(relevant, bool) or not isinstance(relevant, (int, float)) or not 0 < relevant <= 1:
            raise VlmpruneError(f"ivtp_plus relevant={relevant!r} must be a share in (0, 1]")
        if spread_at not in SPREAD_AT:
            raise VlmpruneError(f"ivtp_plus spread_at={spread_at!r}; choose one of: {', '.join(SPREAD_AT)}")
        self.relevant, self.spread_at = float(relevant), spread_at

    def select(self, ctx: SiteContext, score: torch.Tensor, count: int) -> torch.Tensor:
        last = (self._llm_sites or self._vit_sites)[-1]
        if self.spread_at == "last" and ctx.site != last:
            return super().select(ctx, score, count)
        relevant = max(1, round(self.relevant * count))
        chosen = scorers.top_indices(score, relevant)
        side = scorers.square_grid(ctx.n_visual)[1]
        cells = torch.stack([ctx.original // side, ctx.original % side], dim=-1)
        return torch.cat([chosen, farthest_points(cells, chosen, count - relevant)], dim=1)


# SPEC checks and the command line's catalogue read a method's settings from its signature: IVTP's and the two above
IVTPPlus.__signature__ = inspect.signature(IVTP).replace(parameters=[
    *inspect.signature(IVTP).parameters.values(),
    *(parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY)
      for name, parameter in inspect.signature(IVTPPlus.__init__).parameters.items() if name in ("relevant", "spread_at"))])
