"""What the engine does not do again: a scorer reads the q/k/v projections the model computed for
a recorded layer (each projection runs once per prefill), and layers whose sequence is plain causal
get no 4-D mask (SDPA's own causal path; tests/test_engine.py checks the logits)."""
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


def _layer_masks(model, adapter, run) -> list:
    """The attention_mask every decoder layer receives (after the engine's hook) while ``run()`` runs."""
    seen = []
    handles = [layer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("attention_mask")), with_kwargs=True)
               for layer in adapter.llm_layers]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return seen


def test_plain_causal_layers_get_no_mask_padded_ones_do(tiny, family):
    model, make_inputs = tiny(family)
    adapter = get_adapter(model)
    inputs = make_inputs()
    with vp.tokens.apply(model, "fastv:layer=2,keep=0.5"):
        masks = _layer_masks(model, adapter, lambda: model.generate(**inputs, max_new_tokens=3, do_sample=False))
        assert masks and all(mask is None for mask in masks)
        padded = make_inputs(text_lens=(6, 4))
        assert all(mask is not None for mask in _layer_masks(model, adapter, lambda: model(**padded)))


def test_a_scoring_only_token_keeps_its_mask_until_it_leaves(tiny):
    model, make_inputs = tiny("llava")
    adapter = get_adapter(model)
    inputs = make_inputs()
    with vp.tokens.apply(model, "ivtp:keep=4,instruction=ott,llm_layers=2,llm_group=2"):
        masks = _layer_masks(model, adapter, lambda: model(**inputs))
    # the pseudo-[CLS] is a masked key in layers 0-1 and dropped at layer 2, the last LLM site
    assert [mask is not None for mask in masks] == [True, True, False, False]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_full_attention_maps_read_in_row_blocks_equal_one_read(tiny, family, monkeypatch):
    """A full map is scored in blocks of query rows (each block masked for its own rows); the maps,
    the tokens kept and the logits match the single-block read (padded batch, vision and LLM sites)."""
    from vlmprune.tokens import engine
    model, make_inputs = tiny(family)
    inputs = make_inputs(text_lens=(6, 4))
    maps = []

    def run():
        method = vp.tokens.from_spec("ivtp:keep=4,instruction=ott")
        reduce = method.reduce

        def reading(ctx):
            maps.append(ctx.attention(method.recorded_layers(ctx.site, None)[0]))
            return reduce(ctx)
        method.reduce = reading
        with vp.tokens.apply(model, method), torch.no_grad():
            return model(**inputs).logits

    whole = run()
    monkeypatch.setattr(engine, "SCORE_BLOCK", 1)      # one query row per block
    blocked = run()
    half = len(maps) // 2
    assert half >= 1
    for one, rows in zip(maps[:half], maps[half:]):
        assert torch.allclose(one, rows, atol=1e-6)
    assert torch.allclose(whole, blocked, atol=1e-5)
