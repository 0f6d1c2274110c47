"""Weight pruning of the LLM inside a vision-language model: ATV-Pruning, Wanda, SparseGPT, TAMP,
magnitude; unstructured or N:M; plus the MoT probe (``vlmprune.weights.mot``).

    method = vp.weights.from_spec("atv:sparsity=0.5,pattern=2:4")
    report = vp.weights.prune(model, method, calibration=calib)      # in place

Names load on first use (as ``vlmprune`` itself does), so that ``vlmprune prune``'s argument checks in
``.command`` answer before torch is imported.
"""
from __future__ import annotations

import importlib

# public name -> the submodule that defines it
_EXPORTS = {"from_spec": "registry", "REGISTRY": "registry", "prune": "sequential", "capture": "sequential",
            "PruneReport": "sequential", "WeightMethod": "base", "Magnitude": "magnitude", "Wanda": "wanda",
            "SparseGPT": "sparsegpt", "TAMP": "tamp", "ATV": "atv"}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
