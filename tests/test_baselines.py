"""The baseline token methods: each on a hand-checkable site, then each through the engine on tiny LLaVA."""
import pytest
import torch

from vlmprune.errors import VlmpruneError
from vlmprune.tokens import apply, from_spec
from vlmprune.tokens.base import ModelPlan, Site, SiteContext

from decoding import Frozen, logits_without_cache

LLAVA15 = ModelPlan(family="llava", n_vision_layers=24, vision_feature_layer=22, n_llm_layers=32, has_cls=True)
QWEN = ModelPlan(family="qwen2_vl", n_vision_layers=0, vision_feature_layer=0, n_llm_layers=28, has_cls=False)


def _context(site, hidden, attention=None, keys=None, cls=0, query=None, n_visual=None):
    """A one-sample site: [CLS] at 0 (vision) and every other position visual; ``attention(layer, rows)``
    returns those rows of ``attention``, as the engine does."""
    n = hidden.shape[1]
    visual = torch.arange(1 if cls is not None else 0, n)[None]
    att = attention if attention is not None else torch.full((1, n, n), 1.0 / n)
    return SiteContext(site=site, hidden=hidden, visual=visual, original=visual - visual[:, :1],
                       n_visual=n_visual or visual.shape[1], cls=cls, query=query,
                       attention=lambda layer, rows=None: att if rows is None else att[:, rows[0]],
                       values=lambda layer: hidden,
                       keys=lambda layer: keys if keys is not None else hidden, inputs={})


def _reduce(spec, plan, ctx_site, **kwargs):
    method = from_spec(spec)
    sites = method.sites(plan)
    site = sites[ctx_site] if isinstance(ctx_site, int) else ctx_site
    return method, method.reduce(_context(site, **kwargs))


def test_topk_keeps_patches_most_similar_to_cls_on_an_even_schedule():
    method = from_spec("topk:keep=2")
    sites = method.sites(LLAVA15)
    assert [s.layer for s in sites] == list(range(1, 24))
    hidden = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [-1.0, 0.0], [1.0, 1.0]]])
    reduction = method.reduce(_context(sites[-1], hidden))     # last site: straight to keep=2
    assert sorted(reduction.keep[0].tolist()) == [1, 3]       # patches 2 and 4 (visual index 1 and 3)
    assert method.reduce(_context(sites[0], torch.randn(1, 577, 2))).keep.shape == (1, 576 - 25)  # 574 = 22 x 25 + 1 x 24


def test_evit_ranks_by_cls_attention_and_fuses_the_rest():
    hidden = torch.arange(5.0).view(1, 5, 1)
    attention = torch.zeros(1, 5, 5)
    attention[0, 0] = torch.tensor([0.2, 0.1, 0.4, 0.05, 0.25])
    method = from_spec("evit:keep=2,every=23")
    (site,) = method.sites(LLAVA15)
    reduction = method.reduce(_context(site, hidden, attention))
    assert reduction.keep.tolist() == [[1, 3]]                # visual 1 kept, fused token in visual 3's slot
    assert torch.allclose(reduction.hidden[0, :, 0], torch.tensor([2.0, (0.1 * 1 + 0.05 * 3 + 0.25 * 4) / 0.4]))


def test_tome_merges_with_sizes_down_to_keep():
    hidden = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]])
    method = from_spec("tome:keep=2,every=23")
    (site,) = method.sites(LLAVA15)
    reduction = method.reduce(_context(site, hidden))
    assert reduction.keep.tolist() == [[1, 3]] and reduction.sizes.tolist() == [[2.0, 2.0]]


