"""The engine's invariants on every family: keep-all is dense, cache equals no cache, a batch equals its
samples, later layers see fewer tokens, remove() restores, bad input fails with one line."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import vlmprune as vp
from vlmprune import SpecError, VlmpruneError
from vlmprune.measure.meta import ShapeOnlyMode
from vlmprune.models import get_adapter
from vlmprune.models.tiny import IMAGE_TOKEN, build_tiny, sample
from vlmprune.tokens import Reduction, Site, TokenMethod

from decoding import greedy_without_cache

STEPS = 4


class KeepEveryOther(TokenMethod):
    """Deterministic test method: keeps visual tokens 0, 2, 4, ... at the given sites."""

    name = ""

    def __init__(self, sites):
        self._sites = sites
        self.contexts = []

    def sites(self, plan):
        return self._sites

    def recorded_layers(self, site, plan):
        return [site.layer - 1] if site.layer > 0 else []

    def reduce(self, ctx):
        self.contexts.append(ctx)
        present = ctx.visual.shape[1]
        return Reduction(keep=torch.arange(0, present, 2).expand(ctx.visual.shape[0], -1))


class KeepAllWithScoringToken(TokenMethod):
    """Inserts a scoring-only token and keeps every visual token at LLM layer 2."""

    name = ""

    def __init__(self):
        self.seen = {}

    def sites(self, plan):
        return [Site("llm", 2)]

    def recorded_layers(self, site, plan):
        return [1]

    def scoring_token(self, model, inputs):
        width = model.config.text_config.hidden_size
        return torch.randn(inputs["input_ids"].shape[0], width, generator=torch.Generator().manual_seed(1)) * 5

    def reduce(self, ctx):
        self.seen = {"query": ctx.query.clone(), "attention": ctx.attention(1, ctx.query), "visual": ctx.visual.clone(),
                     "length": ctx.hidden.shape[1]}
        return Reduction(keep=torch.arange(ctx.visual.shape[1]).expand(ctx.visual.shape[0], -1))


class RecordingFastV(vp.tokens.FastV):
    def reduce(self, ctx):
        reduction = super().reduce(ctx)
        self.__dict__.setdefault("kept", []).append(reduction.keep)
        return reduction


def n_visual(inputs):
    return int((inputs["input_ids"][0] == IMAGE_TOKEN).sum())


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_a_method_without_reduce_cannot_be_built():
    class SitesOnly(TokenMethod):
        name = "sites-only"

        def sites(self, plan):
            return [Site("llm", 0)]

    with pytest.raises(TypeError, match="reduce"):
        SitesOnly()


def test_keeping_every_token_reproduces_dense_logits(tiny, family):
    model, make_inputs = tiny(family)
    inputs = make_inputs(text_lens=(3, 6))
    dense = logits(model, inputs)
    with vp.tokens.apply(model, vp.tokens.FastV(layer=2, keep=n_visual(inputs))):
        kept = logits(model, inputs)
    assert kept.shape == dense.shape
    assert (kept - dense).abs().max() <= 1e-5


def test_generate_with_cache_matches_greedy_without_cache(tiny, family):
    model, make_inputs = tiny(family)
    inputs = make_inputs(text_lens=(3, 6))
    with vp.tokens.apply(model, vp.tokens.from_spec("random:keep=0.4,seed=3,layers=0/2")):
        with torch.no_grad():
            generated = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, eos_token_id=None)
        reference = greedy_without_cache(model, inputs, STEPS)
    assert torch.equal(generated[:, -STEPS:], reference)


def test_batch_equals_its_samples_one_by_one(tiny, family):
    model, make_inputs = tiny(family)
    inputs = make_inputs(text_lens=(2, 7, 4), seed=5)
    with vp.tokens.apply(model, vp.tokens.FastV(layer=2, keep=0.5)):
        batch = logits(model, inputs)
        singles = [logits(model, sample(inputs, i)) for i in range(3)]
    for row, single in zip(batch, singles):
        assert (row[-single.shape[1]:] - single[0]).abs().max() <= 1e-4


def test_later_layers_see_the_shorter_sequence(tiny, family):
    model, make_inputs = tiny(family)
    inputs = make_inputs(text_lens=(3, 5))
    length, visual = inputs["input_ids"].shape[1], n_visual(inputs)
    seen = {}
    layers = get_adapter(model).llm_layers
    with vp.tokens.apply(model, "fastv:layer=2,keep=3"):  # hooks added later run after the engine's
        hooks = [layer.register_forward_pre_hook(lambda m, a, kw, i=i: seen.__setitem__(i, a[0].shape[1]),
                                                 with_kwargs=True) for i, layer in enumerate(layers)]
        try:
            out = logits(model, inputs)
        finally:
            for hook in hooks:
                hook.remove()
    assert seen == {0: length, 1: length, 2: length - visual + 3, 3: length - visual + 3}
    assert out.shape[1] == length - visual + 3


def test_several_sites_and_different_keep_sets_per_sample(tiny, family):
    model, make_inputs = tiny(family)
    inputs = make_inputs(text_lens=(2, 6), seed=1)
    method = RecordingFastV(layer=1, keep=0.5)
    with vp.tokens.apply(model, method):
        logits(model, inputs)
    keep = torch.sort(method.kept[0], dim=1).values
    assert not torch.equal(keep[0], keep[1])
    chained = KeepEveryOther([Site("llm", 0), Site("llm", 2)])
    with vp.tokens.apply(model, chained):
        out = logits(model, inputs)
    visual = n_visual(inputs)
    after_two = (((visual + 1) // 2) + 1) // 2
    assert out.shape[1] == inputs["input_ids"].shape[1] - visual + after_two
    assert torch.equal(chained.contexts[1].original[0], torch.arange(0, visual, 2))  # what the first site kept


def test_kept_tokens_keep_original_positions_and_compact_renumbers(tiny):
    model, make_inputs = tiny("llava")
    inputs = make_inputs(text_lens=(4,))
    first = get_adapter(model).llm_layers[0]
    seen = []

    def run():
        hook = first.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["position_embeddings"][0]),
                                               with_kwargs=True)
        try:
            logits(model, inputs)
        finally:
            hook.remove()

    run()
    for positions in ("original", "compact"):
        with vp.tokens.apply(model, KeepEveryOther([Site("llm", 0)]), positions=positions):
            run()
    dense, original, compact = seen
    start = int((inputs["input_ids"][0] == IMAGE_TOKEN).nonzero()[0])
    visual = n_visual(inputs)
    kept = [i for i in range(dense.shape[1]) if not (start <= i < start + visual and (i - start) % 2)]
    assert torch.equal(original[0], dense[0, kept])
    assert torch.equal(compact[0], dense[0, : len(kept)])


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_compact_positions_generate_like_the_no_cache_loop(tiny, family):
    model, make_inputs = tiny(family)
    inputs = make_inputs(text_lens=(3, 5))
    with vp.tokens.apply(model, vp.tokens.from_spec("random:keep=5,layers=1"), positions="compact"):
        with torch.no_grad():
            generated = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, eos_token_id=None)
        reference = greedy_without_cache(model, inputs, STEPS)
    assert torch.equal(generated[:, -STEPS:], reference)


def test_vision_site_prunes_inside_the_clip_tower(tiny):
    model, make_inputs = tiny("llava")
    adapter = get_adapter(model)
    inputs = make_inputs(text_lens=(3, 5))
    visual = n_visual(inputs)
    shapes = {}

    def run():
        hooks = [adapter.vision_layers[adapter.vision_feature_layer].register_forward_hook(
                     lambda m, a, out: shapes.__setitem__("feature", out.shape[1])),
                 adapter.projector.register_forward_hook(lambda m, a, out: shapes.__setitem__("projector", a[0].shape[1])),
                 adapter.llm_layers[0].register_forward_pre_hook(
                     lambda m, a, kw: shapes.__setitem__("llm", kw["position_embeddings"][0]), with_kwargs=True)]
        try:
            return logits(model, inputs)
        finally:
            for hook in hooks:
                hook.remove()

    run()
    dense_cos = shapes["llm"]
    method = KeepEveryOther([Site("vision", 1)])
    with vp.tokens.apply(model, method):
        out = run()
    kept = (visual + 1) // 2
    assert shapes["feature"] == 1 + kept and shapes["projector"] == kept
    assert out.shape[1] == inputs["input_ids"].shape[1] - visual + kept
    assert method.contexts[0].cls == 0 and method.contexts[0].hidden.shape[1] == 1 + visual
    start = int((inputs["input_ids"][1] == IMAGE_TOKEN).nonzero()[0])
    kept_positions = [i for i in range(dense_cos.shape[1]) if not (start <= i < start + visual and (i - start) % 2)]
    assert torch.equal(shapes["llm"][1], dense_cos.expand(2, -1, -1)[1, kept_positions])


def test_vision_site_generate_matches_no_cache_loop(tiny):
    model, make_inputs = tiny("llava")
    inputs = make_inputs(text_lens=(3, 5))
    with vp.tokens.apply(model, vp.tokens.from_spec("random:keep=6,where=vision,layers=1/3")):
        with torch.no_grad():
            generated = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, eos_token_id=None)
        reference = greedy_without_cache(model, inputs, STEPS)
    assert torch.equal(generated[:, -STEPS:], reference)


class KeepEveryOtherAsPairs(KeepEveryOther):
    """Keeps tokens 0, 2, 4, ... and declares each to stand for two (as a merge would)."""

    def reduce(self, ctx):
        reduction = super().reduce(ctx)
        previous = ctx.sizes if ctx.sizes is not None else torch.ones(ctx.visual.shape)
        return Reduction(keep=reduction.keep, sizes=2 * previous.gather(1, reduction.keep))


def test_token_sizes_give_proportional_attention(tiny):
    model, make_inputs = tiny("llava")
    adapter = get_adapter(model)
    inputs = make_inputs(text_lens=(3,))
    seen = {}
    method = KeepEveryOtherAsPairs([Site("vision", 1), Site("vision", 2), Site("llm", 1)])
    with vp.tokens.apply(model, method):
        hooks = [adapter.vision_layers[2].register_forward_pre_hook(lambda m, a: seen.__setitem__("vision", a[1])),
                 adapter.llm_layers[2].register_forward_pre_hook(
                     lambda m, a, kw: seen.__setitem__("llm", kw["attention_mask"]), with_kwargs=True)]
        try:
            logits(model, inputs)
        finally:
            for hook in hooks:
                hook.remove()
    log2 = torch.log(torch.tensor(2.0))
    assert torch.allclose(seen["vision"][0, 0, 0], torch.cat([torch.zeros(1), torch.full((4,), 2 * log2)]))
    assert torch.allclose(method.contexts[1].attention(1).sum(-1), torch.ones(1, 9))
    last_row = seen["llm"][0, 0, -1]                        # encoder sizes stay in the encoder; LLM sizes count
    visual = method.contexts[2].visual[0]
    kept_visual = visual[torch.arange(0, visual.shape[0], 2)]
    start = int(kept_visual[0])
    columns = torch.arange(start, start + kept_visual.shape[0])
    assert torch.allclose(last_row[columns], torch.full(columns.shape, float(log2)))
    assert last_row[: start].abs().max() == 0


def test_scoring_only_token_scores_but_changes_nothing(tiny, family):
    model, make_inputs = tiny(family)
    inputs = make_inputs(text_lens=(2, 5))
    dense = logits(model, inputs)
    method = KeepAllWithScoringToken()
    with vp.tokens.apply(model, method):
        out = logits(model, inputs)
    assert out.shape == dense.shape and (out - dense).abs().max() <= 1e-5
    seen = method.seen
    assert seen["length"] == inputs["input_ids"].shape[1] + 1
    assert torch.equal(seen["query"], seen["visual"][:, -1] + 1)       # right after the visual tokens
    attention = seen["attention"][:, 0]
    assert torch.allclose(attention.sum(-1), torch.ones(2))
    after = torch.arange(attention.shape[1])[None] > seen["query"][:, None]
    assert attention[after].abs().max() == 0                           # causal: sees nothing after itself
    assert (attention.gather(1, seen["visual"]) > 0).all()


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_scoring_only_token_with_the_cache(tiny, family):
    model, make_inputs = tiny(family)
    inputs = make_inputs(text_lens=(2, 5))
    with torch.no_grad():
        dense = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, eos_token_id=None)
    with vp.tokens.apply(model, KeepAllWithScoringToken()):
        with torch.no_grad():
            generated = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, eos_token_id=None)
        reference = greedy_without_cache(model, inputs, STEPS)
    assert torch.equal(generated, dense) and torch.equal(generated[:, -STEPS:], reference)


class KeepAllWithRealScoringToken(KeepAllWithScoringToken):
    def scoring_token_is_real(self):
        return True


def test_a_real_scoring_token_is_an_ordinary_token_of_the_sequence(tiny):
    """Kept as a real token (IVTP's "w/ pseudo CLS"), the scoring token gives the logits of the dense
    LLM run on the sequence with that embedding after the image, at the first text token's position."""
    model, make_inputs = tiny("llava")
    inputs = make_inputs(text_lens=(3, 3))
    method = KeepAllWithRealScoringToken()
    captured = {}
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(kwargs), with_kwargs=True)
    try:
        logits(model, inputs)
    finally:
        hook.remove()
    embeds = captured["inputs_embeds"]
    at = int(torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id)[-1]) + 1
    token = method.scoring_token(model, inputs)[:, None].to(embeds.dtype)
    sequence = torch.cat([embeds[:, :at], token, embeds[:, at:]], dim=1)
    positions = torch.arange(embeds.shape[1])
    positions = torch.cat([positions[:at], positions[at:at + 1], positions[at:]])[None].expand(2, -1)
    with torch.no_grad():
        hidden = model.model.language_model(inputs_embeds=sequence, position_ids=positions).last_hidden_state
        reference = model.lm_head(hidden)
    with vp.tokens.apply(model, method):
        out = logits(model, inputs)
    # 1e-5: the same token one position earlier (the last visual token's) is 1e-4 off on this model
    assert out.shape == reference.shape and (out - reference).abs().max() <= 1e-5
    dense = logits(model, inputs)
    assert (dense - torch.cat([reference[:, :at], reference[:, at + 1:]], 1)).abs().max() > 1e-2  # it matters
    with vp.tokens.apply(model, method):
        with torch.no_grad():
            generated = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, eos_token_id=None)
        assert torch.equal(generated[:, -STEPS:], greedy_without_cache(model, inputs, STEPS))


