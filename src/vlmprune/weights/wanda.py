"""Wanda: ``|W_ij| * sqrt(r_j)`` with input norms over a calibration pool of tokens."""
from __future__ import annotations

from .base import WeightMethod, wanda_scores
from .pools import check_pool, pool_mask
from .statistics import InputNorms


class Wanda(WeightMethod):
    name = "wanda"

    def __init__(self, sparsity: float | None = None, pattern=None, pool: str = "mixed"):
        super().__init__(sparsity, pattern)
        self.pool = check_pool(pool)

    def settings(self):
        return {"pool": self.pool}

    def prune_block(self, ctx) -> None:
        norms = {name: InputNorms(linear.in_features, ctx.device) for name, linear in ctx.linears.items()}
        with ctx.capture() as seen:
            for i in range(ctx.n_samples):
                ctx.forward(i)
                keep = pool_mask(ctx.visual(i), self.pool)
                for name, (x, _) in seen.items():
                    norms[name].add(x[keep])
        for name, linear in ctx.linears.items():
            self.prune_with_scores(name, linear, wanda_scores(linear.weight, norms[name].value))
