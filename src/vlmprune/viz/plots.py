"""Result plots: accuracy against FLOPs for token methods, retention bars for weight methods.

A row that failed is drawn as failed, in red, never left out."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.lines import Line2D  # noqa: E402


def _save(fig, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _missing_handle(text: str) -> Line2D:
    """A legend entry for a row that has no point: a red cross and its reason, so it is never silently absent."""
    return Line2D([], [], linestyle="none", marker="x", color="red", label=text)


def accuracy_vs_flops(rows: Sequence[dict], path: str | Path) -> None:
    """Average accuracy (%) against counted total GFLOPs; one line per token method across budgets,
    the dense model as a star. ``rows`` are demo rows (``kind``, ``label``, ``result``); a failed row,
    or one without FLOPs, has no point but a red legend entry "label: failed" (or "label: no FLOPs")."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    missing: list[Line2D] = []
    for row in rows:
        result = row.get("result")
        if not result or not result.get("flops"):
            missing.append(_missing_handle(f"{row['label']}: {'no FLOPs' if result else 'failed'}"))
            continue
        point = (result["flops"]["total"] / 1e9, 100 * result["average"])
        if row["kind"] == "dense":
            ax.scatter(*point, marker="*", s=180, color="black", zorder=3, label="dense")
        else:
            series[row["label"].partition(":")[0]].append(point)
    for name, points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax.set_xlabel("GFLOPs per sample (counted)")
    ax.set_ylabel("average accuracy (%)")
    ax.set_title("Token methods: accuracy against compute")
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()[0] + missing
    if handles:
        legend = ax.legend(handles=handles, fontsize=8, ncol=2)
        for text in legend.get_texts()[len(handles) - len(missing):]:
            text.set_color("red")
    _save(fig, path)


def retention_bars(rows: Sequence[dict], path: str | Path) -> None:
    """Retention (%) of each weight-pruned row as a bar, with the dense level at 100%; a failed row shows as
    an empty slot marked "failed" in red (one without a retention, as "-")."""
    labels = [row["label"] for row in rows]
    values = [(row.get("result") or {}).get("retention") for row in rows]
    failed = [row.get("result") is None for row in rows]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * len(rows) + 2), 4.4))
    positions = range(len(rows))
    ax.bar(positions, [v or 0.0 for v in values], color="tab:blue")
    for x, value, fail in zip(positions, values, failed):
        text = "failed" if fail else "-" if value is None else f"{value:.0f}"
        ax.text(x, (value or 0.0) + 1, text, ha="center", fontsize=8, color="red" if fail else "black")
    ax.axhline(100, color="black", linestyle="--", linewidth=1)
    ax.set_xticks(list(positions), labels, rotation=45, ha="right", fontsize=8)
    for tick, fail in zip(ax.get_xticklabels(), failed):
        if fail:
            tick.set_color("red")
    ax.set_ylabel("retention of dense accuracy (%)")
    ax.set_title("Weight methods: accuracy retained")
    _save(fig, path)
