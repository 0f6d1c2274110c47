"""Small-model guidance (SGP, SEE, PGP) on tiny random pairs: the pairing check, scores against hand
sums over ``output_attentions``, KL against torch.distributions, and the engine invariants (keeping
every token is dense; cached decoding equals recomputation)."""
import pytest
import torch
from torch.distributions import Normal, kl_divergence

import vlmprune as vp
from vlmprune.errors import VlmpruneError
from vlmprune.models.tiny import build_tiny, sample
from vlmprune.tokens.guidance import pair
from vlmprune.tokens.guidance.pgp import InformationBottleneck, PGPGuide, PGPSettings, image_last
from vlmprune.tokens.guidance.see import early_exit, with_answer
from vlmprune.tokens.guidance.sgp import guide_answer
from vlmprune.tokens.guidance.train_pgp import beta_at
from vlmprune.tokens.methods.pgp import PGP
from vlmprune.tokens.methods.sgp import SGP

from decoding import Frozen, logits_without_cache

FAMILIES = ("llava", "qwen2_vl")
STEPS = 3


@pytest.fixture(scope="module")
def pairs():
    """family -> (small, large, make_inputs): a 2-layer and a 4-layer tiny model sharing the visual layout."""
    built = {}
    for family in FAMILIES:
        small, _ = build_tiny(family, seed=1, text_config={"num_hidden_layers": 2})
        large, make_inputs = build_tiny(family, seed=0)
        built[family] = (small, large, make_inputs)
    return built


def _visual(input_ids, image_token):
    mask = input_ids == image_token
    return torch.arange(input_ids.shape[1]).expand_as(input_ids)[mask].view(input_ids.shape[0], -1)


# -- pairing -------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_a_same_family_pair_is_accepted(pairs, family):
    small, large, _ = pairs[family]
    checked = pair(small, large)
    assert checked.small is small and checked.n_visual > 0


@pytest.mark.parametrize("family,vision", [("llava", {"patch_size": 14}), ("qwen2_vl", {"spatial_merge_size": 1})])
def test_a_pair_whose_visual_tokens_differ_is_refused(pairs, family, vision):
    other, _ = build_tiny(family, seed=1, text_config={"num_hidden_layers": 2}, vision_config=vision)
    with pytest.raises(VlmpruneError) as error:
        pair(other, pairs[family][1])
    assert "\n" not in str(error.value) and ("grid" in str(error.value) or "visual tokens" in str(error.value))


def test_a_pair_across_families_is_refused(pairs):
    with pytest.raises(VlmpruneError, match="family"):
        pair(pairs["qwen2_vl"][0], pairs["llava"][1])


# -- SGP -----------------------------------------------------------------------------------------

def _hand_sgp(small, inputs, tokens, stop):
    """Sum of eager attention over layers, heads, prompt rows after the image and the rows of the
    generated tokens read back before the end-of-sequence, from one no-cache forward per sample."""
    image = small.config.image_token_id
    rows = []
    for i in range(inputs["input_ids"].shape[0]):
        one = sample(inputs, i)
        length = one["input_ids"].shape[1]
        fed = []
        for token in tokens[i, :-1].tolist():
            if token in stop:
                break
            fed.append(token)
        full = with_answer(one, torch.tensor([fed], dtype=torch.long)) if fed else one
        with torch.no_grad():
            attentions = small(**full, output_attentions=True, use_cache=False).attentions
        total = sum(a[0].sum(0) for a in attentions)                    # (L, L) summed over heads and layers
        visual = _visual(one["input_ids"], image)[0]
        first_row = int(visual[-1]) + 1
        rows.append(total[first_row:length + len(fed), visual].sum(0))
    return torch.stack(rows)


@pytest.mark.parametrize("family", FAMILIES)
def test_sgp_scores_are_the_hand_sum_of_attention(pairs, family):
    """The first sample's second greedy token is made the end-of-sequence, so the batch goes on after it
    for the other sample: the rows it generates past that point must not count."""
    small, _, make_inputs = pairs[family]
    inputs = make_inputs(text_lens=(3, 6), seed=5)
    eos = small.generation_config.eos_token_id
    small.generation_config.eos_token_id = int(guide_answer(small, inputs, max_new_tokens=4).tokens[0, 1])
    try:
        run = guide_answer(small, inputs, max_new_tokens=4)
        assert not run.answered[0].all() and run.answered[1, :3].all()   # sample 0 stopped early
        small.set_attn_implementation("eager")
        expected = _hand_sgp(small, inputs, run.tokens, [small.generation_config.eos_token_id])
    finally:
        small.generation_config.eos_token_id = eos
        small.set_attn_implementation("sdpa")
    assert run.scores.shape == expected.shape
    torch.testing.assert_close(run.scores, expected, atol=1e-4, rtol=1e-4)


