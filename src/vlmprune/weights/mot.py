"""The MoT probe (analysis only): a LLaVA-family model turned into a two-pathway transformer.

In every decoder block q/k/v and the FFN (gate/up/down) are duplicated into a text copy and a
visual copy; a modality mask routes each token to its copy, while o_proj, norms, residuals,
positions and attention stay shared. Unpruned, the probe computes exactly what the original
model computes. Each pathway can then be pruned on its own with any calibration pool.
"""
from __future__ import annotations

import copy
import re
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import VlmpruneError
from .sequential import PruneReport, prune

PATHWAYS = ("text", "visual")


class ModalityRouter:
    """The visual-token mask of the sequence being computed, shared by every routed Linear."""

    def __init__(self):
        self.visual: torch.Tensor | None = None   # (B, L) bool


class ModalityLinear(nn.Module):
    """A Linear with a text copy and a visual copy; each token is computed by its modality's copy.

    Both copies see every token (so either can gather statistics over any calibration pool);
    the mask picks each token's output."""

    def __init__(self, linear: nn.Linear, router: ModalityRouter):
        super().__init__()
        self.text = linear
        self.visual = copy.deepcopy(linear)
        self.router = router

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        text = self.text(x)
        mask = self.router.visual
        if mask is None or mask.shape != x.shape[:-1] or not bool(mask.any()):
            return text       # decode steps and text-only inputs take the text pathway
        return torch.where(mask[..., None].to(text.device), self.visual(x), text)


class MoTProbe:
    """Handle of a converted model: routing, and pruning one pathway at a time."""

    def __init__(self, model: nn.Module, router: ModalityRouter, routed: list[str]):
        self.model, self.router = model, router
        self.routed = routed          # full module names of the ModalityLinear layers

    def targets(self, pathway: str) -> list[str]:
        if pathway not in PATHWAYS:
            raise VlmpruneError(f"unknown MoT pathway {pathway!r}; choose one of: {', '.join(PATHWAYS)}")
        return [rf"^{re.escape(name)}\.{pathway}$" for name in self.routed]

    def route_sample(self, visual: torch.Tensor) -> None:
        self.router.visual = visual[None]

    def prune(self, pathway: str, method, calibration: Sequence[Any], device=None, captured=None) -> PruneReport:
        """Prune only ``pathway``'s copies with ``method`` (its ``pool`` setting picks the tokens);
        ``captured`` as in :func:`~vlmprune.weights.sequential.prune`."""
        return prune(self.model, method, calibration=calibration, targets=self.targets(pathway), device=device,
                     on_sample=self.route_sample, captured=captured)


def to_mot(model: nn.Module) -> MoTProbe:
    """Convert ``model`` in place into the two-pathway form and return its probe handle; the
    adapter says which projections of each decoder layer act per token."""
    from ..models import get_adapter

    adapter = get_adapter(model)
    router = ModalityRouter()
    converted = []
    for layer in range(len(adapter.llm_layers)):
        for parent, attribute in adapter.llm_token_projections(layer).values():
            linear = getattr(parent, attribute)
            if not isinstance(linear, nn.Linear):
                raise VlmpruneError(f"{attribute} of LLM layer {layer} is a {type(linear).__name__}, not a Linear "
                                    "(a model converts to the MoT probe once)")
            routed = ModalityLinear(linear, router)
            setattr(parent, attribute, routed)
            converted.append(routed)
    names = {id(module): name for name, module in model.named_modules()}

    def route(_module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        router.visual = None if input_ids is None else adapter.image_token_mask(input_ids)

    model.register_forward_pre_hook(route, with_kwargs=True)
    return MoTProbe(model, router, [names[id(module)] for module in converted])
