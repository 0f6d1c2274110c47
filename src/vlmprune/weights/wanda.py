"""Wanda: ``|W_ij| * sqrt(r_j)`` with input norms over a calibration pool of tokens."""
from __future__ import annotations

from .base import WeightMethod, wanda_scores
from .pools import check_pool
from .statistics import InputNorms, pooled_statistics


class Wanda(WeightMethod):
    name = "wanda"

    def __init__(self, sparsity: float | None = None, pattern=None, pool: str = "mixed"):
        super().__init__(sparsity, pattern)
        self.pool = check_pool(pool)

    def settings(self):
        return {"pool": self.pool}

    def prune_block(self, ctx) -> None:
        norms = pooled_statistics(ctx, InputNorms, self.pool)
        for name, linear in ctx.linears.items():
            self.prune_with_scores(name, linear, wanda_scores(linear.weight, norms[name].value))
