"""What the engine does not do again: a scorer reads the q/k/v projections the model computed for
a recorded layer (each projection runs once per prefill), and layers whose sequence is plain causal
get no 4-D mask (SDPA's own causal path), with logits unchanged."""
import pytest
import torch

import vlmprune as vp
from vlmprune.models import get_adapter


def _calls(module: torch.nn.Module, counter: list) -> torch.utils.hooks.RemovableHandle:
    return module.register_forward_hook(lambda *_: counter.append(1))


@pytest.mark.parametrize("spec, tower, layer", [("fastv:layer=2,keep=0.5", "llm", 1),
                                                ("fastervlm:keep=4", "vision", None)])
def test_recorded_projections_run_once_per_prefill(tiny, spec, tower, layer):
    model, make_inputs = tiny("llava")
    inputs = make_inputs()
    adapter = get_adapter(model)
    layer = adapter.vision_feature_layer if layer is None else layer
    counters = {role: [] for role in "qkv"}
    handles = [_calls(module, counters[role]) for role, module in zip("qkv", adapter.attention_projections(tower, layer))]
    try:
        with vp.tokens.apply(model, spec), torch.no_grad():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    assert {role: len(calls) for role, calls in counters.items()} == {"q": 1, "k": 1, "v": 1}
