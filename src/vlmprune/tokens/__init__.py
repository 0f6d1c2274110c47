"""Visual-token pruning: ``apply(model, method)`` installs a method; ``from_spec`` builds one from a SPEC."""
from __future__ import annotations

from ..spec import build_from_spec
from .base import ModelPlan, Reduction, Site, SiteContext, TokenMethod
from .engine import TokenPruningHandle, apply
from .methods import REGISTRY, register

__all__ = ["apply", "from_spec", "TokenMethod", "Site", "Reduction", "SiteContext", "ModelPlan",
           "TokenPruningHandle", "register", "REGISTRY"]


def from_spec(spec: str) -> TokenMethod:
    """``from_spec("fastv:layer=2,keep=0.5")`` -> a configured method (every SPEC the CLI accepts)."""
    return build_from_spec(spec, REGISTRY, "token method")


def __getattr__(name: str):
    # Method classes as attributes: vp.tokens.FastV, vp.tokens.IVTP, ...
    for cls in REGISTRY.values():
        if cls.__name__ == name:
            return cls
    raise AttributeError(f"module 'vlmprune.tokens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *(cls.__name__ for cls in REGISTRY.values())])
