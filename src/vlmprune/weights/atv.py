"""ATV-Pruning: all text tokens plus a block-adaptive budget of the most drifting visual tokens.

Per block: a dense pass gives each visual token its drift ``s_v = 1 - cos(X_in[v], X_out[v])``;
the block saliency ``sbar`` (mean over every visual token of every sample) sets each sample's
budget ``K_n = clip(round(min(1, alpha * sbar) * N_text_n), 0, N_vis_n)``; Wanda statistics over
the text tokens and the top ``K_n`` visual tokens give Wanda masks.

Ablations (seed 002, A5): ``saliency=attention`` (ABS), ``saliency=diversity`` with
``select=maxmin`` (DBS: max-min selection started at the most diverse token), ``select=random``,
``budget=K`` (fixed).

ABS on a scale that selects. Taken literally (``saliency=attention-literal``), ``s_v`` is the mean
attention the text rows pay to token v. The text rows' attention to the image is shared among
all N_vis visual tokens, so ``sbar`` is about (attention mass on the image) / N_vis: a few
thousandths for hundreds of visual tokens, ``K_n = round(sbar * N_text) = 0`` in every block, and
the masks are text-only Wanda's. ``saliency=attention`` multiplies each sample's ``s_v`` by its
N_vis, i.e. measures attention relative to an even share of the image. The TopK ranking inside a
sample (Eq. 7) is unchanged; ``sbar`` becomes the mean share of the text rows' attention that
falls on the image, a number in [0, 1] that is block-adaptive in the way drift is, so Eq. 6 turns
it into a budget the same way. (Rank-normalising instead would fix ``sbar`` at 0.5 in every block
and lose the block adaptivity the ablation is about.)

The dense pass that measures drift also gathers the statistics: each sample keeps the squared
inputs of its visual tokens ranked by saliency (at most the budget's cap), and the budget picks
the prefix once ``sbar`` is known, so ATV costs one dense and one pruned pass per block, as Wanda.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from ..errors import VlmpruneError
from .attention import AttentionRecorder
from .base import WeightMethod, wanda_scores
from .statistics import InputNorms

SALIENCIES = ("drift", "attention", "attention-literal", "diversity")
SELECTIONS = ("topk", "maxmin", "random")


def drift(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
    """Eq. 4: cosine distance between a token's block input and output."""
    return 1 - F.cosine_similarity(x_in.float(), x_out.float(), dim=-1)


def diversity(x: torch.Tensor) -> torch.Tensor:
    """Seed A5.2: mean cosine distance of each visual token to the other visual tokens."""
    unit = F.normalize(x.float(), dim=-1)
    n = unit.shape[0]
    if n < 2:
        return torch.zeros(n, device=x.device)
    distance = 1 - unit @ unit.T
    return (distance.sum(dim=1) - distance.diagonal()) / (n - 1)


def maxmin_order(x: torch.Tensor, first: int, count: int) -> torch.Tensor:
    """Greedy max-min diversity: start at ``first``, then repeatedly add the token whose smallest
    cosine distance to those chosen is largest; any prefix is the greedy subset of that size."""
    unit = F.normalize(x.float(), dim=-1)
    order = [first]
    nearest = 1 - unit @ unit[first]
    nearest[first] = -1
    for _ in range(count - 1):
        pick = int(torch.argmax(nearest))
        order.append(pick)
        nearest = torch.minimum(nearest, 1 - unit @ unit[pick])
        nearest[order] = -1
    return torch.tensor(order[:count], dtype=torch.long, device=x.device)


def budget(saliency: float, alpha: float, n_text: int, n_visual: int) -> int:
    """Eq. 6: ``K_n = clip(round(min(1, alpha * sbar) * N_text), 0, N_vis)`` (round half up)."""
    return max(0, min(n_visual, int(math.floor(min(1.0, alpha * saliency) * n_text + 0.5))))