def test_sgp_scores_of_a_batch_are_those_of_its_samples(pairs):
    small, _, make_inputs = pairs["llava"]
    inputs = make_inputs(text_lens=(2, 7), seed=2)
    batch = guide_answer(small, inputs, max_new_tokens=4).scores
    alone = torch.cat([guide_answer(small, sample(inputs, i), max_new_tokens=4).scores for i in range(2)])
    torch.testing.assert_close(batch, alone, atol=1e-4, rtol=1e-4)


def _guided(kind, small_or_guide, keep, layer):
    return SGP(keep=keep, layer=layer, guide=small_or_guide) if kind == "sgp" else PGP(keep=keep, layer=layer,
                                                                                     guide=small_or_guide)


def _guide_for(kind, small):
    if kind == "sgp":
        return small
    torch.manual_seed(0)
    return PGPGuide(small, PGPSettings(base="tiny", rank=4, alpha=8, apart=True)).eval()


@pytest.fixture(scope="module")
def guides(pairs):
    return {(kind, family): _guide_for(kind, build_tiny(family, seed=1, text_config={"num_hidden_layers": 2})[0])
            for kind in ("sgp", "pgp") for family in FAMILIES}


@pytest.mark.parametrize("kind", ["sgp", "pgp"])
@pytest.mark.parametrize("family", FAMILIES)
def test_keeping_every_token_gives_the_dense_logits(pairs, guides, kind, family):
    _, large, make_inputs = pairs[family]
    inputs = make_inputs(text_lens=(3, 6), seed=4)
    n_visual = int((inputs["input_ids"][0] == large.config.image_token_id).sum())
    with torch.no_grad():
        dense = large(**inputs).logits
        with vp.tokens.apply(large, _guided(kind, guides[(kind, family)], n_visual, 1)):
            guided = large(**inputs).logits
    torch.testing.assert_close(guided, dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,layer", [("sgp", 1), ("pgp", 0)])
@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decoding_has_the_no_cache_logits(pairs, guides, kind, layer, family):
    _, large, make_inputs = pairs[family]
    inputs = make_inputs(text_lens=(3, 6), seed=3)
    frozen = Frozen(_guided(kind, guides[(kind, family)], 0.5, layer))
    with vp.tokens.apply(large, frozen), torch.no_grad():
        out = large.generate(**inputs, max_new_tokens=STEPS, do_sample=False, eos_token_id=None,
                             output_logits=True, return_dict_in_generate=True)
        assert large(**inputs).logits.shape[1] < inputs["input_ids"].shape[1]   # it does prune
        frozen.replaying = True
        reference = logits_without_cache(large, inputs, out.sequences[:, -STEPS:])
    for step, (cached, recomputed) in enumerate(zip(out.logits, reference)):
        assert (cached - recomputed).abs().max().item() <= 1e-4, f"step {step}"


def test_sgp_keeps_the_top_scored_tokens(pairs):
    small, large, make_inputs = pairs["llava"]
    inputs = make_inputs(text_lens=(4,), seed=6)
    scores = guide_answer(small, inputs, max_new_tokens=5).scores
    kept = []

    class Spy(SGP):
        def reduce(self, ctx):
            reduction = super().reduce(ctx)
            kept.append(ctx.original.gather(1, reduction.keep))
            return reduction

    with vp.tokens.apply(large, Spy(keep=3, layer=2, guide=small)), torch.no_grad():
        large(**inputs)
    assert set(kept[0][0].tolist()) == set(scores[0].topk(3).indices.tolist())


# -- SEE -----------------------------------------------------------------------------------------

def test_see_confidence_and_consistency_by_hand(pairs):
    small, _, make_inputs = pairs["llava"]
    inputs = make_inputs(text_lens=(5,), seed=7)
    decisions = early_exit(small, inputs, threshold=0.0, keep=0.25, max_new_tokens=3)
    run = guide_answer(small, inputs, max_new_tokens=3)
    answer = decisions[0].answer
    assert answer == run.tokens[0][: len(answer)].tolist() and len(answer) >= 1
    # S_conf: geometric mean of the greedy probabilities, each from a no-cache forward
    probs, prompt = [], dict(inputs)
    for token in answer:
        with torch.no_grad():
            p = small(**prompt, use_cache=False).logits[0, -1].softmax(-1)[token]
        probs.append(float(p))
        prompt = with_answer(prompt, torch.tensor([[token]]))
    assert decisions[0].confidence == pytest.approx(float(torch.tensor(probs).prod() ** (1 / len(probs))), rel=1e-4)
    # S_cons: the same tokens with only the top quarter of visual tokens, dropped from the input ids
    visual = _visual(inputs["input_ids"], small.config.image_token_id)[0]
    top = set(visual[run.scores[0].topk(4).indices].tolist())
    drop = [i for i in visual.tolist() if i not in top]
    keep_positions = [i for i in range(inputs["input_ids"].shape[1]) if i not in drop]
    full = with_answer(inputs, torch.tensor([answer]))
    with torch.no_grad():
        embeds = small.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]
        text = small.get_input_embeddings()(full["input_ids"])
        text[0, visual] = embeds.to(text.dtype)
        positions = torch.arange(full["input_ids"].shape[1])
        columns = keep_positions + list(range(inputs["input_ids"].shape[1], full["input_ids"].shape[1]))
        logits = small.model.language_model(inputs_embeds=text[:, columns], position_ids=positions[columns][None])
        logits = small.lm_head(logits.last_hidden_state)[0, -len(answer) - 1:-1]
    cons = float(torch.stack([logits[t].softmax(-1)[token] for t, token in enumerate(answer)]).prod())
    assert decisions[0].consistency == pytest.approx(cons, rel=1e-4)
    assert decisions[0].exited   # threshold 0: any answer exits
    assert not early_exit(small, inputs, threshold=1.0, keep=0.25, max_new_tokens=3)[0].exited


