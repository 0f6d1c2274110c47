"""IVTP: sites and budget, hand-checked scores, CLIP-to-LLM alignment, the pseudo-[CLS], and runs
through the engine on tiny models (with a tiny CLIP whose vision model is the LLaVA tower)."""
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

from vlmprune.errors import VlmpruneError
from vlmprune.tokens import apply, from_spec
from vlmprune.tokens.base import ModelPlan, Reduction, Site, SiteContext
from vlmprune.tokens.methods.ivtp import IVTP, llm_token_spans

LLAVA15 = ModelPlan(family="llava", n_vision_layers=24, vision_feature_layer=22, n_llm_layers=32, has_cls=True)
TOY = ModelPlan(family="llava", n_vision_layers=6, vision_feature_layer=4, n_llm_layers=8, has_cls=True)
A1 = torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
A2 = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.5, 0.0, 0.5]])


def _layers(sites):
    return [(s.where, s.layer) for s in sites]


def test_sites_groups_and_recorded_layers():
    method = from_spec("ivtp:keep=64")
    sites = method.sites(LLAVA15)
    assert _layers(sites) == [("vision", l) for l in (3, 6, 9, 12, 15, 18, 21, 23)] + [("llm", l) for l in (3, 6, 9, 12)]
    assert method.recorded_layers(Site("vision", 23), LLAVA15) == [21, 22]
    assert method.recorded_layers(Site("llm", 6), LLAVA15) == [3, 4, 5]
    assert _layers(from_spec("ivtp:group=all").sites(LLAVA15))[0] == ("vision", 23)
    assert _layers(from_spec("ivtp:group=2,llm=false").sites(LLAVA15)) == [("vision", l) for l in (*range(2, 23, 2), 23)]
    assert _layers(from_spec("ivtp:llm_layers=6").sites(LLAVA15))[-2:] == [("llm", 3), ("llm", 6)]
    # the toy model (6 vision layers reading layer 4, 8 LLM layers): 12 of 32 LLM layers -> 3
    assert _layers(from_spec("ivtp").sites(TOY)) == [("vision", 3), ("vision", 5), ("llm", 3)]


def test_spec_examples_and_bad_settings():
    assert from_spec("ivtp:keep=16").keep == 16
    assert from_spec("ivtp:keep=0.11").keep == 0.11
    method = from_spec("ivtp:keep=64,group=2,rollout=layer")
    assert (method.keep, method.group, method.rollout) == (64, 2, "layer")
    assert from_spec("ivtp:keep=64,group=2,rollout=layer").spec().startswith("ivtp:keep=64,group=2,rollout=layer")
    for bad in ("ivtp:pcls=clip,instruction=ott", "ivtp:group=0", "ivtp:rollout=median", "ivtp:instruction=te", "ivtp:pcls=text", "ivtp:keep=0",
                "ivtp:llm_group=0", "ivtp:real_pcls=2", "ivtp:real_pcls=true,llm=false"):
        with pytest.raises(VlmpruneError):
            from_spec(bad)
    with pytest.raises(VlmpruneError):
        from_spec("ivtp:llm_layers=40").sites(LLAVA15)


def _rows(full, rows):
    return full if rows is None else full.gather(1, rows[..., None].expand(-1, -1, full.shape[-1]))


def _vision_context(site, attention_maps, values, n_visual=None):
    hidden = torch.randn(1, values.shape[1], 4)
    visual = torch.arange(1, values.shape[1])[None]
    return SiteContext(site=site, hidden=hidden, visual=visual, original=visual - 1,
                       n_visual=n_visual or visual.shape[1], cls=0, query=None,
                       attention=lambda layer, rows=None: _rows(attention_maps[layer][None], rows),
                       values=lambda layer: values,
                       keys=lambda layer: values, inputs={})


def test_vision_score_is_rollout_row_times_value_norm():
    plan = ModelPlan(family="llava", n_vision_layers=3, vision_feature_layer=1, n_llm_layers=8, has_cls=True)
    values = torch.tensor([[[1.0, 0.0], [6.0, 8.0], [1.0, 0.0]]])       # patch norms 10 and 1
    # residual rollout [CLS] row: [.375, .125, .5] -> S ~ [.125 * 10, .5 * 1]: the first patch wins
    method = IVTP(keep=1, group=2, llm=False)
    (site,) = method.sites(plan)
    assert method.reduce(_vision_context(site, {0: A1, 1: A2}, values)).keep.tolist() == [[0]]
    # the last layer alone gives [CLS] -> patch 2 only: the second patch wins
    method = IVTP(keep=1, group=2, rollout="layer", llm=False)
    method.sites(plan)
    assert method.reduce(_vision_context(site, {0: A1, 1: A2}, values)).keep.tolist() == [[1]]


