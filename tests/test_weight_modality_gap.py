"""The modality-gap probe: Spearman by hand, and its three measures against a direct computation on
a tiny model (visual share, visual/text correlation, answer-position correlation per pool)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from vlmprune.models import get_adapter
from vlmprune.models.tiny import build_tiny
from vlmprune.weights.modality_gap import modality_gap, spearman


def test_spearman_by_hand():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert spearman(a, a * 10 + 3) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    # ranks (0, 1, 2, 3) against (1, 0, 3, 2): 1 - 6 * 4 / (4 * 15) = 0.6
    assert spearman(a, torch.tensor([2.0, 1.0, 9.0, 5.0])) == pytest.approx(0.6)
    assert spearman(a, torch.ones(4)) == 0.0                       # a constant ranks nothing
    # ties share their mean rank: (0, 1.5, 1.5, 3) against (0, 1, 2, 3) gives 4.5 / sqrt(4.5 * 5)
    assert spearman(torch.tensor([1.0, 2.0, 2.0, 5.0]), a) == pytest.approx(4.5 / (4.5 * 5) ** 0.5)


@torch.no_grad()
def test_probe_matches_a_direct_computation():
    model, make = build_tiny("llava", seed=0)
    calibration = [make(text_lens=(10 + 3 * s,), seed=s) for s in range(3)]
    prompts = [make(text_lens=(6 + s,), seed=10 + s) for s in range(2)]
    blocks = modality_gap(model, calibration, prompts)
    adapter = get_adapter(model)
    assert len(blocks) == len(adapter.llm_layers)
    name, linear = next((n, m) for n, m in adapter.llm_layers[1].named_modules() if isinstance(m, nn.Linear))
    full_name = next(n for n, m in model.named_modules() if m is linear)
    seen = []
    handle = linear.register_forward_hook(lambda _m, args, _r: seen.append(args[0][0].double()))
    try:
        for sample in calibration + prompts:
            model(**sample, use_cache=False)
    finally:
        handle.remove()
    visual_masks = [adapter.image_token_mask(s["input_ids"])[0] for s in calibration]
    vis = sum(x[m].pow(2).sum(0) for x, m in zip(seen, visual_masks))
    txt = sum(x[~m].pow(2).sum(0) for x, m in zip(seen, visual_masks))
    answer = sum(x[-1].pow(2) for x in seen[len(calibration):])
    n_vis = sum(int(m.sum()) for m in visual_masks)
    n_txt = sum(int((~m).sum()) for m in visual_masks)
    layer = blocks[1]["layers"][full_name]
    assert layer["visual_share"] == pytest.approx(float(vis.sum() / (vis + txt).sum()))
    assert layer["visual_text_correlation"] == pytest.approx(spearman(vis / n_vis, txt / n_txt))
    assert layer["answer_correlation"]["mixed"] == pytest.approx(spearman(vis + txt, answer))
    assert layer["answer_correlation"]["text"] == pytest.approx(spearman(txt, answer))
    assert layer["answer_correlation"]["visual"] == pytest.approx(spearman(vis, answer))
    assert 0 < layer["visual_share"] < 1
