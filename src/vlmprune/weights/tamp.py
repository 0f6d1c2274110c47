"""TAMP (Lee et al., 2025): diversity-aware layer sparsity and adaptive multimodal input activation.

Diversity-aware sparsity: a dense sweep measures, per Linear, the mean pairwise cosine similarity
of its outputs within visual tokens, within text tokens and across (``s_vv, s_tt, s_vt``);
``d = (1 - s_vv) + (1 - s_tt) + (1 - s_vt)``; every layer keeps at least ``1 - s_max`` of its
weights (``s_max = s + 0.1``) and the remaining kept weights are shared in proportion to ``d``.

Adaptive multimodal input activation: per Linear and sample, tokens are picked greedily by the
last token's attention propagated over a 3-nearest-neighbour graph of the Linear's outputs (the
picked token's neighbours are penalised by ``exp(-0.2 D)``) until the MMD^2 between picked and all
tokens (RBF kernel, sigma 1) falls under ``0.1 sqrt(1 - density)``, density being the mean of the
three similarities; Wanda statistics over the picked tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import AttentionRecorder
from .base import WeightMethod, wanda_scores
from .statistics import InputNorms

NEIGHBOURS = 3


def modality_similarities(unit: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """(B, 3): mean pairwise cosine similarity within visual, within text and across, for
    unit-norm outputs ``unit`` (B, L, C) and the (L,) visual mask. Empty groups give 0."""
    sim = unit @ unit.transpose(1, 2)
    text = ~visual

    def mean_within(mask):
        n = int(mask.sum())
        if n < 2:
            return sim.new_zeros(sim.shape[0])
        block = sim[:, mask][:, :, mask]
        return (block.sum(dim=(1, 2)) - block.diagonal(dim1=1, dim2=2).sum(dim=1)) / (n * (n - 1))

    across = sim[:, visual][:, :, text]
    cross = across.mean(dim=(1, 2)) if across.numel() else sim.new_zeros(sim.shape[0])
    return torch.stack([mean_within(visual), mean_within(text), cross], dim=1)


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


class TAMP(WeightMethod):
    name = "tamp"

    def __init__(self, sparsity: float | None = None, pattern=None, max_gap: float = 0.1):
        super().__init__(sparsity, pattern)
        self.max_gap = float(max_gap)
        self.needs_dense_sweep = self.pattern is None      # N:M fixes every layer's sparsity
        self.similarity: dict[str, torch.Tensor] = {}
        self.sparsities: dict[str, float] = {}

    def settings(self):
        return {"max_gap": self.max_gap}

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
        sizes = {name: linear.weight.numel() for linears in per_block for name, linear in linears.items()}
        importance = {name: float(3 - self.similarity[name].sum()) for name in sizes}
        floor = 1 - min(self.sparsity + self.max_gap, 1.0)
        density = {name: floor for name in sizes}
        spare = (1 - self.sparsity - floor) * sum(sizes.values())  # kept weights still to share
        open_ = set(sizes)
        while spare > 1e-9 and open_:           # share in proportion to d, capping density at 1
            weight = sum(importance[n] * sizes[n] for n in open_)
            if weight <= 0:                     # no diversity anywhere: share the rest evenly
                importance = dict.fromkeys(importance, 1.0)
                continue
            share = spare / weight
            full = {n for n in open_ if density[n] + share * importance[n] >= 1}
            if not full:
                for n in open_:
                    density[n] += share * importance[n]
                break
            for n in full:
                spare -= (1 - density[n]) * sizes[n]
                density[n] = 1.0
            open_ -= full
        self.sparsities = whole_row_sparsities({name: 1 - value for name, value in density.items()},
                                               {name: tuple(linear.weight.shape) for linears in per_block
                                                for name, linear in linears.items()})

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