# -- PGP -----------------------------------------------------------------------------------------

def test_bottleneck_kl_is_the_gaussian_kl_summed_over_channels():
    torch.manual_seed(0)
    module = InformationBottleneck(6, hidden=5)
    with torch.no_grad():
        module.prior_mu.normal_()
        module.prior_log_sigma.normal_(0, 0.3)
    states = torch.randn(2, 3, 6)
    mu, sigma = module(states)
    gate = torch.sigmoid(module.gate(states))
    torch.testing.assert_close(mu, gate * (states - module.prior_mu) + module.prior_mu)
    expected = kl_divergence(Normal(mu, sigma), Normal(module.prior_mu, module.prior_log_sigma.exp())).sum(-1)
    torch.testing.assert_close(module.kl(mu, sigma), expected, atol=1e-5, rtol=1e-5)
    assert module.kl(module.prior_mu.expand(4, 6), module.prior_log_sigma.exp().expand(4, 6)).abs().max() < 1e-6


def test_beta_falls_linearly_over_the_first_fifth_then_stays():
    total = 100
    assert beta_at(0, total) == pytest.approx(0.5)
    assert beta_at(10, total) == pytest.approx(0.35)
    assert beta_at(20, total) == pytest.approx(0.2)
    assert beta_at(99, total) == pytest.approx(0.2)


@pytest.mark.parametrize("family", FAMILIES)
def test_image_last_moves_the_image_block_behind_the_prompt(pairs, family):
    small, _, make_inputs = pairs[family]
    inputs = make_inputs(text_lens=(2, 5), seed=1)
    moved = image_last(small, inputs)
    image = small.config.image_token_id
    for row, original in zip(moved["input_ids"], inputs["input_ids"]):
        n = int((original == image).sum())
        tail = row[-n - (2 if family == "qwen2_vl" else 0):]
        assert set(tail.tolist()) <= {image, 124, 125} and sorted(row.tolist()) == sorted(original.tolist())
    assert torch.equal(moved["attention_mask"].sum(1), inputs["attention_mask"].sum(1))


