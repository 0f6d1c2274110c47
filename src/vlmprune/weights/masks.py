"""Mask rules shared by every weight method: which entries of a weight to zero, given scores.

A mask is a bool tensor shaped like the weight, True where the weight is pruned. Scores are
"higher is more important"; ties break by column order (stable sort), so masks are reproducible.
"""
from __future__ import annotations

import torch

from ..errors import VlmpruneError

Pattern = tuple[int, int]  # (N, M): keep N of every M consecutive input columns


def parse_pattern(pattern: str | Pattern | None) -> Pattern | None:
    """``"2:4"`` -> ``(2, 4)``; ``None``/``"unstructured"`` -> ``None`` (unstructured)."""
    if pattern is None or (isinstance(pattern, str) and pattern.strip().lower() in ("", "none", "unstructured")):
        return None
    if isinstance(pattern, tuple):
        n, m = pattern
    else:
        n_text, sep, m_text = str(pattern).partition(":")
        if not sep or not n_text.strip().isdigit() or not m_text.strip().isdigit():
            raise VlmpruneError(f"bad pattern {pattern!r}: write N:M with whole numbers, for example 2:4")
        n, m = int(n_text), int(m_text)
    if not 0 < n < m:
        raise VlmpruneError(f"bad pattern {n}:{m}: N:M needs 0 < N < M (for example 2:4 or 4:8)")
    return n, m


def check_sparsity(sparsity: float) -> float:
    """Sparsity is the fraction of weights zeroed, in [0, 1)."""
    try:
        value = float(sparsity)
    except (TypeError, ValueError):
        raise VlmpruneError(f"sparsity must be a number in [0, 1), got {sparsity!r}") from None
    if not 0.0 <= value < 1.0:
        raise VlmpruneError(f"sparsity must be in [0, 1), got {value}: pass for example --sparsity 0.5")
    return value


def check_divides(pattern: Pattern | None, width: int, name: str) -> None:
    if pattern is not None and width % pattern[1]:
        n, m = pattern
        raise VlmpruneError(f"pattern {n}:{m} does not divide the input width {width} of {name}; choose M dividing {width}")


DEFAULT_SPARSITY = 0.5


def pattern_sparsity(pattern: Pattern | None, sparsity: float | None) -> float:
    """The sparsity a layer ends up with: N:M fixes it at 1 - N/M, so an explicit sparsity that
    says otherwise is a conflict rather than something to override silently; ``None`` means the
    pattern's sparsity, or 0.5 without a pattern."""
    if pattern is None:
        return DEFAULT_SPARSITY if sparsity is None else check_sparsity(sparsity)
    n, m = pattern
    fixed = 1.0 - n / m
    if sparsity is not None and abs(check_sparsity(sparsity) - fixed) > 1e-9:
        raise VlmpruneError(f"sparsity {float(sparsity)} conflicts with pattern {n}:{m}, which prunes exactly "
                            f"{fixed:g}: drop the sparsity or the pattern")
    return fixed


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per output row, prune the ``floor(sparsity * C_in)`` lowest scores (stable sort); the
    tolerance keeps a sparsity of exactly ``k / C_in`` at ``k`` despite float rounding."""
    rows, cols = scores.shape
    count = int(sparsity * cols + 1e-9)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if count:
        order = torch.sort(scores, dim=1, stable=True).indices[:, :count]
        mask.scatter_(1, order, True)
    return mask


def n_m_mask(scores: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """In each run of M input columns of a row keep the N highest scores."""
    n, m = pattern
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    prune = torch.topk(groups, m - n, dim=2, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, prune, True)
    return mask.reshape(rows, cols)


def score_mask(scores: torch.Tensor, sparsity: float, pattern: Pattern | None) -> torch.Tensor:
    return row_mask(scores, sparsity) if pattern is None else n_m_mask(scores, pattern)


@torch.no_grad()
def apply_mask(linear: torch.nn.Linear, mask: torch.Tensor) -> None:
    """Zero the pruned entries in place; no parametrisation is left behind."""
    linear.weight.data.masked_fill_(mask.to(linear.weight.device), 0)
