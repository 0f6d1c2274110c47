"""Weight pruning of the LLM inside a vision-language model: ATV-Pruning, Wanda, SparseGPT, TAMP,
magnitude; unstructured or N:M; plus the MoT probe (``vlmprune.weights.mot``).

    method = vp.weights.from_spec("atv:sparsity=0.5,pattern=2:4")
    report = vp.weights.prune(model, method, calibration=calib)      # in place
"""
from __future__ import annotations

from ..spec import build_from_spec
from .atv import ATV
from .base import WeightMethod
from .magnitude import Magnitude
from .sparsegpt import SparseGPT
from .sequential import PruneReport, capture, prune
from .tamp import TAMP
from .wanda import Wanda

REGISTRY: dict[str, type[WeightMethod]] = {
    "magnitude": Magnitude,
    "wanda": Wanda,
    "sparsegpt": SparseGPT,
    "tamp": TAMP,
    "atv": ATV,
}

__all__ = ["from_spec", "prune", "capture", "PruneReport", "REGISTRY", "WeightMethod", "Magnitude", "Wanda", "SparseGPT",
           "TAMP", "ATV"]


def from_spec(spec: str) -> WeightMethod:
    """``"atv:sparsity=0.5,pattern=2:4"`` -> ``ATV(sparsity=0.5, pattern="2:4")``."""
    return build_from_spec(spec, REGISTRY, "weight method")