def test_pgp_importance_of_a_batch_is_that_of_its_samples(guides, pairs):
    guide = guides[("pgp", "llava")]
    inputs = pairs["llava"][2](text_lens=(2, 7), seed=2)
    batch = guide.importance(inputs)
    alone = torch.cat([guide.importance(sample(inputs, i)) for i in range(2)])
    torch.testing.assert_close(batch, alone, atol=1e-4, rtol=1e-4)


# -- the shipped toy pair ------------------------------------------------------------------------

def test_a_guided_spec_without_a_guide_is_refused_for_a_model_other_than_toy_large(pairs):
    _, large, make_inputs = pairs["llava"]
    with vp.tokens.apply(large, vp.tokens.from_spec("sgp:keep=0.5")), pytest.raises(VlmpruneError, match="guide=PATH"):
        large(**make_inputs())


@pytest.mark.parametrize("spec", ["sgp:keep=0.05", "pgp:keep=0.05"])
def test_the_spec_finds_the_shipped_guide_for_toy_large(spec):
    from vlmprune import toyworld
    from vlmprune.eval.harness import model_inputs

    large, processor = toyworld.load("toy-large")
    item = toyworld.test_split("attribute", 1)[0]
    inputs = model_inputs(processor, [item.image], [item.question], large.device, large.dtype)
    with vp.tokens.apply(large, vp.tokens.from_spec(spec)), torch.no_grad():
        length = large(**inputs).logits.shape[1]
    assert length == inputs["input_ids"].shape[1] - 95     # 5 of the 100 visual tokens stay


def test_a_guide_path_in_a_spec_is_a_path():
    method = vp.tokens.from_spec("pgp:keep=0.05,guide=/tmp/runs/guide-1")
    assert method.guide == "/tmp/runs/guide-1"


# -- one vision tower for a pair whose towers hold equal weights ----------------------------------

def _tower_sharing_guide(kind, family, large):
    """A fresh guide of ``kind`` whose vision tower holds ``large``'s weights, and a counter of the
    guide's own tower runs."""
    from vlmprune.models import get_adapter

    small, _ = build_tiny(family, seed=1, text_config={"num_hidden_layers": 2})
    tower = get_adapter(small).vision_tower
    tower.load_state_dict(get_adapter(large).vision_tower.state_dict())
    runs = []
    first = next(module for module in tower.modules() if not list(module.children()))
    first.register_forward_hook(lambda *args: runs.append(1))
    return _guide_for(kind, small), runs


@pytest.mark.parametrize("family", FAMILIES)
def test_the_pair_shares_its_tower_only_when_the_weights_are_equal(pairs, family):
    from vlmprune.models import get_adapter

    small, large, _ = pairs[family]
    assert not pair(small, large).shared_tower                  # same architecture, other weights
    guide, _ = _tower_sharing_guide("sgp", family, large)
    assert pair(guide, large).shared_tower
    with torch.no_grad():
        next(get_adapter(guide).vision_tower.parameters()).view(-1)[0] += 1e-3
    assert not pair(guide, large).shared_tower


def test_the_shipped_toy_pair_shares_toy_clips_tower():
    from vlmprune import toyworld
    assert pair(toyworld.load("toy-small")[0], toyworld.load("toy-large")[0]).shared_tower


@pytest.mark.parametrize("kind", ["sgp", "pgp"])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_shared_tower_runs_once_and_changes_no_logit(pairs, kind, family):
    _, large, make_inputs = pairs[family]
    inputs = make_inputs(text_lens=(3, 6), seed=5)
    guide, runs = _tower_sharing_guide(kind, family, large)
    outputs = {}
    for share in (False, True):
        method = SGP(keep=0.5, layer=1, guide=guide, share=share) if kind == "sgp" else \
            PGP(keep=0.5, layer=0, guide=guide, share=share)
        with vp.tokens.apply(large, method), torch.no_grad():
            runs.clear()
            logits = large(**inputs).logits
            forward_runs = len(runs)
            out = large.generate(**inputs, max_new_tokens=STEPS, do_sample=False, eos_token_id=None,
                                 output_logits=True, return_dict_in_generate=True)
        outputs[share] = (logits, out.sequences, torch.stack(out.logits), forward_runs, len(runs))
    assert outputs[False][3] > 0 and outputs[True][3] == 0            # the guide's tower runs only when not shared
    assert outputs[True][4] == 0                                      # nor in generate (prefill and decode steps)
    for unshared, shared in zip(outputs[False][:3], outputs[True][:3]):
        assert torch.equal(unshared, shared)


