"""Magnitude pruning: score ``|W_ij|`` per output row; needs no calibration."""
from __future__ import annotations

from .base import WeightMethod


class Magnitude(WeightMethod):
    name = "magnitude"
    needs_calibration = False

    def prune_block(self, ctx) -> None:
        for name, linear in ctx.linears.items():
            self.prune_with_scores(name, linear, linear.weight.detach().float().abs())