def test_beam_search_and_repeated_samples(tiny):
    model, make_inputs = tiny("llava")
    inputs = make_inputs(text_lens=(3, 5))
    beams = dict(max_new_tokens=STEPS, num_beams=2, num_return_sequences=2, eos_token_id=None)
    with torch.no_grad():
        dense = model.generate(**inputs, **beams)
        with vp.tokens.apply(model, vp.tokens.FastV(layer=2, keep=n_visual(inputs))):
            assert torch.equal(model.generate(**inputs, **beams), dense)
        # generate() encodes each image once, then repeats every sample: the encoder's keep sets follow
        with vp.tokens.apply(model, vp.tokens.from_spec("random:keep=5,where=vision,layers=2")):
            once = model(**inputs).logits
            encoded = model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True)
            encoded.pooler_output = [row for row in encoded.pooler_output for _ in range(2)]
            repeated = model(input_ids=inputs["input_ids"].repeat_interleave(2, 0),
                             attention_mask=inputs["attention_mask"].repeat_interleave(2, 0),
                             mm_encoder_outputs={"image": encoded}).logits
    assert torch.allclose(repeated[0::2], once, atol=1e-5) and torch.allclose(repeated[1::2], once, atol=1e-5)


def test_remove_restores_the_model(tiny, family):
    model, make_inputs = tiny(family)
    inputs = make_inputs(text_lens=(3,))
    dense = logits(model, inputs)
    handle = vp.tokens.apply(model, vp.tokens.FastV(layer=1, keep=2))
    try:
        assert logits(model, inputs).shape[1] < dense.shape[1]
    finally:
        handle.remove()
    assert torch.equal(logits(model, inputs), dense)
    assert "get_image_features" not in vars(model.model)


