"""Calibration statistics of a Linear's inputs, accumulated one sample at a time (float32)."""
from __future__ import annotations

from typing import Callable, TypeVar

import torch

from .pools import pool_masks

Statistic = TypeVar("Statistic")


class InputNorms:
    """Wanda's ``r_j``: mean over samples of the per-sample sum over tokens of ``x_{t,j}^2``."""

    def __init__(self, width: int, device: torch.device | str):
        self.total = torch.zeros(width, dtype=torch.float32, device=device)
        self.samples = 0

    def add(self, tokens: torch.Tensor) -> None:
        """``tokens``: (T, C) the selected tokens of one sample (T may be 0)."""
        self.add_squared_sum(tokens.float().pow(2).sum(dim=0))

    def add_squared_sum(self, squared_sum: torch.Tensor) -> None:
        """Add one sample whose ``sum_t x_t^2`` was formed elsewhere (deferred token selection)."""
        self.total += squared_sum.to(self.total.device, torch.float32)
        self.samples += 1

    @property
    def value(self) -> torch.Tensor:
        return self.total / max(self.samples, 1)


class Hessian:
    """SparseGPT's ``H = (2/n) sum_t x_t x_t^T`` over the n selected tokens."""

    def __init__(self, width: int, device: torch.device | str):
        self.total = torch.zeros(width, width, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, tokens: torch.Tensor) -> None:
        x = tokens.float()
        self.total.addmm_(x.T, x)
        self.tokens += x.shape[0]

    @property
    def value(self) -> torch.Tensor:
        return self.total * (2.0 / max(self.tokens, 1))


def pooled_statistics(ctx, statistic: Callable[[int, torch.device], Statistic], pool: str) -> dict[str, Statistic]:
    """Run every calibration sample through the block and feed each target's input tokens that
    belong to ``pool`` to its own ``statistic(width, device)`` accumulator."""
    masks = pool_masks(ctx, pool)
    stats = {name: statistic(linear.in_features, ctx.device) for name, linear in ctx.linears.items()}
    with ctx.capture() as seen:
        for i in range(ctx.n_samples):
            ctx.forward(i)
            for name, (x, _) in seen.items():
                stats[name].add(x[masks[i]])
    return stats
