"""On-disk cache of dense per-task accuracy, so retention sweeps evaluate the dense model once.

The key covers the model (its name and a digest of its weights, so a weight-pruned copy never reads
its original's entry), the tasks, the split, the item limit, the generation length and the version of the
entry's layout (an entry written before per-item outcomes were recorded is never read back). The
directory is ``$VLMPRUNE_CACHE`` or ``~/.cache/vlmprune``.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

LAYOUT = 2   # 2: task entries carry "interval" and the per-item "correct" string


def cache_dir() -> Path:
    return Path(os.environ.get("VLMPRUNE_CACHE", Path.home() / ".cache" / "vlmprune")) / "dense"


@torch.no_grad()
def weights_digest(model: torch.nn.Module) -> str:
    """A digest of every parameter's name, shape and sums: cheap, and changed by any pruning."""
    digest = hashlib.sha1()
    for name, param in model.named_parameters():
        values = param.detach().float()
        digest.update(f"{name}{tuple(param.shape)}{values.sum().item():.6e}"
                      f"{values.abs().sum().item():.6e}".encode())
    return digest.hexdigest()


def key(model: torch.nn.Module, tasks: list[str], limit: int | None, max_new_tokens: int,
        split: str = "test") -> str:
    name = getattr(model, "name_or_path", "") or type(model).__name__
    fields = [LAYOUT, name, weights_digest(model), tasks, limit, max_new_tokens]
    text = json.dumps(fields if split == "test" else fields + [split])   # test keys as before: caches stay valid
    return hashlib.sha1(text.encode()).hexdigest()


def read(entry: str) -> dict | None:
    path = cache_dir() / f"{entry}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write(entry: str, tasks: dict) -> None:
    """Write atomically, so a run killed midway never leaves a truncated entry."""
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / f"{entry}.json.partial-{os.getpid()}"
    partial.write_text(json.dumps(tasks))
    os.replace(partial, directory / f"{entry}.json")
