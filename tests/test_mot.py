"""The MoT probe: exact equivalence when unpruned, and pruning one pathway at a time."""
from __future__ import annotations

import pytest
import torch

import vlmprune as vp
from vlmprune.errors import VlmpruneError
from vlmprune.models import get_adapter
from vlmprune.models.tiny import build_tiny
from vlmprune.weights.mot import ModalityLinear, to_mot


@pytest.fixture(scope="module")
def calibration():
    _, make = build_tiny("llava", seed=0)
    return [make(text_lens=(14,), seed=s) for s in range(3)]


@pytest.mark.parametrize("family", ["llava", "llava_next", "llava_onevision"])
def test_unpruned_probe_reproduces_logits_and_generation(family):
    model, make = build_tiny(family, seed=0)
    inputs = make(text_lens=(5, 9), seed=3)                  # left-padded batch of two
    with torch.no_grad():
        logits = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    probe = to_mot(model)
    layers = len(get_adapter(model).llm_layers)
    assert sum(isinstance(m, ModalityLinear) for m in model.modules()) == len(probe.routed) == layers * 6
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, logits)
        assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), tokens)


def test_routing_uses_the_visual_copy_for_visual_tokens():
    model, make = build_tiny("llava", seed=0)
    inputs = make(text_lens=(6,), seed=1)
    to_mot(model)
    with torch.no_grad():
        reference = model(**inputs).logits
        for module in model.modules():
            if isinstance(module, ModalityLinear):
                module.visual.weight.zero_()
        changed = model(**inputs).logits
    assert not torch.allclose(changed, reference)


@pytest.mark.parametrize("pathway", ["text", "visual"])
def test_prune_one_pathway_only(pathway, calibration):
    model, _ = build_tiny("llava", seed=0)
    probe = to_mot(model)
    report = probe.prune(pathway, vp.weights.from_spec("wanda:pool=text"), calibration)
    assert len(report.layer_sparsity) == 4 * 6 and report.sparsity == pytest.approx(0.5)
    other = "visual" if pathway == "text" else "text"
    for module in model.modules():
        if isinstance(module, ModalityLinear):
            assert (getattr(module, pathway).weight == 0).float().mean() == pytest.approx(0.5)
            assert int((getattr(module, other).weight == 0).sum()) == 0


def test_pool_changes_the_pathway_masks(calibration):
    masks = {}
    for pool in ("text", "visual"):
        model, _ = build_tiny("llava", seed=0)
        to_mot(model).prune("visual", vp.weights.from_spec(f"wanda:pool={pool}"), calibration)
        masks[pool] = torch.cat([m.visual.weight.flatten() == 0 for m in model.modules() if isinstance(m, ModalityLinear)])
    assert not torch.equal(masks["text"], masks["visual"])


def test_converting_twice_is_refused():
    model, _ = build_tiny("llava", seed=0)
    to_mot(model)
    with pytest.raises(VlmpruneError, match="converts to the MoT probe once"):
        to_mot(model)


def test_unknown_pathway():
    model, _ = build_tiny("llava", seed=0)
    with pytest.raises(VlmpruneError, match="unknown MoT pathway"):
        to_mot(model).prune("audio", vp.weights.from_spec("wanda"), [])
