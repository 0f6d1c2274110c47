"""ATV's visual drift per block and the visual tokens it selects per block (seed 002, Fig. A1)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def plot_profile(profile: Sequence[dict[str, float]], out_path: str | Path, title: str = "") -> Path:
    """Bars: mean visual drift per block (left axis); line: mean visual tokens selected per sample
    (right axis). ``profile`` as returned by :func:`vlmprune.weights.atv.drift_profile`."""
    blocks = [p["block"] for p in profile]
    fig, left = plt.subplots(figsize=(7.2, 3.8))
    left.bar(blocks, [p["saliency"] for p in profile], color="#7aa6c2", label="visual drift")
    left.set_xlabel("LLM block")
    left.set_ylabel("mean visual drift (1 - cos)")
    right = left.twinx()
    right.plot(blocks, [p["visual_tokens"] for p in profile], color="#c2552d", marker="o", label="visual tokens selected")
    right.set_ylabel("visual tokens selected per sample")
    right.set_ylim(bottom=0)
    left.set_xticks(blocks)
    handles = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    left.legend(handles, [h.get_label() for h in handles], loc="upper left", fontsize=8)
    if title:
        left.set_title(title)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path


def plot_drift(model, calibration: Sequence[Any], out_path: str | Path, alpha: float = 1.0,
               device=None) -> list[dict[str, float]]:
    """Measure ATV's drift profile of the dense ``model`` on ``calibration`` and plot it to
    ``out_path`` (PNG); returns the profile (per block: ``block``, ``saliency``, ``visual_tokens``)."""
    from ..weights.atv import drift_profile

    profile = drift_profile(model, calibration, alpha=alpha, device=device)
    plot_profile(profile, out_path, title=f"ATV visual drift and selected visual tokens (alpha={alpha:g})")
    return profile
