"""FastV ranks by the last prompt token's attention (checked against eager attention weights);
Random drops the same number at every site, reproducibly."""
import pytest
import torch

import vlmprune as vp
from vlmprune import VlmpruneError
from vlmprune.models.tiny import IMAGE_TOKEN, build_tiny
from vlmprune.tokens import ModelPlan, Site


class RecordingFastV(vp.tokens.FastV):
    def reduce(self, ctx):
        self.attention = ctx.attention(self.layer - 1)
        self.visual = ctx.visual
        self.reduction = super().reduce(ctx)
        return self.reduction


class RecordingRandom(vp.tokens.Random):
    def reduce(self, ctx):
        reduction = super().reduce(ctx)
        self.__dict__.setdefault("record", []).append((ctx.site, ctx.visual.shape[1], reduction.keep))
        return reduction


def test_fastv_scores_with_the_last_prompt_tokens_attention(family):
    eager, make_inputs = build_tiny(family, attn_implementation="eager")
    inputs = make_inputs(text_lens=(2, 6), seed=2)
    with torch.no_grad():
        reference = eager(**inputs, output_attentions=True).attentions[1].mean(1)   # layer K-1 = 1
    model, _ = build_tiny(family)
    method = RecordingFastV(layer=2, keep=5)
    with vp.tokens.apply(model, method), torch.no_grad():
        model(**inputs)
    real = inputs["attention_mask"].bool()
    for b in range(2):
        rows = real[b].nonzero().squeeze(1)
        assert torch.allclose(method.attention[b][rows], reference[b][rows], atol=1e-5)
    visual = (inputs["input_ids"] == IMAGE_TOKEN).nonzero()[:, 1].view(2, -1)
    assert torch.equal(method.visual, visual)
    expected = reference[:, -1].gather(1, visual).topk(5).indices.sort(1).values
    assert torch.equal(method.reduction.keep.sort(1).values, expected)


def test_row_attention_equals_that_row_of_the_full_map(tiny):
    """FastV scores only the query row; it must match the row taken from the full (N, N) map,
    padding and a mixed-length batch included."""
    from vlmprune.tokens import scorers

    class Checking(vp.tokens.FastV):
        def reduce(self, ctx):
            full = ctx.attention(self.layer - 1)
            self.expected = full[torch.arange(full.shape[0]), ctx.query].gather(1, ctx.visual)
            self.got = scorers.row_attention(ctx, self.layer - 1, ctx.query)
            return super().reduce(ctx)

    model, make_inputs = tiny("llava")
    method = Checking(layer=2, keep=5)
    with vp.tokens.apply(model, method), torch.no_grad():
        model(**make_inputs(text_lens=(2, 6), seed=3))
    assert method.got.shape == (2, 16)
    assert torch.allclose(method.got, method.expected, atol=1e-6)


def test_fastv_keep_is_a_count_or_a_fraction(tiny):
    model, make_inputs = tiny("llava")
    inputs = make_inputs(text_lens=(3,))
    length = inputs["input_ids"].shape[1]
    for spec, kept in (("fastv:layer=2,keep=0.5", 8), ("fastv:layer=3,keep=5", 5), ("fastv:keep=0.25", 4)):
        with vp.tokens.apply(model, vp.tokens.from_spec(spec)), torch.no_grad():
            assert model(**inputs).logits.shape[1] == length - 16 + kept


def test_fastv_spec_round_trip_and_bad_settings():
    method = vp.tokens.from_spec("fastv:layer=3,keep=0.5")
    assert isinstance(method, vp.tokens.FastV) and (method.layer, method.keep) == (3, 0.5)
    assert method.spec() == "fastv:layer=3,keep=0.5"
    assert vp.tokens.from_spec(method.spec()).spec() == method.spec()
    with pytest.raises(VlmpruneError, match="fastv layer=0 must be an integer >= 1"):
        vp.tokens.FastV(layer=0)
    with pytest.raises(VlmpruneError, match="has no setting 'ratio'"):
        vp.tokens.from_spec("fastv:ratio=0.5")


def test_random_is_seeded_and_drops_the_same_number_per_site(tiny):
    model, make_inputs = tiny("qwen2_vl")
    inputs = make_inputs(text_lens=(3, 4))

    def run(spec_seed):
        method = RecordingRandom(keep=4, seed=spec_seed, layers=[0, 1, 3])
        with vp.tokens.apply(model, method), torch.no_grad():
            model(**inputs)
        return method.record

    first, again, other = run(0), run(0), run(1)
    assert [(site.layer, present, keep.shape[1]) for site, present, keep in first] == \
        [(0, 16, 12), (1, 12, 8), (3, 8, 4)]
    assert all(torch.equal(a[2], b[2]) for a, b in zip(first, again))
    assert not all(torch.equal(a[2], b[2]) for a, b in zip(first, other))
    assert not torch.equal(first[0][2][0].sort().values, first[0][2][1].sort().values)   # per-sample draws


def test_random_sites_default_before_the_llm_and_in_the_vision_tower(tiny):
    plan = ModelPlan("llava", 4, 2, 4, True)
    assert vp.tokens.from_spec("random:keep=0.25,seed=0").sites(plan) == [Site("llm", 0)]
    assert vp.tokens.from_spec("random:where=vision,layers=1/3").sites(plan) == [Site("vision", 1), Site("vision", 3)]
    model, make_inputs = tiny("llava")
    inputs = make_inputs(text_lens=(3,))
    method = RecordingRandom(keep=0.25, where="vision", layers=[1, 3])
    with vp.tokens.apply(model, method), torch.no_grad():
        out = model(**inputs).logits
    assert [(present, keep.shape[1]) for _, present, keep in method.record] == [(16, 10), (10, 4)]
    assert out.shape[1] == inputs["input_ids"].shape[1] - 16 + 4
    with pytest.raises(VlmpruneError, match="random where='encoder'"):
        vp.tokens.Random(where="encoder")
