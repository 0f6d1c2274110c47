"""The weight-method registry: SPEC names to classes, and ``from_spec``."""
from __future__ import annotations

from ..spec import build_from_spec
from .atv import ATV
from .base import WeightMethod
from .magnitude import Magnitude
from .sparsegpt import SparseGPT
from .tamp import TAMP
from .wanda import Wanda

REGISTRY: dict[str, type[WeightMethod]] = {
    "magnitude": Magnitude,
    "wanda": Wanda,
    "sparsegpt": SparseGPT,
    "tamp": TAMP,
    "atv": ATV,
}


def from_spec(spec: str) -> WeightMethod:
    """``"atv:sparsity=0.5,pattern=2:4"`` -> ``ATV(sparsity=0.5, pattern="2:4")``."""
    return build_from_spec(spec, REGISTRY, "weight method")