@pytest.mark.parametrize("family", ["llava"])
def test_meta_device_forward_counts_fewer_flops(family):
    model, make_inputs = build_tiny(family, device="meta")
    inputs = make_inputs(text_lens=(6,))
    inputs["pixel_values"] = inputs["pixel_values"].to("meta")   # integer inputs stay real, as in FLOPs counting
    visual = n_visual(inputs)

    def count():
        with ShapeOnlyMode(), FlopCounterMode(display=False) as counter, torch.no_grad():
            out = model(**inputs)
        return counter.get_total_flops(), out.logits.shape

    dense, dense_shape = count()
    with vp.tokens.apply(model, vp.tokens.from_spec("fastv:layer=2,keep=4")):
        pruned, pruned_shape = count()
    assert pruned_shape[1] == dense_shape[1] - visual + 4
    assert 0 < pruned < dense


def test_bad_input_raises_one_line(tiny):
    model, make_inputs = tiny("llava")
    inputs = make_inputs(text_lens=(3,))
    with pytest.raises(SpecError, match="unknown token method 'nosuch'"):
        vp.tokens.from_spec("nosuch:keep=3")
    with pytest.raises(VlmpruneError, match="keep=0 must be a count >= 1"):
        vp.tokens.from_spec("fastv:keep=0")
    with pytest.raises(VlmpruneError, match="keep=-0.5 must be"):
        vp.tokens.FastV(keep=-0.5)
    with pytest.raises(VlmpruneError, match=r"Site\(where='llm', layer=9\) is out of range; the LLM has layers 0..3"):
        vp.tokens.apply(model, vp.tokens.FastV(layer=9))
    with pytest.raises(VlmpruneError, match="vision sites go from 0 to 3"):
        vp.tokens.apply(model, KeepEveryOther([Site("vision", 4)]))
    with pytest.raises(VlmpruneError, match="this qwen2_vl model has no in-encoder pruning sites"):
        vp.tokens.apply(tiny("qwen2_vl")[0], vp.tokens.from_spec("random:where=vision,layers=1"))
    with vp.tokens.apply(model, vp.tokens.FastV(layer=2, keep=17)):
        with pytest.raises(VlmpruneError, match="keep=17 is more than the 16 visual tokens"):
            logits(model, inputs)
        with pytest.raises(VlmpruneError, match="already applied"):
            vp.tokens.apply(model, vp.tokens.FastV())
    with pytest.raises(VlmpruneError, match="needs a TokenMethod or a SPEC string, not int"):
        vp.tokens.apply(model, 3)
    with pytest.raises(VlmpruneError, match="positions='shifted'"):
        vp.tokens.apply(model, vp.tokens.FastV(), positions="shifted")