def test_budget_follows_the_2n_rule_on_llava15():
    method = IVTP(keep=64)
    sites = method.sites(LLAVA15)
    counts, n = [], 576
    for site in sites:
        values = torch.rand(1, n + 1, 4) + 0.1
        maps = {layer: torch.softmax(torch.randn(n + 1, n + 1), -1) for layer in method.recorded_layers(site, LLAVA15)}
        ctx = _vision_context(site, maps, values, n_visual=576)
        if site.where == "llm":
            ctx.cls, ctx.query = None, torch.tensor([0])
        n = method.reduce(ctx).keep.shape[1]
        counts.append(n)
    assert counts == [520, 464, 408, 352, 296, 240, 184, 128, 112, 96, 80, 64]


# ---------------------------------------------------------------- text relevance and alignment

def _word_tokenizer(words):
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=words[0]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    from tokenizers import decoders
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=words[0], pad_token=words[0])


def _bpe_tokenizer(texts, size=60):
    tok = Tokenizer(models.BPE(unk_token="<unk>", end_of_word_suffix="</w>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=size, special_tokens=["<pad>", "<unk>"],
                                                       end_of_word_suffix="</w>", show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")


def test_llm_token_spans_cover_each_token():
    tokenizer = _word_tokenizer(["<unk>", "what", "colour", "is", "the", "cube", "?"])
    ids = tokenizer("what colour is the cube ?")["input_ids"]
    spans, text = llm_token_spans(tokenizer, ids)
    assert text == "what colour is the cube?"
    assert [text[s:e].strip() for s, e in spans] == ["what", "colour", "is", "the", "cube", "?"]


WORDS = ["<unk>"] + [f"w{i}" for i in range(1, 128)]


@pytest.fixture(scope="module")
def tiny_ivtp(tiny):
    """Tiny LLaVA, a tiny CLIP whose vision model is the LLaVA tower, and both tokenizers."""
    model, make_inputs = tiny("llava")
    vision = model.config.vision_config.to_dict()
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                 num_attention_heads=2, vocab_size=64, max_position_embeddings=64,
                                                 pad_token_id=0, bos_token_id=1, eos_token_id=1),
                                vision_config=vision, projection_dim=8)).eval()
    clip.vision_model.load_state_dict(model.model.vision_tower.state_dict())
    clip_tokenizer = _bpe_tokenizer([" ".join(WORDS[1:])] * 3)
    return model, make_inputs, clip, clip_tokenizer, _word_tokenizer(WORDS)


def _ivtp(tiny_ivtp, **settings):
    _, _, clip, clip_tokenizer, tokenizer = tiny_ivtp
    return IVTP(clip=clip, clip_tokenizer=clip_tokenizer, tokenizer=tokenizer, **settings)


def test_relevance_is_the_mean_over_overlapping_clip_tokens(tiny_ivtp):
    _, _, clip, clip_tokenizer, tokenizer = tiny_ivtp
    method = _ivtp(tiny_ivtp)
    ids = torch.tensor([5, 17, 93])
    image = torch.randn(8)
    [(relevance, token_embeds, _)] = method._text_relevance(None, [ids], image[None])
    text = "w5 w17 w93"
    real = [(s, e) for s, e in clip_tokenizer(text, return_offsets_mapping=True)["offset_mapping"] if e > s]
    cosines = torch.nn.functional.cosine_similarity(token_embeds, image[None], dim=-1)
    assert token_embeds.shape[0] == len(real)      # special tokens left out
    assert not (relevance.requires_grad or token_embeds.requires_grad)   # scoring builds no graph
    for i, (start, end) in enumerate([(0, 2), (3, 6), (7, 10)]):
        inside = [j for j, (s, e) in enumerate(real) if s < end and e > start]
        assert inside and torch.allclose(relevance[i], cosines[inside].mean())


def test_relevance_of_a_batch_equals_each_text_alone(tiny_ivtp):
    """The batch's texts share one (padded) text-encoder pass; each keeps its own image embedding."""
    method = _ivtp(tiny_ivtp)
    torch.manual_seed(0)
    texts, images = [torch.tensor([5, 17, 93, 4, 8]), torch.tensor([21, 3])], torch.randn(2, 8)
    together = method._text_relevance(None, texts, images)
    for b, (ids, image) in enumerate(zip(texts, images)):
        [alone] = method._text_relevance(None, [ids], image[None])
        for a, c in zip(together[b], alone):
            assert a.shape == c.shape and torch.allclose(a.float(), c.float(), atol=1e-5)


