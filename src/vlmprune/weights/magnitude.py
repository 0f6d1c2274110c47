"""Magnitude pruning: score ``|W_ij|`` per output row; needs no calibration."""
from __future__ import annotations

from torch import nn

from .base import WeightMethod


class Magnitude(WeightMethod):
    name = "magnitude"
    needs_calibration = False

    def prune_linears(self, linears: dict[str, nn.Linear]) -> None:
        for name, linear in linears.items():
            self.prune_with_scores(name, linear, linear.weight.detach().float().abs())
