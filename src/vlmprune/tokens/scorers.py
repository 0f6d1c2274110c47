"""Pure scoring and selection math shared by the token methods (no hooks, no modules).

Every function works on a batch: tensors are (B, ...) and selections are (B, k) indices into the
candidate axis. Ties break towards the lower index so that results are reproducible.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..errors import VlmpruneError
from .base import ModelPlan, Site, SiteContext

ROLLOUTS = ("residual", "multiply", "mean", "max", "layer", "group-mean")


def resolve_keep(keep: int | float, n: int) -> int:
    """The project's ``keep`` convention: int >= 1 is a count, a float in (0, 1) a fraction of ``n``."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise VlmpruneError(f"keep={keep!r} is not a number: write an integer count or a fraction in (0, 1)")
    if isinstance(keep, float) and not keep.is_integer():
        if not 0 < keep < 1:
            raise VlmpruneError(f"keep={keep} must be a count >= 1 or a fraction in (0, 1)")
        return max(1, round(keep * n))
    count = int(keep)
    if count < 1:
        raise VlmpruneError(f"keep={keep} must be a count >= 1 or a fraction in (0, 1)")
    if count > n:
        raise VlmpruneError(f"keep={count} is more than the {n} visual tokens: lower keep")
    return count


def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(B, V) -> (B, k) indices of the k largest scores; equal scores prefer the lower index."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return order[:, :k]


def gather_tokens(states: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, N, D) states at (B, K) positions -> (B, K, D)."""
    return states.gather(1, index.unsqueeze(-1).expand(-1, -1, states.shape[-1]))


def _row_normalise(matrix: torch.Tensor) -> torch.Tensor:
    return matrix / matrix.sum(dim=-1, keepdim=True).clamp_min(1e-12)


def grouped_rollout(attentions: Sequence[torch.Tensor], variant: str = "residual") -> torch.Tensor:
    """Combine one group's head-mean attention maps (each (B, N, N), first layer first) into one.

    ``residual`` (IVTP Eq. 3): ``R <- norm(A + I) @ R`` from ``R = I``; rows are renormalised, which
    keeps every R row-stochastic and leaves the ranking unchanged. ``multiply``: ``R <- A @ R`` (no +I).
    ``mean`` / ``max``: the element-wise mean / max of the group's ``norm(A + I)`` instead of their
    product (max renormalised). ``layer``: the group's last map alone. ``group-mean``: the plain mean
    of the group's maps.
    """
    if variant not in ROLLOUTS:
        raise VlmpruneError(f"unknown rollout {variant!r}; choose one of: {', '.join(ROLLOUTS)}")
    if not attentions:
        raise ValueError("grouped_rollout needs at least one attention map")
    maps = [a.float().nan_to_num(0.0) for a in attentions]
    eye = torch.eye(maps[0].shape[-1], dtype=maps[0].dtype, device=maps[0].device)
    if variant == "layer":
        return maps[-1]
    if variant == "group-mean":
        return torch.stack(maps).mean(0)
    if variant in ("mean", "max"):
        stacked = torch.stack([_row_normalise(a + eye) for a in maps])
        return stacked.mean(0) if variant == "mean" else _row_normalise(stacked.amax(0))
    rollout = eye.expand_as(maps[0])
    for a in maps:
        step = _row_normalise(a + eye) if variant == "residual" else a
        rollout = step @ rollout
    return rollout


def grouped_rollout_row(attention: Callable[..., torch.Tensor], layers: Sequence[int], query: torch.Tensor,
                        variant: str = "residual") -> torch.Tensor:
    """Row ``query`` (B,) of :func:`grouped_rollout` over ``layers``, reading only what it needs:
    the query rows of every layer, plus full maps of the earlier layers for the products
    (``residual`` / ``multiply``). ``attention(layer, rows)`` is :attr:`SiteContext.attention`."""
    if variant not in ROLLOUTS:
        raise VlmpruneError(f"unknown rollout {variant!r}; choose one of: {', '.join(ROLLOUTS)}")
    rows = query.view(-1, 1)

    def query_row(layer: int) -> torch.Tensor:
        return attention(layer, rows)[:, 0].float().nan_to_num(0.0)

    def plus_identity(row: torch.Tensor) -> torch.Tensor:
        return _row_normalise(row.scatter_add(1, rows, torch.ones_like(rows, dtype=row.dtype)))

    if variant == "layer":
        return query_row(layers[-1])
    if variant == "group-mean":
        return torch.stack([query_row(layer) for layer in layers]).mean(0)
    if variant in ("mean", "max"):
        stacked = torch.stack([plus_identity(query_row(layer)) for layer in layers])
        return stacked.mean(0) if variant == "mean" else _row_normalise(stacked.amax(0))
    row = query_row(layers[-1])
    row = plus_identity(row) if variant == "residual" else row
    for layer in reversed(layers[:-1]):
        full = attention(layer).float().nan_to_num(0.0)
        if variant == "residual":
            # row @ norm(A + I) without forming A + I: with s the row sums of A, that is w @ A + w
            # for w = row / (s + 1) (s = 1 for a softmax row, 0 for a fully masked one)
            weight = row / (full.sum(dim=-1) + 1)
            row = (weight.unsqueeze(1) @ full).squeeze(1) + weight
        else:
            row = (row.unsqueeze(1) @ full).squeeze(1)
    return row


def significance(query_row: torch.Tensor, values: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """ATS significance (IVTP Eq. 4): ``S_i = R[q, i] ||V_i|| / sum_j R[q, j] ||V_j||``.

    ``query_row``: (B, N) the row of [CLS] (or the pseudo-[CLS]) in the combined attention;
    ``values``: (B, N, C) value vectors of the group's last layer, heads concatenated;
    ``candidates``: (B, V) positions of the tokens that compete (j runs over these only).
    """
    weight = query_row.float().gather(1, candidates)
    norms = values.float().norm(dim=-1).gather(1, candidates)
    score = weight * norms
    return score / score.sum(dim=-1, keepdim=True).clamp_min(1e-12)


def cosine_to(tokens: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(B, V, D), (B, D) -> (B, V) cosine similarity of every token to the reference ([CLS] for TopK)."""
    return F.cosine_similarity(tokens.float(), reference.float().unsqueeze(1), dim=-1)