# ---------------------------------------------------------------- through the engine

def _run(model, inputs, method):
    counts, slots = [], []
    reduce, scoring = method.reduce, method.scoring_token

    def recording(ctx):
        reduction = reduce(ctx)
        counts.append((ctx.site.where, reduction.keep.shape[1]))
        return reduction

    def scoring_recording(model_, inputs_):
        slot = scoring(model_, inputs_)
        slots.append(slot)
        return slot

    method.reduce, method.scoring_token = recording, scoring_recording
    with apply(model, method), torch.no_grad():
        logits = model(**inputs).logits
    return logits, counts, slots[0]


def _instruction_mean(model, inputs):
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    rows = []
    for b in range(ids.shape[0]):
        after = (ids[b] == model.config.image_token_id).nonzero().max() + 1
        rows.append(model.get_input_embeddings()(ids[b, after:][mask[b, after:].bool()]).mean(0))
    return torch.stack(rows)


def test_counts_on_tiny_llava_and_keep_all_is_dense(tiny_ivtp):
    model, make_inputs, *_ = tiny_ivtp
    inputs = make_inputs(text_lens=(5, 3))
    _, counts, _ = _run(model, inputs, _ivtp(tiny_ivtp, keep=4))
    assert counts == [("vision", 10), ("llm", 4)]     # 4 >= the scaled threshold: equal steps 16 -> 10 -> 4
    _, counts, _ = _run(model, inputs, _ivtp(tiny_ivtp, keep=2))
    assert counts == [("vision", 4), ("llm", 2)]      # 2 < 128/576 * 16: the ViT keeps 2n
    with torch.no_grad():
        dense = model(**inputs).logits
    logits, counts, slot = _run(model, inputs, _ivtp(tiny_ivtp, keep=16))
    assert slot is not None and slot.abs().sum() > 0   # the scoring token was there, masked
    assert torch.allclose(logits[:, -1], dense[:, -1], atol=1e-4)


def test_pseudo_cls_is_relevant_text_or_the_projected_visual_cls(tiny_ivtp):
    model, make_inputs, *_ = tiny_ivtp
    inputs = make_inputs(text_lens=(5, 3))
    _, _, slot = _run(model, inputs, _ivtp(tiny_ivtp, keep=4, tau=-2.0))            # every token passes
    assert torch.allclose(slot, _instruction_mean(model, inputs), atol=1e-6)
    _, _, slot = _run(model, inputs, _ivtp(tiny_ivtp, keep=4, tau=2.0))             # none passes: fallback
    with torch.no_grad():
        tower = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True)
        visual = model.model.multi_modal_projector(tower.hidden_states[-2][:, 0])
    assert torch.allclose(slot, visual, atol=1e-5)
    _, _, slot = _run(model, inputs, _ivtp(tiny_ivtp, keep=4, tau=-2.0, pcls="hybrid"))
    assert torch.allclose(slot, 0.5 * (_instruction_mean(model, inputs) + visual), atol=1e-5)
    _, _, slot = _run(model, inputs, _ivtp(tiny_ivtp, keep=4, instruction="ott"))
    assert torch.allclose(slot, _instruction_mean(model, inputs), atol=1e-6)


def _decisions(tiny_ivtp, inputs, **settings):
    """Every site's (where, layer) and keep set, and the pseudo-[CLS], of one forward."""
    model = tiny_ivtp[0]
    method = _ivtp(tiny_ivtp, keep=4, **settings)
    kept, reduce = [], method.reduce
    method.reduce = lambda ctx: kept.append((ctx.site.where, ctx.site.layer, reduce(ctx).keep)) or Reduction(kept[-1][2])
    _, _, slot = _run(model, inputs, method)
    return kept, slot


@pytest.mark.parametrize("settings", [dict(instruction="ott+rt"), dict(pcls="clip"), dict(pcls="visual"),
                                      dict(group="all", rollout="multiply"), dict(rollout="group-mean"),
                                      dict(rollout="layer"), dict(llm_group=1, llm_layers=2)])