def test_a_shared_tower_is_counted_once(pairs):
    from vlmprune.measure.flops import count_flops
    from vlmprune.models.presets import Preset, default_image_size

    _, large, make_inputs = pairs["llava"]
    guide, _ = _tower_sharing_guide("pgp", "llava", large)
    preset = Preset("tiny", large.config, default_image_size(large.config))
    totals = {}
    for share in (False, True):
        method = PGP(keep=0.5, guide=guide, share=share)
        with vp.tokens.apply(large, method), torch.no_grad():
            large(**make_inputs())                                    # pairs the real models first
        totals[share] = count_flops(preset, 8, method).flops
    dense = count_flops(preset, 8).flops
    assert totals[False].total - totals[True].total == dense.vision


def test_beta_is_zero_over_the_warmup_then_follows_the_schedule():
    assert beta_at(0, 100, warmup=0.1) == 0.0 and beta_at(9, 100, warmup=0.1) == 0.0
    assert beta_at(10, 100, warmup=0.1) == pytest.approx(0.5)
    assert beta_at(20, 100, warmup=0.1) == pytest.approx(0.35)
    assert beta_at(30, 100, warmup=0.1) == pytest.approx(0.2) and beta_at(99, 100, warmup=0.1) == pytest.approx(0.2)


def test_a_visual_state_reads_the_prompt_and_its_own_token_only(guides, pairs):
    """Where V' is read, changing one visual token's input leaves every other visual state as it was
    (with the model's own causal attention the later ones change)."""
    from vlmprune.models import get_adapter
    from vlmprune.tokens.guidance.pgp import visual_tokens_apart

    guide = guides[("pgp", "llava")]
    inputs = pairs["llava"][2](text_lens=(3, 5), seed=7)
    projector = get_adapter(guide.small).projector

    def states(shift: float, apart: bool):
        handle = projector.register_forward_hook(lambda m, a, out: out.index_add(
            1, torch.tensor([1]), torch.full_like(out[:, :1], shift)))
        try:
            with torch.no_grad():
                if apart:
                    return guide.visual_states(inputs)
                ordered = image_last(guide.small, inputs)
                hidden = guide.small(**ordered, output_hidden_states=True).hidden_states[-1]
                return hidden.gather(1, _visual(ordered["input_ids"], guide.small.config.image_token_id)[..., None]
                                     .expand(-1, -1, hidden.shape[-1]))
        finally:
            handle.remove()

    base, moved = states(0.0, True), states(1.0, True)
    others = [i for i in range(base.shape[1]) if i != 1]
    assert not torch.allclose(base[:, 1], moved[:, 1])
    torch.testing.assert_close(base[:, others], moved[:, others], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(states(0.0, False)[:, 2:], states(1.0, False)[:, 2:])


def test_a_two_step_training_saves_a_guide_that_loads_with_its_settings_and_curve(tmp_path):
    import json
    from dataclasses import replace

    from vlmprune.tokens.guidance.pgp import load_guide
    from vlmprune.tokens.guidance.train_pgp import CURVE, RECIPES, train_pgp

    trained = train_pgp(str(tmp_path), training=replace(RECIPES["uncollapsed"], steps=2, batch=2), progress=False)
    loaded = load_guide(tmp_path)
    assert loaded.settings.apart and json.loads((tmp_path / CURVE).read_text())["rows"][-1][0] == 1
    for (name, a), (_, b) in zip(trained.small.named_parameters(), loaded.small.named_parameters()):
        torch.testing.assert_close(a.detach().half().float(), b, msg=name)
    assert any("lora_B" in name and p.abs().sum() > 0 for name, p in loaded.small.named_parameters())


@pytest.mark.parametrize("spec", ["pgp:keep=0.05", "sgp:keep=0.05", "pgp:keep=0.1,share=false"])
def test_a_guided_spec_label_names_no_unset_setting_and_reads_back(spec):
    label = vp.tokens.from_spec(spec).spec()
    assert "None" not in label
    assert vp.tokens.from_spec(label).spec() == label
