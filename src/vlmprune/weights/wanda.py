"""Wanda: ``|W_ij| * sqrt(r_j)`` with input norms over a calibration pool of tokens."""
from __future__ import annotations

from .base import PooledMethod, wanda_scores
from .statistics import InputNorms, pooled_statistics


class Wanda(PooledMethod):
    name = "wanda"

    def prune_block(self, ctx) -> None:
        norms = pooled_statistics(ctx, InputNorms, self.pool)
        for name, linear in ctx.linears.items():
            self.prune_with_scores(name, linear, wanda_scores(linear.weight, norms[name].value))
