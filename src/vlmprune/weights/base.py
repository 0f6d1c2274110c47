"""What every weight method is: a sparsity, an optional N:M pattern, and a per-block rule.

The engine (``sequential.py``) owns capture, hooks, devices and propagation; a method only
gathers statistics through a :class:`~vlmprune.weights.sequential.BlockContext` and zeros weights.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from .masks import Pattern, apply_mask, check_divides, parse_pattern, pattern_sparsity, score_mask
from .pools import check_pool


class WeightMethod(ABC):
    name = "base"
    needs_calibration = True
    needs_dense_sweep = False

    def __init__(self, sparsity: float | None = None, pattern: str | Pattern | None = None):
        self.pattern = parse_pattern(pattern)
        self.sparsity = pattern_sparsity(self.pattern, sparsity)

    def settings(self) -> dict[str, Any]:
        """Method-specific settings recorded beside sparsity and pattern."""
        return {}

    def describe(self) -> dict[str, Any]:
        pattern = None if self.pattern is None else f"{self.pattern[0]}:{self.pattern[1]}"
        return {"method": self.name, "sparsity": self.sparsity, "pattern": pattern, **self.settings()}

    def validate(self, linears: dict[str, nn.Linear]) -> None:
        for name, linear in linears.items():
            check_divides(self.pattern, linear.in_features, name)

    def layer_sparsity(self, name: str) -> float:
        return self.sparsity

    def prune_with_scores(self, name: str, linear: nn.Linear, scores: torch.Tensor) -> None:
        apply_mask(linear, score_mask(scores, self.layer_sparsity(name), self.pattern))

    @abstractmethod
    def prune_block(self, ctx) -> None:
        """Zero weights of ``ctx.linears``, one decoder block (``ctx.inputs`` is None for methods
        without ``needs_calibration``)."""

    def observe_dense(self, ctx) -> list[torch.Tensor] | None:
        """Dense sweep before pruning (methods with ``needs_dense_sweep``)."""
        return None

    def allocate(self, per_block: list[dict[str, nn.Linear]]) -> None:
        """Turn what the dense sweep observed into per-layer sparsities."""


class PooledMethod(WeightMethod):
    """A method whose statistics come from one calibration pool of tokens (see ``pools.py``)."""

    def __init__(self, sparsity: float | None = None, pattern: str | Pattern | None = None, pool: str = "mixed"):
        super().__init__(sparsity, pattern)
        self.pool = check_pool(pool)

    def settings(self) -> dict[str, Any]:
        return {"pool": self.pool}


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * sqrt(r_j)``."""
    return weight.detach().float().abs() * input_norms.to(weight.device).float().sqrt()[None, :]
