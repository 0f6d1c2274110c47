"""vlmprune: fewer visual tokens and fewer weights for vision-language models, measured honestly."""
from __future__ import annotations

import importlib

from .errors import SpecError, VlmpruneError

__version__ = "0.1.0"
__all__ = ["VlmpruneError", "SpecError", "models", "tokens", "weights", "toyworld", "measure", "eval", "viz"]


def __getattr__(name: str):
    # Submodules load on first use so that `import vlmprune` stays light.
    if name in ("models", "tokens", "weights", "toyworld", "measure", "eval", "viz"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'vlmprune' has no attribute {name!r}")
