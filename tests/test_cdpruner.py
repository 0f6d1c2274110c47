"""CDPruner: the greedy DPP against brute force, the conditional kernel and relevance by hand, and
runs through the engine on a tiny LLaVA (keep-all is dense, a padded batch is its samples)."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from test_ivtp import tiny_ivtp  # noqa: F401  (shared fixture: tiny LLaVA, a CLIP on its tower, tokenizers)
from vlmprune.errors import VlmpruneError
from vlmprune.models.tiny import sample
from vlmprune.tokens import apply, from_spec
from vlmprune.tokens.base import ModelPlan
from vlmprune.tokens.methods.cdpruner import CDPruner, conditional_kernel, greedy_dpp, min_max


def _logdet(kernel, subset):
    return torch.logdet(kernel[list(subset)][:, list(subset)].double()).item()


def _naive_greedy(kernel, k):
    """Each step adds the candidate that maximises log det of the picked set (no Cholesky updates)."""
    picked = []
    for _ in range(k):
        gains = {j: _logdet(kernel, picked + [j]) for j in range(kernel.shape[0]) if j not in picked}
        picked.append(max(gains, key=lambda j: (gains[j], -j)))
    return picked


def _best_subset(kernel, k):
    return max(itertools.combinations(range(kernel.shape[0]), k), key=lambda s: _logdet(kernel, s))


def test_greedy_dpp_is_the_log_det_greedy_and_the_brute_force_maximum():
    torch.manual_seed(0)
    kernels = []
    for _ in range(2):
        a = torch.randn(7, 7)
        kernels.append(a @ a.T + 0.1 * torch.eye(7))
    picks = greedy_dpp(torch.stack(kernels), 3)
    for b, kernel in enumerate(kernels):
        assert picks[b].tolist() == _naive_greedy(kernel, 3)
        assert sorted(picks[b].tolist()) == list(_best_subset(kernel, 3))   # greedy finds the optimum here


def test_greedy_dpp_follows_the_log_det_greedy_over_many_picks():
    torch.manual_seed(1)
    features = torch.randn(4, 12, 8)
    kernels = features @ features.transpose(1, 2) + 0.05 * torch.eye(12)
    picks = greedy_dpp(kernels, 7)
    assert [row.tolist() for row in picks] == [_naive_greedy(kernel, 7) for kernel in kernels]


def test_greedy_dpp_is_exact_where_greedy_is_optimal():
    # orthogonal features: L is diagonal, log det is the sum of the picked diagonal: top-k is optimal
    diagonal = torch.diag(torch.tensor([0.3, 2.0, 0.9, 1.5, 0.1, 1.1, 0.7]))
    assert sorted(greedy_dpp(diagonal[None], 3)[0].tolist()) == sorted(_best_subset(diagonal, 3)) == [1, 3, 5]
    # two copies of the most relevant token: the second adds nothing, so the pair is never kept
    features = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.6, 0.0, 0.8], [0.0, 0.6, 0.8]])
    kernel = conditional_kernel(features[None], torch.tensor([[1.0, 1.0, 0.8, 0.7, 0.5]]))[0]
    kernel = kernel + 1e-6 * torch.eye(5)
    picks = greedy_dpp(kernel[None], 3)[0].tolist()
    assert not {0, 1} <= set(picks)
    assert sorted(picks) == sorted(_best_subset(kernel, 3))


def test_conditional_kernel_and_min_max_by_hand():
    features = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]]])
    relevance = torch.tensor([[1.0, 0.5, 2.0]])
    c = 2 ** -0.5
    cosine = torch.tensor([[1.0, 0.0, c], [0.0, 1.0, c], [c, c, 1.0]])
    expected = torch.tensor([1.0, 0.5, 2.0])[:, None] * cosine * torch.tensor([1.0, 0.5, 2.0])[None]
    assert torch.allclose(conditional_kernel(features, relevance)[0], expected, atol=1e-6)
    scores = torch.tensor([[-1.0, 0.0, 3.0], [2.0, 2.5, 4.0]])
    expected = torch.tensor([[1e-6, 1 + 1e-6, 4 + 1e-6], [1e-6, 0.5 + 1e-6, 2 + 1e-6]]) / torch.tensor([[4.0], [2.0]])
    assert torch.allclose(min_max(scores), expected, atol=1e-7)     # per sample, not over the batch


def test_settings_and_sites():
    assert from_spec("cdpruner:keep=0.11").keep == 0.11
    plan = ModelPlan(family="llava", n_vision_layers=6, vision_feature_layer=4, n_llm_layers=8, has_cls=True)
    assert [(s.where, s.layer) for s in CDPruner().sites(plan)] == [("vision", 5), ("llm", 0)]
    assert [(s.where, s.layer) for s in CDPruner(text="llm").sites(plan)] == [("llm", 0)]
    with pytest.raises(VlmpruneError, match="text=llm"):
        CDPruner().sites(ModelPlan("qwen2_vl", 0, 0, 4, False))
    for bad in ("cdpruner:text=bert", "cdpruner:theta=1.5", "cdpruner:negate=maybe", "cdpruner:keep=0"):
        with pytest.raises(VlmpruneError):
            from_spec(bad)


# ---------------------------------------------------------------- through the engine

def _cdpruner(tiny_ivtp, **settings):
    _, _, clip, clip_tokenizer, tokenizer = tiny_ivtp
    return CDPruner(clip=clip, clip_tokenizer=clip_tokenizer, tokenizer=tokenizer, **settings)


def _run(model, inputs, method):
    """Logits, and per forward the relevance and the keep set chosen before the LLM."""
    seen = {}
    relevance, reduce = method._relevance, method.reduce
    method._relevance = lambda ctx, features: seen.setdefault("relevance", relevance(ctx, features))
    method.reduce = lambda ctx: seen.setdefault(ctx.site.where, reduce(ctx))
    with apply(model, method), torch.no_grad():
        logits = model(**inputs).logits
    return logits, seen


def test_relevance_is_minus_the_clip_cosine_of_feature_layer_patches_min_max(tiny_ivtp):
    model, make_inputs, clip, clip_tokenizer, tokenizer = tiny_ivtp
    inputs = make_inputs(text_lens=(5,))
    _, seen = _run(model, inputs, _cdpruner(tiny_ivtp))
    with torch.no_grad():
        tower = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True)
        patches = tower.hidden_states[model.config.vision_feature_layer][:, 1:]
        image = clip.visual_projection(clip.vision_model.post_layernorm(patches))
        ids = inputs["input_ids"][0]
        text = tokenizer.decode(ids[(ids == model.config.image_token_id).nonzero().max() + 1:].tolist())
        enc = clip_tokenizer([text], return_tensors="pt")
        pooled = clip.text_model(**{k: enc[k] for k in ("input_ids", "attention_mask")}).pooler_output
        cosine = F.cosine_similarity(image, clip.text_projection(pooled)[:, None], dim=-1)
    assert torch.allclose(seen["relevance"], min_max(-cosine), atol=1e-5)
    assert seen["vision"].keep.shape[1] == patches.shape[1]               # the vision site keeps every patch


def test_keep_all_is_dense_and_the_budget_is_kept(tiny_ivtp):
    model, make_inputs, *_ = tiny_ivtp
    inputs = make_inputs(text_lens=(5, 3))
    with torch.no_grad():
        dense = model(**inputs).logits
    logits, seen = _run(model, inputs, _cdpruner(tiny_ivtp, keep=16))
    assert torch.allclose(logits, dense, atol=1e-4)
    _, seen = _run(model, inputs, _cdpruner(tiny_ivtp, keep=5))
    assert seen["llm"].keep.shape == (2, 5) and (seen["llm"].keep.sort(1).values.diff(dim=1) > 0).all()


@pytest.mark.parametrize("settings", [dict(), dict(text="llm", theta=0.5)])
def test_a_padded_batch_chooses_and_answers_as_its_samples_alone(tiny_ivtp, settings):
    model, make_inputs, *_ = tiny_ivtp
    inputs = make_inputs(text_lens=(6, 2), seed=3)
    batch_logits, batch = _run(model, inputs, _cdpruner(tiny_ivtp, keep=4, **settings))
    for i in range(2):
        logits, alone = _run(model, sample(inputs, i), _cdpruner(tiny_ivtp, keep=4, **settings))
        assert torch.allclose(batch["relevance"][i], alone["relevance"][0], atol=1e-5)
        assert batch["llm"].keep[i].tolist() == alone["llm"].keep[0].tolist()
        assert torch.allclose(batch_logits[i, -1], logits[0, -1], atol=1e-4)


def test_counted_flops_include_the_kernel_and_text_encoder_as_extra(tiny_ivtp):
    from vlmprune.measure.flops import count_flops
    from vlmprune.models.presets import Preset, default_image_size

    model = tiny_ivtp[0]
    preset = Preset("tiny-llava", model.config, default_image_size(model.config))
    dense = count_flops(preset, 6).flops
    clip = count_flops(preset, 6, _cdpruner(tiny_ivtp, keep=4)).flops
    llm = count_flops(preset, 6, _cdpruner(tiny_ivtp, keep=4, text="llm")).flops
    assert clip.llm < dense.llm and clip.vision == dense.vision
    n, width = 16, model.config.text_config.hidden_size
    assert llm.extra >= 2 * n * n * width          # the similarity kernel at least
    assert clip.extra > llm.extra                  # plus the CLIP text encoder and patch projections