def test_fastervlm_and_visionzip_read_the_feature_layer():
    method = from_spec("fastervlm:keep=1")
    assert method.sites(LLAVA15) == [Site("vision", 23)] and method.recorded_layers(Site("vision", 23), LLAVA15) == [22]
    attention = torch.zeros(1, 4, 4)
    attention[0, 0] = torch.tensor([0.1, 0.2, 0.6, 0.1])
    assert method.reduce(_context(Site("vision", 23), torch.randn(1, 4, 2), attention)).keep.tolist() == [[1]]
    zip_ = from_spec("visionzip:keep=2,contextual=1")
    zip_.sites(LLAVA15)
    reduction = zip_.reduce(_context(Site("vision", 23), torch.arange(4.0).view(1, 4, 1), attention,
                                     keys=torch.tensor([[[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.1]]])))
    assert reduction.keep.tolist() == [[1, 0]]                # dominant: visual 1; context: visual 0 + visual 2
    assert torch.allclose(reduction.hidden[0, :, 0], torch.tensor([2.0, 1.0 + 3.0]))
    with pytest.raises(VlmpruneError):
        from_spec("visionzip:keep=2,contextual=2").reduce(_context(Site("vision", 23), torch.randn(1, 4, 2), attention))


def test_divprune_and_pooling_work_before_the_llm_of_any_family():
    for spec in ("divprune:keep=2", "pooling:keep=4", "pyramiddrop"):
        assert from_spec(spec).sites(QWEN)
    angles = torch.tensor([0.0, 10.0, 90.0, 180.0]).deg2rad()
    hidden = torch.stack([angles.cos(), angles.sin()], -1)[None]
    reduction = from_spec("divprune:keep=2").reduce(_context(Site("llm", 0), hidden, cls=None))
    assert reduction.keep.tolist() == [[3, 0]]
    pooled = from_spec("pooling:keep=4").reduce(_context(Site("llm", 0), torch.arange(16.0).view(1, 16, 1), cls=None))
    assert torch.allclose(pooled.hidden[0, :, 0], torch.tensor([2.5, 4.5, 10.5, 12.5]))


def test_pyramiddrop_halves_at_quarter_depths_by_the_query_row():
    method = from_spec("pyramiddrop")
    assert [s.layer for s in method.sites(LLAVA15)] == [8, 16, 24]
    attention = torch.zeros(1, 6, 6)
    attention[0, 5] = torch.tensor([0.0, 0.1, 0.3, 0.2, 0.4, 0.0])
    ctx = _context(Site("llm", 8), torch.randn(1, 6, 2), attention, cls=None, query=torch.tensor([5]), n_visual=4)
    ctx.visual = torch.tensor([[1, 2, 3, 4]])
    assert sorted(method.reduce(ctx).keep[0].tolist()) == [1, 3]
    by_keep = from_spec("pyramiddrop:keep=8")
    by_keep.sites(LLAVA15)
    assert [by_keep._count_after(i, 64) for i in range(3)] == [32, 16, 8]


def test_vision_methods_refuse_towers_without_cls():
    for spec in ("topk", "evit", "tome", "fastervlm", "visionzip", "downsample"):
        with pytest.raises(VlmpruneError, match="lacks"):
            from_spec(spec).sites(QWEN)
    for spec in ("topk:keep=0", "tome:keep=1.5", "pyramiddrop:ratio=0", "evit:every=0"):
        with pytest.raises(VlmpruneError):
            method = from_spec(spec)
            method.sites(LLAVA15)


# ---------------------------------------------------------------- through the engine on tiny LLaVA

SMOKE = {  # spec -> visual tokens left after each site (tiny LLaVA: 16 patches, feature layer 2, 4 LLM layers)
    "topk:keep=4": [12, 8, 4],
    "evit:keep=4": [12, 8, 4],
    "tome:keep=4": [12, 8, 4],
    "fastervlm:keep=0.25": [4],
    "visionzip:keep=5": [5],
    "downsample:keep=4": [4],
    "divprune:keep=4": [4],
    "pooling:keep=4": [4],
    "pyramiddrop": [8, 4, 2],
}
DENSE_EQUIVALENT = ["topk:keep=16", "evit:keep=16", "tome:keep=16", "fastervlm:keep=16",
                    "visionzip:keep=16,contextual=0", "downsample:keep=16", "divprune:keep=16", "pooling:keep=16",
                    "pyramiddrop:ratio=1"]


def _run(model, inputs, method):
    counts = []
    reduce = method.reduce

    def recording(ctx):
        reduction = reduce(ctx)
        counts.append(reduction.keep.shape[1])
        return reduction

    method.reduce = recording
    with apply(model, method), torch.no_grad():
        logits = model(**inputs).logits
    return logits, counts


