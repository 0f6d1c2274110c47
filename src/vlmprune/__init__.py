"""vlmprune: fewer visual tokens and fewer weights for vision-language models, measured honestly."""
from __future__ import annotations

import importlib

from .errors import SpecError, VlmpruneError

__version__ = "0.1.0"
__all__ = ["VlmpruneError", "SpecError", "models", "tokens", "weights", "toyworld", "measure", "eval", "viz",
           "load", "apply_recipe", "read_recipe"]
# functions -> the module that defines them, imported on first use like the submodules
_FUNCTIONS = {"load": "compressed", "apply_recipe": "recipes", "read_recipe": "recipes"}


def __getattr__(name: str):
    # Submodules load on first use so that `import vlmprune` stays light.
    if name in ("models", "tokens", "weights", "toyworld", "measure", "eval", "viz"):
        return importlib.import_module(f".{name}", __name__)
    if name in _FUNCTIONS:
        return getattr(importlib.import_module(f".{_FUNCTIONS[name]}", __name__), name)
    raise AttributeError(f"module 'vlmprune' has no attribute {name!r}")
