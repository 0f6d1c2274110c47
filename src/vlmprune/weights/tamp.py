"""TAMP (Lee et al., 2025): adaptive multimodal input activation (AMIA) and, as an option,
diversity-aware layer sparsity (DAS).

Default, ``tamp``: every layer at the target sparsity, Wanda statistics over the tokens AMIA picks.
That is TAMP as ATV-Pruning compares with it (seed 002): its TAMP rows include 2:4 and 4:8, where
N:M fixes every layer's sparsity, so the comparison is AMIA under uniform sparsity.

AMIA: per Linear and sample, tokens are picked greedily by the last token's head-mean attention
propagated over a 3-nearest-neighbour graph of the Linear's unit-norm outputs (a picked token's
neighbours are penalised by ``exp(-0.2 D)``, D the cosine distance) until the MMD^2 between picked
and all tokens (RBF kernel, sigma 1: ``exp(-||a - b||^2 / 2) = exp(-D)`` on unit vectors) falls
under ``0.1 sqrt(1 - density)``, density being the mean of the three similarities below.

DAS, ``tamp:das=1``: a dense sweep measures per Linear the similarities of its unit-norm outputs
``s_vv, s_tt`` (within visual, within text tokens) and ``s_vt`` (across), averaged over samples;
``d = (1 - s_vv) + (1 - s_tt) + (1 - s_vt)``. Every layer keeps at least ``1 - s_max`` of its
weights (``s_max = s + max_gap``, 0.1) and the rest of the kept-weight budget is handed out as a
number of weights in proportion to ``d`` alone, a layer's size not weighing in (capped at the
layer's size, the excess shared again among the others). As in the authors' code
(github.com/G-JWLee/TAMP, ``layer_single_base_pruner.py``: ``cos_pairwise_density`` and
``compute_the_sparsity_per_group`` with ``score_method=density_sum``, one group per weight):
``s_vv`` and ``s_tt`` are the means of the positive pairwise similarities only (upper triangle
``> 0``), ``s_vt`` the mean of all cross pairs, and a layer's ``d`` is not multiplied by its size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import VlmpruneError
from .attention import AttentionRecorder
from .base import WeightMethod, wanda_scores
from .statistics import InputNorms

NEIGHBOURS = 3


def modality_similarities(unit: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """(B, 3): ``s_vv, s_tt, s_vt`` for unit-norm outputs ``unit`` (B, L, C) and the (L,) visual
    mask: within a modality the mean of the positive pairwise similarities (pairs i < j), across
    the mean of every visual-text pair (TAMP's reading). A group without such pairs gives 0."""
    sim = unit @ unit.transpose(1, 2)
    text = ~visual

    def positive_mean_within(mask):
        n = int(mask.sum())
        pairs = torch.triu(torch.ones(n, n, dtype=torch.bool, device=sim.device), diagonal=1)
        values = sim[:, mask][:, :, mask][:, pairs]
        positive = values > 0
        return (values * positive).sum(dim=1) / positive.sum(dim=1).clamp(min=1)

    across = sim[:, visual][:, :, text]
    cross = across.mean(dim=(1, 2)) if across.numel() else sim.new_zeros(sim.shape[0])
    return torch.stack([positive_mean_within(visual), positive_mean_within(text), cross], dim=1)


@torch.no_grad()
def amia_select(unit: torch.Tensor, score: torch.Tensor, density: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: the tokens picked for each of B Linears sharing one sample.

    ``unit``: (B, L, C) unit-norm outputs; ``score``: (L,) last-token attention; ``density``: (B,)."""
    b, length, _ = unit.shape
    distance = 1 - unit @ unit.transpose(1, 2)
    kernel = torch.exp(-distance)                        # RBF, sigma 1: ||a - b||^2 / 2 = 1 - cos for unit vectors
    k = min(NEIGHBOURS, length - 1)
    knn = torch.topk(distance, k + 1, dim=2, largest=False).indices[:, :, 1:]
    knn_distance = torch.gather(distance, 2, knn)
    graph = score[None, :] + (torch.exp(-knn_distance) * score[knn]).sum(dim=2)
    k_xx = kernel.mean(dim=(1, 2))
    column_mean = kernel.mean(dim=1)                     # (B, L): mean_i K(i, j)
    threshold = 0.1 * torch.sqrt((1 - density).clamp(min=0))
    chosen = torch.zeros(b, length, dtype=torch.bool, device=unit.device)
    cross_sum = torch.zeros(b, device=unit.device)       # sum_{j in S} mean_i K(i, j)
    within_sum = torch.zeros(b, device=unit.device)      # sum_{i, j in S} K(i, j)
    active = torch.ones(b, dtype=torch.bool, device=unit.device)
    rows = torch.arange(b, device=unit.device)
    for size in range(1, length + 1):
        pick = torch.argmax(graph, dim=1)
        neighbours = knn[rows, pick]
        penalty = torch.exp(-0.2 * distance[rows[:, None], pick[:, None], neighbours]) * graph[rows, pick].clamp(min=0)[:, None]
        graph[rows[:, None], neighbours] -= penalty * active[:, None]
        within_sum += active * (2 * (kernel[rows, pick] * chosen).sum(dim=1) + kernel[rows, pick, pick])
        cross_sum += active * column_mean[rows, pick]
        chosen[rows[active], pick[active]] = True
        graph = graph.masked_fill(chosen, float("-inf"))
        mmd2 = k_xx + within_sum / size ** 2 - 2 * cross_sum / size
        active &= ~(mmd2 < threshold)
        if not active.any():
            break
    return chosen


def whole_row_sparsities(sparsities: dict[str, float], shapes: dict[str, tuple[int, int]]) -> dict[str, float]:
    """Round each layer's sparsity to a whole count of weights pruned per row, carrying the
    rounding error to the next layer, so that the total pruned equals ``sum s_l * size_l`` within
    half a row (flooring every layer would land under the target)."""
    rounded, wanted, done = {}, 0.0, 0
    for name, sparsity in sparsities.items():
        rows, cols = shapes[name]
        wanted += min(max(sparsity, 0.0), 1.0) * rows * cols
        count = min(max(round((wanted - done) / rows), 0), cols)
        done += count * rows
        rounded[name] = count / cols
    return rounded


def diversity_allocation(importance: dict[str, float], sizes: dict[str, int], sparsity: float,
                         max_sparsity: float) -> dict[str, float]:
    """DAS: per-layer sparsities that prune ``sparsity`` of all weights. Each layer first keeps
    ``(1 - max_sparsity) * size``; the kept weights still to hand out go to the layers as counts
    in proportion to ``importance`` (``d``), a full layer's excess being shared again."""
    kept = {name: (1 - max_sparsity) * size for name, size in sizes.items()}
    spare = (1 - sparsity) * sum(sizes.values()) - sum(kept.values())
    open_ = set(sizes)
    while spare > 1e-9 and open_:
        total = sum(importance[n] for n in open_)
        if total <= 0:                          # no diversity left anywhere: equal counts
            importance = dict.fromkeys(importance, 1.0)
            continue
        share = spare / total
        full = {n for n in open_ if kept[n] + share * importance[n] >= sizes[n]}
        if not full:
            for n in open_:
                kept[n] += share * importance[n]
            break
        for n in full:
            spare -= sizes[n] - kept[n]
            kept[n] = float(sizes[n])
        open_ -= full
    return {name: 1 - kept[name] / size for name, size in sizes.items()}


class TAMP(WeightMethod):
    name = "tamp"

    def __init__(self, sparsity: float | None = None, pattern=None, das: bool | int = False, max_gap: float = 0.1):
        super().__init__(sparsity, pattern)
        if das not in (0, 1):
            raise VlmpruneError(f"TAMP das must be 0 or 1 (diversity-aware layer sparsity off or on), got {das!r}")
        if das and self.pattern is not None:
            raise VlmpruneError("TAMP das=1 sets per-layer sparsities, which an N:M pattern fixes: drop das or the pattern")
        self.das, self.max_gap = bool(das), float(max_gap)
        self.needs_dense_sweep = self.das
        self.similarity: dict[str, torch.Tensor] = {}
        self.sparsities: dict[str, float] = {}

    def settings(self):
        return {"das": self.das, "max_gap": self.max_gap}

    def layer_sparsity(self, name: str) -> float:
        return self.sparsities.get(name, self.sparsity)

    @torch.no_grad()
    def observe_dense(self, ctx) -> list[torch.Tensor]:
        outputs = []
        with ctx.capture(outputs=True) as seen:
            for i in range(ctx.n_samples):
                outputs.append(ctx.forward(i))
                for name, (_, y) in seen.items():
                    sims = modality_similarities(F.normalize(y.float(), dim=-1)[None], ctx.visual(i))[0]
                    self.similarity[name] = self.similarity.get(name, 0) + sims / ctx.n_samples
        return outputs

    def allocate(self, per_block) -> None:
        shapes = {name: tuple(linear.weight.shape) for linears in per_block for name, linear in linears.items()}
        importance = {name: float(3 - self.similarity[name].sum()) for name in shapes}
        sparsities = diversity_allocation(importance, {n: rows * cols for n, (rows, cols) in shapes.items()},
                                          self.sparsity, min(self.sparsity + self.max_gap, 1.0))
        self.sparsities = whole_row_sparsities(sparsities, shapes)

    @torch.no_grad()
    def prune_block(self, ctx) -> None:
        names = list(ctx.linears)
        norms = {name: InputNorms(linear.in_features, ctx.device) for name, linear in ctx.linears.items()}
        recorder = AttentionRecorder(ctx.llm_config)
        with ctx.capture(outputs=True) as seen, recorder:
            for i in range(ctx.n_samples):
                length = ctx.hidden(i).shape[0]
                recorder.rows = torch.tensor([length - 1], device=ctx.device)
                ctx.forward(i)
                score = recorder.probs[0].float()
                by_width: dict[int, list[str]] = {}
                for name in names:
                    by_width.setdefault(seen[name][1].shape[-1], []).append(name)
                for group in by_width.values():
                    unit = F.normalize(torch.stack([seen[n][1].float() for n in group]), dim=-1)
                    density = modality_similarities(unit, ctx.visual(i)).mean(dim=1)
                    picked = amia_select(unit, score, density)
                    for n, keep in zip(group, picked):
                        norms[n].add(seen[n][0][keep])
        for name, linear in ctx.linears.items():
            self.prune_with_scores(name, linear, wanda_scores(linear.weight, norms[name].value))