def test_ablation_switches_change_what_they_name(tiny_ivtp, settings):
    """Each ablation switch changes the decisions it is about, relative to the default on the same
    inputs: the pseudo-[CLS] for instruction/pcls, the keep sets for rollout, the sites for the LLM groups."""
    inputs = tiny_ivtp[1](text_lens=(5, 3), seed=5)
    default_kept, default_slot = _decisions(tiny_ivtp, inputs, tau=0.0)
    kept, slot = _decisions(tiny_ivtp, inputs, tau=0.0, **settings)
    assert kept[-1][2].shape[1] == 4 and torch.isfinite(slot).all()
    if "instruction" in settings or "pcls" in settings:
        assert not torch.allclose(slot, default_slot, atol=1e-4)
    elif "rollout" in settings:     # on this 4-layer tower group=all is the default's single group
        assert [site[:2] for site in kept] == [site[:2] for site in default_kept]
        assert any(not torch.equal(a[2], b[2]) for a, b in zip(kept, default_kept))
    else:
        assert [site[:2] for site in kept] == [("vision", 3), ("llm", 1), ("llm", 2)]


def test_a_real_pseudo_cls_stays_in_the_sequence(tiny_ivtp):
    """``real_pcls=true``: one more position in the output than with the scoring-only pseudo-[CLS],
    and the text after it answers differently because it sees it."""
    model, make_inputs, *_ = tiny_ivtp
    inputs = make_inputs(text_lens=(5, 3))
    masked, _, _ = _run(model, inputs, _ivtp(tiny_ivtp, keep=4))
    real, counts, slot = _run(model, inputs, _ivtp(tiny_ivtp, keep=4, real_pcls=True))
    assert counts == [("vision", 10), ("llm", 4)] and slot is not None
    assert real.shape[1] == masked.shape[1] + 1
    assert not torch.allclose(real[:, -1], masked[:, -1], atol=1e-4)


def test_ivtp_v_prunes_in_the_vision_tower_only(tiny_ivtp):
    model, make_inputs, *_ = tiny_ivtp
    _, counts, slot = _run(model, make_inputs(), _ivtp(tiny_ivtp, keep=4, llm=False))
    assert counts == [("vision", 4)] and slot is None


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl"])
def test_towers_without_cls_prune_in_the_llm_with_the_instruction_mean(tiny, family):
    model, make_inputs = tiny(family)
    inputs = make_inputs(text_lens=(5, 3))
    method = IVTP(keep=2)
    assert all(site.where == "llm" for site in method.sites(ModelPlan(family, 0, 0, 4, False)))
    _, counts, slot = _run(model, inputs, method)
    assert counts[-1] == ("llm", 2)
    assert torch.allclose(slot, _instruction_mean(model, inputs), atol=1e-6)
    with pytest.raises(VlmpruneError, match="lacks"):
        IVTP(llm=False).sites(ModelPlan(family, 0, 0, 4, False))


def test_counted_flops_include_the_text_encoder_as_extra(tiny_ivtp):
    from vlmprune.measure.flops import count_flops
    from vlmprune.models.presets import Preset, default_image_size

    model = tiny_ivtp[0]
    preset = Preset("tiny-llava", model.config, default_image_size(model.config))
    dense = count_flops(preset, 6).flops
    with_text = count_flops(preset, 6, _ivtp(tiny_ivtp, keep=4)).flops
    without = count_flops(preset, 6, _ivtp(tiny_ivtp, keep=4, instruction="ott")).flops
    assert with_text.llm < dense.llm and with_text.vision < dense.vision
    assert with_text.extra > without.extra > 0


def test_generate_encodes_the_image_first_and_still_fills_the_pseudo_cls(tiny_ivtp):
    model, make_inputs, *_ = tiny_ivtp
    inputs = make_inputs(text_lens=(5, 3))
    method = _ivtp(tiny_ivtp, keep=4, tau=-2.0)
    slots = []
    scoring = method.scoring_token
    method.scoring_token = lambda model_, inputs_: slots.append(scoring(model_, inputs_)) or slots[-1]
    with apply(model, method), torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert len(slots) == 1 and torch.allclose(slots[0], _instruction_mean(model, inputs), atol=1e-6)


def _llm_site_calls(model, inputs, method):
    """(ctx, reduction) of every LLM-site call of ``method`` in one forward."""
    calls, reduce = [], method.reduce

    def recording(ctx):
        reduction = reduce(ctx)
        if ctx.site.where == "llm":
            calls.append((ctx, reduction))
        return reduction

    method.reduce = recording
    with apply(model, method), torch.no_grad():
        model(**inputs)
    return calls


