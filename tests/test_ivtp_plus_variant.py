"""IVTP+ as one selection: ``at`` (feature / input), ``fill=diverse`` and ``merge=mean``."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from test_ivtp import tiny_ivtp  # noqa: F401  (shared fixture)
from test_ivtp_plus import _decisions, _method
from vlmprune.errors import VlmpruneError
from vlmprune.tokens import from_spec, scorers
from vlmprune.tokens.base import ModelPlan, Site
from vlmprune.tokens.methods.ivtp_plus import IVTPPlus, merge_into_kept


# ---------------------------------------------------------------- hand-made cases

def _unit(*angles_deg):
    angles = torch.tensor(angles_deg, dtype=torch.float) * torch.pi / 180
    return torch.stack([angles.cos(), angles.sin()], -1)[None]          # (1, V, 2)


def test_farthest_from_never_picks_a_kept_token_even_among_duplicates():
    # three copies of token 0 (distance 0 to it, and to each other), one far token
    distance = torch.tensor([[[0, 0, 0, 1.0], [0, 0, 0, 1.0], [0, 0, 0, 1.0], [1.0, 1.0, 1.0, 0]]])
    assert scorers.farthest_from(distance, torch.tensor([[0]]), 3).tolist() == [[3, 1, 2]]
    assert scorers.farthest_from(distance, torch.tensor([[0]]), 0).shape == (1, 0)


def test_fill_diverse_is_max_min_cosine_from_the_relevant_tokens():
    """Directions 0, 10, 20, 90, 180 degrees; the most relevant is 10 degrees. Max-min cosine from it picks
    180 (farthest), then 90; the grid fill would ignore the features entirely."""
    features = _unit(0, 10, 20, 90, 180)
    ctx = SimpleNamespace(hidden=features, visual=torch.arange(5)[None], original=torch.arange(5)[None],
                          n_visual=5, site=Site("llm", 0))
    method = IVTPPlus(keep=3, at="input", fill="diverse", relevant=0.34)     # one relevant token of three
    method._sites = [Site("vision", 3), Site("llm", 0)]
    score = torch.tensor([[0.1, 0.5, 0.2, 0.1, 0.1]])
    assert method.select(ctx, score, 3).tolist() == [[1, 4, 3]]
    # relevant=1: IVTP's top only
    method.relevant = 1.0
    assert method.select(ctx, score, 3).tolist() == [[1, 2, 0]]


def test_merge_into_kept_averages_each_dropped_token_into_its_most_similar_kept_one():
    tokens = torch.tensor([[[2.0, 0.0], [1.0, 0.2], [0.0, 4.0], [0.1, 1.0], [3.0, 0.1]]])
    keep = torch.tensor([[2, 0]])                  # any order: the result follows keep's order
    merged = merge_into_kept(tokens, keep)
    expected = torch.stack([tokens[0, [2, 3]].mean(0), tokens[0, [0, 1, 4]].mean(0)])
    assert torch.allclose(merged[0], expected)
    # keeping everything changes nothing (every token is its own nearest)
    assert torch.allclose(merge_into_kept(tokens, torch.arange(5)[None]), tokens)


def test_settings_and_spec():
    method = from_spec("ivtp_plus:keep=11,at=feature,fill=diverse,merge=mean")
    assert (method.at, method.fill, method.merge) == ("feature", "diverse", "mean")
    assert method.spec().endswith(",at=feature,fill=diverse,merge=mean")
    default = from_spec("ivtp_plus:keep=11").spec()   # the study journal keys runs by this string
    assert default.endswith("relevant=0.5,spread_at=all") and "at=" not in default.replace("spread_at", "")
    assert from_spec(from_spec("ivtp_plus:keep=11,at=input").spec()).at == "input"
    for bad in ("ivtp_plus:at=vit", "ivtp_plus:fill=random", "ivtp_plus:merge=sum", "ivtp_plus:merge=mean",
                "ivtp_plus:at=input,merge=max"):
        with pytest.raises(VlmpruneError) as error:
            from_spec(bad)
        assert "\n" not in str(error.value)
    no_cls = ModelPlan(family="qwen2_vl", n_vision_layers=0, vision_feature_layer=0, n_llm_layers=4, has_cls=False)
    with pytest.raises(VlmpruneError, match="lacks"):
        IVTPPlus(at="feature").sites(no_cls)


# ---------------------------------------------------------------- through the engine

def test_at_feature_and_at_input_select_once_with_the_same_relevant_tokens(tiny_ivtp):
    model, make_inputs, *_ = tiny_ivtp
    inputs = make_inputs(text_lens=(5, 3), seed=2)
    _, feature = _decisions(model, inputs, _method(tiny_ivtp, keep=4, at="feature", fill="diverse"))
    _, at_input = _decisions(model, inputs, _method(tiny_ivtp, keep=4, at="input", fill="diverse"))
    assert [(w, l, k.shape[1]) for w, l, k, _ in feature] == [("vision", 3, 4)]
    assert [(w, l, k.shape[1]) for w, l, k, _ in at_input] == [("vision", 3, 16), ("llm", 0, 4)]
    # relevant=0.5 of 4: the first two picks are the top [CLS] significance, the same at both sites
    assert torch.equal(feature[0][3][:, :2], at_input[1][3][:, :2])


def test_at_input_keeping_everything_is_dense_and_merge_changes_the_kept_states(tiny_ivtp):
    model, make_inputs, *_ = tiny_ivtp
    inputs = make_inputs(text_lens=(5, 3))
    with torch.no_grad():
        dense = model(**inputs).logits
    everything, _ = _decisions(model, inputs, _method(tiny_ivtp, keep=16, at="input", fill="diverse"))
    assert torch.allclose(everything[:, -1], dense[:, -1], atol=1e-4)
    merged_all, _ = _decisions(model, inputs, _method(tiny_ivtp, keep=16, at="feature", merge="mean"))
    assert torch.allclose(merged_all[:, -1], dense[:, -1], atol=1e-4)
    plain, kept = _decisions(model, inputs, _method(tiny_ivtp, keep=4, at="feature", fill="diverse"))
    merged, kept_merged = _decisions(model, inputs, _method(tiny_ivtp, keep=4, at="feature", fill="diverse",
                                                            merge="mean"))
    assert torch.equal(kept[0][2], kept_merged[0][2])                   # the same tokens, new states
    assert not torch.allclose(plain[:, -1], merged[:, -1], atol=1e-4)


def test_fill_diverse_spreads_over_the_features_more_than_the_grid_does(tiny_ivtp):
    """The tokens filled by ``diverse`` are farther (min cosine distance, summed) from the rest of the kept
    set than the grid's fill, on the features the selection sees."""
    model, make_inputs, *_ = tiny_ivtp
    inputs = make_inputs(text_lens=(5, 3), seed=2)
    seen = {}

    def spread(fill):
        method = _method(tiny_ivtp, keep=6, at="feature", fill=fill)
        select = method.select

        def recording(ctx, score, count):
            keep = select(ctx, score, count)
            seen[fill] = F.normalize(scorers.gather_tokens(ctx.hidden, ctx.visual.gather(1, keep)).float(), dim=-1)
            return keep

        method.select = recording
        _decisions(model, inputs, method)
        kept = seen[fill]
        distance = (1 - kept @ kept.transpose(1, 2)) + torch.eye(kept.shape[1]) * 9
        return distance.amin(-1)[:, 3:].sum().item()

    assert spread("diverse") > spread("grid")
