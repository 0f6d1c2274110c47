"""The figures of the PGP seed: for one image and each question, PGP's importance map (``KL_i`` on the
patch grid) and its pruning guidance (the kept set drawn on the image), with SGP's attention scores
and kept set beside them (METHODS.md 2.2)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from .overlay import heat_overlay, kept_overlay, model_view

PANELS = ("PGP importance (KL)", "PGP kept", "SGP importance (attention)", "SGP kept")
GAP = 8


@dataclass
class Guidance:
    """Per question (rows): PGP's and SGP's scores (B, V) over the visual tokens and the top ``count``."""

    pgp: torch.Tensor
    sgp: torch.Tensor
    count: int

    def kept(self, scores: torch.Tensor) -> torch.Tensor:
        return scores.topk(self.count, dim=1).indices


@torch.no_grad()
def guidance_scores(model, processor, image: Image.Image, questions: list[str], keep: int | float,
                    pgp_guide: str | None = None, sgp_guide: str | None = None) -> Guidance:
    """Both guides' scores for ``image`` with each question, as the large ``model`` would receive them."""
    from ..eval.harness import model_inputs
    from ..tokens import scorers
    from ..tokens.guidance.sgp import guide_answer
    from ..tokens.methods.pgp import PGP
    from ..tokens.methods.sgp import SGP

    inputs = model_inputs(processor, [image] * len(questions), questions, model.device, model.dtype)
    pgp = PGP(keep=keep, guide=pgp_guide).guide_model(model).importance(inputs)
    sgp = guide_answer(SGP(keep=keep, guide=sgp_guide).small_model(model), inputs).scores
    return Guidance(pgp.float().cpu(), sgp.float().cpu(), scorers.resolve_keep(keep, pgp.shape[1]))


def guidance_figure(image: Image.Image, size: tuple[int, int], grid: tuple[int, int], questions: list[str],
                    guidance: Guidance, scale: int = 6) -> Image.Image:
    """One row per question: the four :data:`PANELS`, left to right."""
    view = model_view(image, size)
    rows = []
    for i, question in enumerate(questions):
        panels = [heat_overlay(view, grid, guidance.pgp[i].tolist(), scale, f"{PANELS[0]}: {question}"),
                  kept_overlay(view, grid, guidance.kept(guidance.pgp)[i].tolist(), scale,
                               f"{PANELS[1]} {guidance.count}"),
                  heat_overlay(view, grid, guidance.sgp[i].tolist(), scale, PANELS[2]),
                  kept_overlay(view, grid, guidance.kept(guidance.sgp)[i].tolist(), scale,
                               f"{PANELS[3]} {guidance.count}")]
        rows.append(panels)
    width = sum(p.width for p in rows[0]) + GAP * (len(PANELS) - 1)
    height = rows[0][0].height
    canvas = Image.new("RGB", (width, height * len(rows) + GAP * (len(rows) - 1)), "white")
    for r, panels in enumerate(rows):
        x = 0
        for panel in panels:
            canvas.paste(panel, (x, r * (height + GAP)))
            x += panel.width + GAP
    return canvas
