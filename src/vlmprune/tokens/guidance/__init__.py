"""Small-model guidance: a small VLM that shares the large one's vision encoder and token grid says
which visual tokens the large one keeps (SGP, its early exit SEE, and PGP's information bottleneck).

The token methods that use it live in ``tokens/methods/sgp.py`` and ``tokens/methods/pgp.py``."""
from __future__ import annotations

from .pairing import GuidePair, guide_inputs, pair

__all__ = ["GuidePair", "pair", "guide_inputs"]