def _expected_llm_keep(ctx, layers, count):
    """IVTP's LLM stage written out from full attention maps: residual rollout ``R <- norm(A + I) @ R``
    over the group, the pseudo-[CLS] row, times the value norms of the group's last layer, top ``count``."""
    batch, n = ctx.hidden.shape[:2]
    rollout = torch.eye(n).expand(batch, n, n)
    for layer in layers:
        step = ctx.attention(layer).float() + torch.eye(n)
        rollout = (step / step.sum(-1, keepdim=True)) @ rollout
    row = rollout[torch.arange(batch), ctx.query]
    score = row.gather(1, ctx.visual) * ctx.values(layers[-1]).float().norm(dim=-1).gather(1, ctx.visual)
    return score.topk(count, dim=1).indices.sort(1).values


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_llm_stage_ranks_the_rollout_row_of_the_pseudo_cls(tiny, tiny_ivtp, family):
    """The LLM stage scores visual tokens from the pseudo-[CLS] row (right after the visual tokens, not
    the last prompt token) of the rollout over its whole group, and keeps the top ones."""
    if family == "llava":
        model, make_inputs, *_ = tiny_ivtp
        method = _ivtp(tiny_ivtp, keep=3, llm_group=3, llm_layers=3)
    else:
        model, make_inputs = tiny(family)
        method = IVTP(keep=3, llm_group=3, llm_layers=3)
    inputs = make_inputs(text_lens=(6, 4), seed=5)
    ((ctx, reduction),) = _llm_site_calls(model, inputs, method)
    assert torch.equal(ctx.query, ctx.visual[:, -1] + 1)
    assert ctx.query.max() < ctx.hidden.shape[1] - 1          # the last prompt token is elsewhere
    expected = _expected_llm_keep(ctx, [0, 1, 2], reduction.keep.shape[1])
    assert torch.equal(reduction.keep.sort(1).values, expected)
    last_layer_only = _expected_llm_keep_last_layer(ctx, 2, reduction.keep.shape[1])
    last_token = _expected_llm_keep(type(ctx)(**{**vars(ctx), "query": torch.full_like(ctx.query, ctx.hidden.shape[1] - 1)}),
                                    [0, 1, 2], reduction.keep.shape[1])
    assert not torch.equal(expected, last_layer_only) and not torch.equal(expected, last_token)  # the case tells them apart


def _expected_llm_keep_last_layer(ctx, layer, count):
    row = ctx.attention(layer).float()[torch.arange(ctx.hidden.shape[0]), ctx.query]
    score = row.gather(1, ctx.visual) * ctx.values(layer).float().norm(dim=-1).gather(1, ctx.visual)
    return score.topk(count, dim=1).indices.sort(1).values


@pytest.mark.parametrize("instruction", ["ott+rt", "ott+te+rt"])
def test_pseudo_cls_is_the_mean_of_exactly_the_tokens_over_tau(tiny_ivtp, instruction):
    """With tau between the lowest and the highest relevance, the pseudo-[CLS] is the mean of the
    instruction tokens at or above tau: neither all of them nor the fallback."""
    model, make_inputs, clip, clip_tokenizer, tokenizer = tiny_ivtp
    inputs = make_inputs(text_lens=(6,), seed=2)
    probe = _ivtp(tiny_ivtp, keep=4, instruction=instruction)
    relevances = []
    if instruction == "ott+rt":
        fill = probe._fill_pseudo_cls

        def capture(sequence, slot, instructions, model, adapter):
            visual_cls = adapter.projector(sequence[:, 0])
            relevances.append(torch.nn.functional.cosine_similarity(instructions[0][1].float(),
                                                                    visual_cls[0].float()[None], dim=-1))
            return fill(sequence, slot, instructions, model, adapter)

        probe._fill_pseudo_cls = capture
    else:
        text_relevance = probe._text_relevance
        probe._text_relevance = lambda *a: relevances.append(text_relevance(*a)[0][0]) or text_relevance(*a)
    _run(model, inputs, probe)
    (relevance,) = relevances
    tau = float(relevance.median())
    passing = relevance >= tau
    assert 0 < int(passing.sum()) < len(relevance)
    _, _, slot = _run(model, inputs, _ivtp(tiny_ivtp, keep=4, instruction=instruction, tau=tau))
    after = int((inputs["input_ids"][0] == model.config.image_token_id).nonzero().max()) + 1
    embeds = model.get_input_embeddings()(inputs["input_ids"][0, after:])
    assert torch.allclose(slot[0], embeds[passing].mean(0), atol=1e-6)
    assert not torch.allclose(slot[0], embeds.mean(0), atol=1e-4)