def evit_fuse(tokens: torch.Tensor, attention: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """EViT: keep the ``k - 1`` most [CLS]-attended tokens, fuse the rest into one.

    The fused token is the attention-weighted mean of the inattentive tokens; it takes the slot
    (and so the position) of the most attended of them. Returns ``keep`` (B, k), ``hidden`` (B, k, D).
    """
    n = tokens.shape[1]
    if k >= n:
        keep = torch.arange(n, device=tokens.device).expand(tokens.shape[0], n)
        return keep, tokens
    order = top_indices(attention, n)
    kept, rest = order[:, : k - 1], order[:, k - 1 :]
    weights = attention.float().gather(1, rest)
    weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-12)
    rest_tokens = gather_tokens(tokens, rest)
    fused = (weights.unsqueeze(-1) * rest_tokens.float()).sum(1, keepdim=True).to(tokens.dtype)
    kept_tokens = gather_tokens(tokens, kept)
    keep = torch.cat([kept, rest[:, :1]], dim=1)
    return keep, torch.cat([kept_tokens, fused], dim=1)


def bipartite_soft_matching(
    metric: torch.Tensor, tokens: torch.Tensor, sizes: torch.Tensor, r: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ToMe: alternate tokens into A (even) and B (odd), match each a to its most similar b
    (cosine of ``metric``), merge the ``r`` best-matched a into their b by size-weighted mean.

    Returns ``keep`` (B, V - r) indices of the survivors (unmerged a and every b), their merged
    ``hidden`` and their ``sizes`` (sums of the merged sizes, for proportional attention).
    """
    bsz, n, dim = tokens.shape
    r = min(r, n // 2)
    a_idx = torch.arange(0, n, 2, device=tokens.device)
    b_idx = torch.arange(1, n, 2, device=tokens.device)
    if r <= 0:
        return torch.arange(n, device=tokens.device).expand(bsz, n), tokens, sizes
    normed = F.normalize(metric.float(), dim=-1)
    similarity = normed[:, a_idx] @ normed[:, b_idx].transpose(1, 2)
    best, match = similarity.max(dim=-1)
    order = torch.sort(best, dim=-1, descending=True, stable=True).indices
    merged_a, kept_a = order[:, :r], order[:, r:]
    target_b = match.gather(1, merged_a)

    weighted = tokens.float() * sizes.float().unsqueeze(-1)
    b_sum = weighted[:, b_idx].clone()
    b_size = sizes.float()[:, b_idx].clone()
    src = gather_tokens(weighted[:, a_idx], merged_a)
    b_sum.scatter_add_(1, target_b.unsqueeze(-1).expand(-1, -1, dim), src)
    b_size.scatter_add_(1, target_b, sizes.float()[:, a_idx].gather(1, merged_a))

    kept_a_sorted = kept_a.sort(dim=-1).values
    keep = torch.cat([a_idx[kept_a_sorted], b_idx.expand(bsz, -1)], dim=1)
    a_tokens = gather_tokens(tokens[:, a_idx], kept_a_sorted)
    hidden = torch.cat([a_tokens.float(), b_sum / b_size.unsqueeze(-1)], dim=1).to(tokens.dtype)
    new_sizes = torch.cat([sizes[:, a_idx].gather(1, kept_a_sorted).float(), b_size], dim=1)
    return keep, hidden, new_sizes.to(sizes.dtype)


def merge_schedule(n: int, target: int, steps: int) -> list[int]:
    """Token counts after each of ``steps`` equal reductions from ``n`` to ``target`` (earlier steps
    take the remainder)."""
    if steps <= 0:
        return []
    total = n - target
    per, extra = divmod(total, steps)
    counts, current = [], n
    for step in range(steps):
        current -= per + (1 if step < extra else 0)
        counts.append(current)
    return counts


def visionzip_select(
    tokens: torch.Tensor, cls_attention: torch.Tensor, keys: torch.Tensor, dominant: int, contextual: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip: ``dominant`` tokens by [CLS] attention, then ``contextual`` tokens from the rest.

    Contextual targets are spread uniformly over the remaining tokens (every ``step``-th); each other
    remaining token joins the target with the most similar (normalised) key, and a target becomes
    itself plus the mean of the tokens that joined it, as in VisionZip's reference code.
    Returns ``keep`` (B, dominant + contextual) and ``hidden``.
    """
    bsz, n, dim = tokens.shape
    order = top_indices(cls_attention, n)
    dom, rest = order[:, :dominant], order[:, dominant:].sort(dim=-1).values
    dom_tokens = gather_tokens(tokens, dom)
    if contextual <= 0 or rest.shape[1] == 0:
        return dom, dom_tokens
    contextual = min(contextual, rest.shape[1])
    step = max(1, rest.shape[1] // contextual)
    targets = list(range(0, rest.shape[1], step))[:contextual]      # positions only: no tensor values read
    others = sorted(set(range(rest.shape[1])) - set(targets))
    targets, others = (torch.tensor(p, dtype=torch.long, device=tokens.device) for p in (targets, others))
    rest_keys = F.normalize(gather_tokens(keys.float(), rest), dim=-1)
    rest_tokens = gather_tokens(tokens, rest).float()
    similarity = rest_keys[:, others] @ rest_keys[:, targets].transpose(1, 2)
    assign = F.one_hot(similarity.argmax(-1), contextual).float()          # (B, M, contextual)
    counts = assign.sum(1).clamp_min(1).unsqueeze(-1)
    merged = assign.transpose(1, 2) @ rest_tokens[:, others] / counts
    ctx_tokens = rest_tokens[:, targets] + merged
    keep = torch.cat([dom, rest[:, targets]], dim=1)
    return keep, torch.cat([dom_tokens, ctx_tokens.to(tokens.dtype)], dim=1)


def cosine_distance(features: torch.Tensor) -> torch.Tensor:
    """(B, V, D) -> (B, V, V) ``1 - cos`` between every pair (a matmul, so the FLOP count sees it)."""
    normed = F.normalize(features.float(), dim=-1)
    return 1.0 - normed @ normed.transpose(1, 2)


def farthest_from(distance: torch.Tensor, chosen: torch.Tensor, count: int) -> torch.Tensor:
    """Greedy max-min selection on a (B, V, V) distance matrix (zero on the diagonal), started from
    the (B, c) indices ``chosen`` (c >= 1): (B, count) more indices in pick order, each the candidate
    farthest from its nearest kept one (ties to the lower index); a kept one is never picked again."""
    batch, n, _ = distance.shape
    nearest = distance.gather(1, chosen[:, :, None].expand(-1, -1, n)).amin(1)           # (B, V)
    nearest = nearest.scatter(1, chosen, -float("inf"))   # never again, even where rounding leaves a kept token > 0
    picks = []
    for _ in range(count):
        pick = nearest.argmax(-1)
        picks.append(pick)
        nearest = torch.minimum(nearest, distance.gather(1, pick.view(batch, 1, 1).expand(-1, 1, n)).squeeze(1))
        nearest = nearest.scatter(1, pick[:, None], -float("inf"))
    return torch.stack(picks, 1) if picks else chosen[:, :0]


def max_min_diverse(features: torch.Tensor, k: int) -> torch.Tensor:
    """DivPrune: greedy max-min selection under cosine distance ``1 - cos``.

    The first pick is the token farthest from its nearest neighbour; every next pick maximises its
    distance to the nearest token already picked (:func:`farthest_from`). (B, V, D) -> (B, k) in pick order.
    """
    distance = cosine_distance(features)
    eye = torch.eye(distance.shape[-1], dtype=torch.bool, device=features.device)
    first = distance.masked_fill(eye, float("inf")).amin(-1).argmax(-1, keepdim=True)
    return torch.cat([first, farthest_from(distance, first, k - 1)], dim=1)


def spatial_pool(tokens: torch.Tensor, grid: tuple[int, int], out: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear resize of a (rows x cols) token grid to ``out``.

    Returns ``hidden`` (B, out_r * out_c, D) and, for each pooled token, ``keep``: the source token
    nearest the centre of its cell, whose position (and overlay cell) the pooled token takes.
    """
    bsz, n, dim = tokens.shape
    rows, cols = grid
    grid_tokens = tokens.float().transpose(1, 2).reshape(bsz, dim, rows, cols)
    pooled = F.interpolate(grid_tokens, size=out, mode="bilinear", align_corners=False)
    hidden = pooled.flatten(2).transpose(1, 2).to(tokens.dtype)
    return cell_centres(grid, out).to(tokens.device).expand(bsz, -1), hidden


def cell_centres(grid: tuple[int, int], out: tuple[int, int]) -> torch.Tensor:
    """(out_r * out_c,) index of the ``grid`` token nearest the centre of each cell of an ``out`` grid."""
    rows, cols = grid
    centre_r = ((torch.arange(out[0]) + 0.5) * rows / out[0]).floor().long().clamp_max(rows - 1)
    centre_c = ((torch.arange(out[1]) + 0.5) * cols / out[1]).floor().long().clamp_max(cols - 1)
    return (centre_r[:, None] * cols + centre_c[None, :]).flatten()


def ivtp_schedule(n_visual: int, target: int, vit_steps: int, llm_steps: int, threshold: float) -> tuple[list[int], list[int]]:
    """IVTP's 2n rule: token counts after each ViT step and each LLM step.

    If ``target < threshold`` (128 of 576 in LLaVA-1.5, scaled with the model) and both stages
    prune, the ViT goes from ``n_visual`` to ``2 * target`` and the LLM from there to ``target``;
    otherwise every pruning step of both stages removes the same number of tokens.
    """
    if vit_steps and llm_steps and target < threshold and 2 * target < n_visual:
        return merge_schedule(n_visual, 2 * target, vit_steps), merge_schedule(2 * target, target, llm_steps)
    counts = merge_schedule(n_visual, target, vit_steps + llm_steps)
    return counts[:vit_steps], counts[vit_steps:]


def square_grid(n: int) -> tuple[int, int]:
    """The (side, side) grid of ``n`` visual tokens, or a one-line error when ``n`` is not square."""
    side = math.isqrt(n)
    if side * side != n:
        raise VlmpruneError(f"{n} visual tokens do not form a square grid: use a method that needs no grid")
    return side, side


def group_ends(last: int, every: int) -> list[int]:
    """Pruning layers for groups of ``every`` layers over layers ``0..last-1``: ``every, 2*every, ...``
    and ``last`` itself when the final group is shorter."""
    if every < 1:
        raise VlmpruneError(f"a group of {every} layers is impossible: use a group size >= 1")
    ends = list(range(every, last + 1, every))
    return ends if ends and ends[-1] == last else ends + [last]


def vision_sites(plan: ModelPlan, every: int, name: str) -> list[Site]:
    """Sites after every ``every`` vision layers up to the layer the LLM reads (inclusive)."""
    if plan.n_vision_layers == 0 or not plan.has_cls:
        raise VlmpruneError(f"{name} prunes inside a vision tower with [CLS], which {plan.family} lacks: "
                            "use a method that prunes before the LLM (divprune, pooling, fastv)")
    return [Site("vision", layer) for layer in group_ends(plan.vision_feature_layer + 1, every)]


def count_after(sites: list[Site], site: Site, n_visual: int, target: int) -> int:
    """Visual tokens left after ``site`` when every site removes the same number."""
    return merge_schedule(n_visual, target, len(sites))[sites.index(site)]


def row_attention(ctx: SiteContext, layer: int, row: torch.Tensor) -> torch.Tensor:
    """(B, V) head-mean attention of the per-sample ``row`` (B,) to the current visual tokens; only
    that row's queries are scored, not the whole (N, N) map."""
    return ctx.attention(layer, row.view(-1, 1))[:, 0].gather(1, ctx.visual)


def cls_attention(ctx: SiteContext, layer: int) -> torch.Tensor:
    """(B, V) head-mean [CLS] attention to the current visual tokens at vision ``layer``."""
    return row_attention(ctx, layer, torch.full((ctx.hidden.shape[0],), ctx.cls, device=ctx.hidden.device))