@pytest.mark.parametrize("spec", sorted(SMOKE))
def test_smoke_on_tiny_llava(tiny, spec):
    model, make_inputs = tiny("llava")
    inputs = make_inputs(text_lens=(5, 3))
    logits, counts = _run(model, inputs, from_spec(spec))
    assert counts == SMOKE[spec]
    assert logits.shape[0] == 2 and torch.isfinite(logits).all()


@pytest.mark.parametrize("spec", DENSE_EQUIVALENT)
def test_keeping_every_token_reproduces_dense(tiny, spec):
    model, make_inputs = tiny("llava")
    inputs = make_inputs(text_lens=(5, 3))
    with torch.no_grad():
        dense = model(**inputs).logits
    logits, _ = _run(model, inputs, from_spec(spec))
    assert torch.allclose(logits[:, -1], dense[:, -1], atol=1e-4)


def test_downsample_matches_feeding_a_smaller_image(tiny):
    model, make_inputs = tiny("llava")
    inputs = make_inputs()
    tower = model.model.vision_tower
    small = torch.nn.functional.interpolate(inputs["pixel_values"], size=(14, 14), mode="bilinear", antialias=True)
    captured = []
    hook = model.model.multi_modal_projector.register_forward_hook(lambda m, args, out: captured.append(out))
    try:
        with torch.no_grad():
            expected = tower(small, interpolate_pos_encoding=True, output_hidden_states=True).hidden_states[-2][:, 1:]
            with apply(model, from_spec("downsample:keep=4")):
                model(**inputs)
    finally:
        hook.remove()
    assert torch.allclose(captured[0], model.model.multi_modal_projector(expected), atol=1e-5)


def test_counted_flops_on_a_meta_copy_drop_below_dense(tiny):
    from vlmprune.measure.flops import count_flops
    from vlmprune.models.presets import Preset, default_image_size

    model, _ = tiny("llava")
    preset = Preset("tiny-llava", model.config, default_image_size(model.config))
    dense = count_flops(preset, 6).flops
    for spec in ("tome:keep=4", "downsample:keep=4", "pyramiddrop"):   # merging, image, LLM-side
        flops = count_flops(preset, 6, from_spec(spec)).flops
        assert flops.llm < dense.llm and flops.vision <= dense.vision, spec


def test_counted_flops_for_visionzip_on_a_meta_copy(tiny):
    """VisionZip's contextual merge picks its targets from shapes alone, so a meta forward runs it."""
    from vlmprune.measure.flops import count_flops
    from vlmprune.models.presets import Preset, default_image_size

    model, _ = tiny("llava")
    preset = Preset("tiny-llava", model.config, default_image_size(model.config))
    dense = count_flops(preset, 6)
    for spec in ("visionzip:keep=5", "visionzip:keep=5,contextual=0"):
        pruned = count_flops(preset, 6, from_spec(spec))
        assert pruned.schedule.llm == [5 + 6] * len(dense.schedule.llm), spec
        assert pruned.flops.llm < dense.flops.llm and pruned.flops.vision <= dense.flops.vision, spec


@pytest.mark.parametrize("spec", ["downsample:keep=4", "tome:keep=4", "visionzip:keep=5", "pyramiddrop"])
def test_methods_generate_on_tiny_llava(tiny, spec):
    """Merging, resizing and multi-stage methods: each shortens the prompt, and every generated step's
    logits equal a no-cache forward that replays the same pruning (a padded batch of two)."""
    model, make_inputs = tiny("llava")
    inputs = make_inputs(text_lens=(5, 3))
    frozen = Frozen(from_spec(spec))
    with apply(model, frozen), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, eos_token_id=None,
                             output_logits=True, return_dict_in_generate=True)
        frozen.replaying = True
        prefill = model(**inputs).logits
        reference = logits_without_cache(model, inputs, out.sequences[:, -3:])
    assert prefill.shape[1] < inputs["input_ids"].shape[1]
    for cached, recomputed in zip(out.logits, reference, strict=True):
        assert (cached - recomputed).abs().max() <= 1e-4
