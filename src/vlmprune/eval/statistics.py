"""Paired statistics for accuracy tables: 95% intervals and an exact McNemar test on the same items.

Two methods evaluated on the same test items are compared item by item, not by their accuracies alone:
only the items where exactly one of them is right (the discordant pairs) carry evidence of a
difference. An outcome vector is a string of ``0``/``1`` characters, one per item (what an eval result
stores under ``"correct"``), or any sequence of booleans or 0/1 integers.

Only the standard library: the exact binomial tail is a finite sum of integer binomial coefficients.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

from ..errors import VlmpruneError

Z95 = 1.959963984540054     # the two-sided 95% quantile of the standard normal
ALPHA = 0.05

Outcomes = str | Sequence[int] | Sequence[bool]


def outcome_bits(outcomes: Outcomes) -> list[int]:
    """``outcomes`` as a list of 0/1; anything but 0/1 (or ``"0"``/``"1"``) is refused."""
    values = {"0": 0, "1": 1, 0: 0, 1: 1}
    bad = [x for x in outcomes if x not in values]
    if bad:
        raise VlmpruneError(f"per-item outcomes must be 0 or 1, got {bad[0]!r}")
    return [values[x] for x in outcomes]


def outcome_string(hits: Sequence[bool]) -> str:
    """The compact record stored in eval results: ``"0110..."``, one character per item in order."""
    return "".join("1" if hit else "0" for hit in hits)


def wilson_interval(accuracy: float, n: float, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``accuracy`` observed on ``n`` items (95% by default).

    Why Wilson: the textbook Wald interval ``p +- z sqrt(p(1-p)/n)`` has zero width at 0% or 100% and
    covers far less than 95% at the item counts and extreme accuracies of these tables (Brown, Cai and
    DasGupta 2001); Clopper-Pearson is conservative (wider than it needs to be) and needs beta
    quantiles. Wilson stays inside [0, 1], is never empty, and covers close to 95% from ten items up.
    ``n`` may be fractional (an effective sample size, see :func:`mean_interval`); ``n = 0`` gives [0, 1].
    """
    if n <= 0:
        return 0.0, 1.0
    z2 = z * z
    denominator = 1 + z2 / n
    centre = (accuracy + z2 / (2 * n)) / denominator
    half = z / denominator * math.sqrt(accuracy * (1 - accuracy) / n + z2 / (4 * n * n))
    # the interval always holds the estimate; min/max only undo rounding at 0% and 100%
    return max(0.0, min(centre - half, accuracy)), min(1.0, max(centre + half, accuracy))


def mean_interval(accuracies: Sequence[float], counts: Sequence[int], z: float = Z95) -> tuple[float, float]:
    """A 95% interval for the unweighted mean of per-task accuracies (the tables' "average").

    The mean weights each item of task t by ``1 / (T n_t)``; Wilson's interval is taken at the mean with
    Kish's effective sample size ``T^2 / sum(1 / n_t)``. With equal task sizes this is exactly the
    Wilson interval of all items pooled; a small task widens the interval as its larger weight should.
    """
    if not accuracies or any(n <= 0 for n in counts):
        return 0.0, 1.0
    tasks = len(accuracies)
    effective_n = tasks * tasks / sum(1 / n for n in counts)
    return wilson_interval(sum(accuracies) / tasks, effective_n, z)


def binomial_half_cdf(k: int, n: int) -> float:
    """``P[X <= k]`` for ``X ~ Binomial(n, 1/2)``, exactly (integer sum, one rounding at the end)."""
    term, total = 1, 1                      # C(n, 0); each next C(n, i + 1) = C(n, i) (n - i) / (i + 1) exactly
    for i in range(k):
        term = term * (n - i) // (i + 1)
        total += term
    return total / 2 ** n


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts ``b`` and ``c``.

    Under the null hypothesis (both methods equally accurate on these items) each discordant item is
    equally likely to favour either method, so ``b ~ Binomial(b + c, 1/2)``; the binomial test is exact
    at any count, where the chi-squared version misleads below about 25 discordant items.
    ``p = min(1, 2 P[X <= min(b, c)])``; 1 when there are no discordant items.
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be non-negative, got b={b}, c={c}")
    if b + c == 0:
        return 1.0
    return min(1.0, 2 * binomial_half_cdf(min(b, c), b + c))


def discordant_counts(a: Outcomes, b: Outcomes) -> tuple[int, int]:
    """``(b, c)``: items only ``a`` got right, items only ``b`` got right (same items, same order)."""
    bits_a, bits_b = outcome_bits(a), outcome_bits(b)
    if len(bits_a) != len(bits_b):
        raise VlmpruneError(f"paired outcomes need the same items: {len(bits_a)} against {len(bits_b)}")
    only_a = sum(1 for x, y in zip(bits_a, bits_b) if x and not y)
    only_b = sum(1 for x, y in zip(bits_a, bits_b) if y and not x)
    return only_a, only_b


def format_p(p: float) -> str:
    return f"{p:.3g}"


def verdict(b: int, c: int, p: float, alpha: float = ALPHA) -> str:
    """``"A better (p=...)"``, ``"B better (p=...)"`` or ``"not significant (p=...)"`` at level ``alpha``."""
    if p >= alpha:
        return f"not significant (p={format_p(p)})"
    return f"{'A' if b > c else 'B'} better (p={format_p(p)})"


def compare_outcomes(a: Outcomes, b: Outcomes, alpha: float = ALPHA) -> dict:
    """Accuracies, 95% Wilson intervals, discordant counts, exact McNemar p and the verdict of A against B.

    ``b`` in the result counts items only A got right, ``c`` items only B got right."""
    bits_a, bits_b = outcome_bits(a), outcome_bits(b)
    only_a, only_b = discordant_counts(bits_a, bits_b)
    n = len(bits_a)
    accuracy_a = sum(bits_a) / n if n else 0.0
    accuracy_b = sum(bits_b) / n if n else 0.0
    p = mcnemar_exact(only_a, only_b)
    return {"n": n, "accuracy_a": accuracy_a, "accuracy_b": accuracy_b,
            "interval_a": list(wilson_interval(accuracy_a, n)), "interval_b": list(wilson_interval(accuracy_b, n)),
            "b": only_a, "c": only_b, "p": p, "verdict": verdict(only_a, only_b, p, alpha)}


def pooled_outcomes(by_task: Mapping[str, Outcomes], tasks: Sequence[str]) -> list[int]:
    """The outcomes of ``tasks``, concatenated in that order: one paired sample over all their items."""
    return [bit for task in tasks for bit in outcome_bits(by_task[task])]


def compare_pooled(a_by_task: Mapping[str, Outcomes], b_by_task: Mapping[str, Outcomes],
                   tasks: Sequence[str], alpha: float = ALPHA) -> dict:
    """:func:`compare_outcomes` over the items of every task in ``tasks`` together.

    The pooled test weighs items, not tasks: with equal task sizes (the same ``--limit``) it tests the
    difference of the tables' average; per-task p-values are not corrected for multiple testing, so the
    pooled one is the comparison to quote."""
    return compare_outcomes(pooled_outcomes(a_by_task, tasks), pooled_outcomes(b_by_task, tasks), alpha)