class ATV(WeightMethod):
    name = "atv"

    def __init__(self, sparsity: float | None = None, pattern=None, alpha: float = 1.0, saliency: str = "drift",
                 select: str | None = None, budget: str | int = "adaptive", seed: int = 0):
        super().__init__(sparsity, pattern)
        if saliency not in SALIENCIES:
            raise VlmpruneError(f"unknown ATV saliency {saliency!r}; choose one of: {', '.join(SALIENCIES)}")
        select = select or ("maxmin" if saliency == "diversity" else "topk")
        if select not in SELECTIONS:
            raise VlmpruneError(f"unknown ATV selection {select!r}; choose one of: {', '.join(SELECTIONS)}")
        if budget != "adaptive" and not (isinstance(budget, int) and budget >= 0):
            raise VlmpruneError(f"ATV budget must be 'adaptive' or a token count >= 0, got {budget!r}")
        if float(alpha) < 0:
            raise VlmpruneError(f"ATV alpha must be >= 0, got {alpha}")
        self.alpha, self.saliency, self.select, self.budget, self.seed = float(alpha), saliency, select, budget, int(seed)
        self.history: list[dict[str, float]] = []   # per block: saliency and mean visual tokens kept

    def settings(self):
        return {"alpha": self.alpha, "saliency": self.saliency, "select": self.select, "budget": self.budget}

    def _order(self, s: torch.Tensor, x_visual: torch.Tensor, cap: int, generator: torch.Generator) -> torch.Tensor:
        if cap == 0:
            return s.new_zeros(0, dtype=torch.long)
        if self.select == "topk":
            return torch.sort(s, descending=True, stable=True).indices[:cap]
        if self.select == "maxmin":
            return maxmin_order(x_visual, int(torch.argmax(s)), cap)
        return torch.randperm(s.numel(), generator=generator)[:cap].to(s.device)

    @torch.no_grad()
    def collect(self, ctx) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        """One dense pass over the block: the input norms ``r`` of every target and the outputs."""
        generator = torch.Generator().manual_seed(self.seed * 100003 + ctx.index)
        ranked: list[dict[str, tuple]] = []   # per sample and target: (text sum of x^2, visual x^2 by rank)
        counts: list[tuple[int, int]] = []              # per sample: (N_text, N_vis)
        saliency_sum, saliency_count = 0.0, 0
        outputs = []
        recorder = AttentionRecorder(ctx.llm_config) if self.saliency.startswith("attention") else None
        with ctx.capture() as seen, (recorder or contextlib.nullcontext()):
            for i in range(ctx.n_samples):
                visual = ctx.visual(i)
                text = ~visual
                if recorder is not None:
                    recorder.rows = text.nonzero().flatten()
                out = ctx.forward(i)
                outputs.append(out)
                x_in = ctx.hidden(i)
                if self.saliency == "drift":
                    s = drift(x_in[visual], out[0][visual])
                elif recorder is not None:
                    s = recorder.probs[:, visual].mean(dim=0)
                else:
                    s = diversity(x_in[visual])
                n_text, n_vis = int(text.sum()), int(visual.sum())
                if self.saliency == "attention":
                    s = s * n_vis                      # relative to an even share (module docstring)
                saliency_sum += float(s.sum())
                saliency_count += n_vis
                cap = min(n_vis, n_text if self.budget == "adaptive" else self.budget)
                order = self._order(s, x_in[visual], cap, generator)
                shared: dict[tuple, torch.Tensor] = {}
                per_name = {}
                for name, (x, _) in seen.items():
                    key = (x.data_ptr(), tuple(x.shape))
                    if key not in shared:
                        xf = x.float()
                        text_part = xf[text].pow(2).sum(dim=0)
                        shared[key] = (text_part, xf[visual][order].pow(2))
                    per_name[name] = shared[key]
                ranked.append(per_name)
                counts.append((n_text, n_vis))
        sbar = saliency_sum / max(saliency_count, 1)
        budgets = [budget(sbar, self.alpha, t, v) if self.budget == "adaptive" else min(self.budget, v)
                   for t, v in counts]
        self.history.append({"block": ctx.index, "saliency": sbar,
                             "visual_tokens": sum(budgets) / max(len(budgets), 1)})
        norms = {}
        for name, linear in ctx.linears.items():
            acc = InputNorms(linear.in_features, ctx.device)
            for per_name, k in zip(ranked, budgets):
                text_part, visual_rows = per_name[name]
                acc.add_squared_sum(text_part + visual_rows[:k].sum(dim=0))
            norms[name] = acc.value
        return norms, outputs

    def prune_block(self, ctx) -> None:
        norms, _ = self.collect(ctx)
        for name, linear in ctx.linears.items():
            self.prune_with_scores(name, linear, wanda_scores(linear.weight, norms[name]))


def drift_profile(model, calibration, alpha: float = 1.0, device=None) -> list[dict[str, float]]:
    """Per block of the dense model: mean visual drift and mean visual tokens ATV would select."""
    from .sequential import sweep

    atv = ATV(alpha=alpha)
    sweep(model, calibration, lambda ctx: atv.collect(ctx)[1], device=device, desc="drift")
    return atv.history
