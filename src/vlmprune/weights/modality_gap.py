"""The modality-gap probe (analysis only): why Wanda's calibration statistics can mislead on a VLM.

Wanda scores ``|W_ij| sqrt(r_j)`` with ``r_j = sum_t x_tj^2`` over every calibration token. On
image-caption samples most of those tokens are visual, but an answer is produced at a text position.
Per target Linear of the dense model the probe measures, from the inputs the Linear receives:

- ``visual_text_correlation``: Spearman correlation over channels of the mean per-token energy
  ``mean_t x_tj^2`` of visual tokens and of text tokens (calibration samples);
- ``visual_share``: the share of ``sum_j r_j`` (Wanda's statistic, every token) that visual tokens
  supply;
- ``answer_correlation[pool]``: Spearman correlation over channels of the calibration statistic of a
  pool (``mixed``: every token, Wanda's default; ``text``; ``visual``) with ``x_j^2`` at the answer
  position (the last prompt token) averaged over test prompts.

Magnitude pruning is Wanda with every ``r_j`` equal; where the pools' statistics barely rank the
answer-time channels, that constant is not worse than they are.
"""
from __future__ import annotations

import contextlib
from typing import Any, Sequence

import torch

POOLS = ("mixed", "text", "visual")


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """0-based ranks, tied values sharing the mean of their ranks."""
    unique, inverse, counts = torch.unique(values.double(), return_inverse=True, return_counts=True)
    start = torch.cumsum(counts, 0) - counts
    return (start + (counts - 1) / 2).double()[inverse]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors (Pearson of their tie-averaged ranks; 0 when one
    of them is constant)."""
    ra, rb = (r - r.mean() for r in (_ranks(a), _ranks(b)))
    denominator = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denominator if denominator else 0.0


@contextlib.contextmanager
def _recording(linears: dict[str, torch.nn.Linear]):
    """Inside, ``seen[name]`` is the (L, C) input of each Linear in the last forward (batch 1)."""
    seen: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(_module, args, _result):
            seen[name] = args[0].detach()[0].float()
        return record

    handles = [linear.register_forward_hook(hook(name)) for name, linear in linears.items()]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def modality_gap(model, calibration: Sequence[Any], answer_inputs: Sequence[Any]) -> list[dict[str, Any]]:
    """Per LLM block, the probe's three measures averaged over the block's target Linears, and per
    Linear. ``calibration`` and ``answer_inputs``: processor outputs of batch 1 (image-text
    calibration samples; test prompts whose last token is where the answer starts)."""
    from ..models import get_adapter
    from .sequential import compute_device, select_linears

    adapter = get_adapter(model)
    device = compute_device(model, None)
    per_block = select_linears(model, adapter, None, None)
    linears = {name: linear for block in per_block for name, linear in block.items()}
    zeros = {name: torch.zeros(linear.in_features, dtype=torch.float64, device=device)
             for name, linear in linears.items()}
    energy = {key: {name: z.clone() for name, z in zeros.items()} for key in ("visual", "text", "answer")}
    counts = {"visual": 0, "text": 0}
    was_training = model.training
    model.eval()
    try:
        with _recording(linears) as seen:
            for sample in calibration:
                inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in dict(sample).items()}
                model(**inputs, use_cache=False)
                visual = adapter.image_token_mask(inputs["input_ids"])[0].to(device)
                counts["visual"] += int(visual.sum())
                counts["text"] += int((~visual).sum())
                for name, x in seen.items():
                    squared = x.double().pow(2)
                    energy["visual"][name] += squared[visual].sum(dim=0)
                    energy["text"][name] += squared[~visual].sum(dim=0)
            for sample in answer_inputs:
                inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in dict(sample).items()}
                model(**inputs, use_cache=False)
                for name, x in seen.items():
                    energy["answer"][name] += x[-1].double().pow(2)
    finally:
        model.train(was_training)
    blocks = []
    for b, block in enumerate(per_block):
        layers = {}
        for name in block:
            visual, text, answer = (energy[k][name] for k in ("visual", "text", "answer"))
            pools = {"mixed": visual + text, "text": text, "visual": visual}
            layers[name] = {
                "visual_text_correlation": spearman(visual / max(counts["visual"], 1), text / max(counts["text"], 1)),
                "visual_share": float(visual.sum() / (visual + text).sum()),
                "answer_correlation": {pool: spearman(pools[pool], answer) for pool in POOLS},
            }
        mean = {key: sum(v[key] for v in layers.values()) / len(layers)
                for key in ("visual_text_correlation", "visual_share")}
        mean["answer_correlation"] = {pool: sum(v["answer_correlation"][pool] for v in layers.values()) / len(layers)
                                      for pool in POOLS}
        blocks.append({"block": b, **mean, "layers": layers})
    return blocks
