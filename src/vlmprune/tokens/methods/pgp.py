"""PGP (posterior-guided pruning): a small VLM with LoRA and an information bottleneck reads the prompt
and the image once; the visual tokens whose posterior moved furthest from the prior (largest ``KL_i``)
are the ones the large model keeps, by default at its input. See :mod:`vlmprune.tokens.guidance.pgp`."""
from __future__ import annotations

from typing import Any

import torch

from ..guidance.guided import GuidedMethod
from ..guidance.pairing import shape_only_copy

SHIPPED_GUIDE = "toy-small-pgp"   # under toyworld/checkpoints: toy-small's adapters and module


class PGP(GuidedMethod):
    """``pgp:keep=0.05``: keep (count or fraction) at LLM layer ``layer`` (default 0: before the LLM);
    ``share``: when the guide's vision tower holds the large model's weights, it reuses the large
    model's tower output (false: it runs its own, as the cost comparison needs);
    ``guide``: a directory written by ``vlmprune toy train-pgp`` (default: the shipped one for
    toy-large), or a loaded :class:`~vlmprune.tokens.guidance.pgp.PGPGuide`."""

    name = "pgp"

    def __init__(self, keep: int | float = 0.05, layer: int = 0, guide: Any = None, share: bool = True):
        super().__init__(keep, layer, guide, share)

    def shipped_guide(self) -> str:
        from ...toyworld import CHECKPOINTS
        return str(CHECKPOINTS / SHIPPED_GUIDE)

    def load_guide(self, location: str, device: torch.device):
        from ..guidance.pgp import load_guide
        return load_guide(location, device)

    def guide_small(self, guide):
        return guide.small

    def shape_only_guide(self, guide):
        from ..guidance.pgp import PGPGuide
        with torch.device("meta"):
            return PGPGuide(shape_only_copy(guide.small), guide.settings).eval()

    def scores(self, guide, inputs: dict[str, Any]) -> torch.Tensor:
        return guide.importance(inputs)
