"""Each weight-pruning formula pinned against a hand computation or an independent reference loop:
the sequential engine over every block, TAMP's similarities, DAS allocation and AMIA selection,
ATV's ABS (text rows, scale) and DBS (max-min start)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vlmprune as vp
from vlmprune.errors import VlmpruneError
from vlmprune.models import get_adapter
from vlmprune.models.tiny import FAMILIES, build_tiny
from vlmprune.weights.atv import ATV
from vlmprune.weights.sequential import BlockContext, BlockInputs, capture_inputs, prune, select_linears, sweep
from vlmprune.weights.tamp import (TAMP, amia_select, diversity_allocation, modality_similarities,
                                   whole_row_sparsities)


def _calibration(family="llava", n=3):
    _, make = build_tiny(family, seed=0)
    return [make(text_lens=(12 + 3 * s,), seed=s) for s in range(n)]


@pytest.fixture(scope="module")
def calibration():
    return _calibration()


def _out(result):
    return result[0] if isinstance(result, (tuple, list)) else result


def _block_linears(block):
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


@torch.no_grad()
def _run_block(block, hidden, kwargs):
    """Per sample: the block's outputs and, per Linear, its (input, output) tokens."""
    seen, per_sample, outputs = {}, [], []
    handles = [m.register_forward_hook(lambda mod, args, res, name=name: seen.__setitem__(
        name, (args[0].reshape(-1, args[0].shape[-1]), res.reshape(-1, res.shape[-1]))))
        for name, m in _block_linears(block).items()]
    try:
        for h, kw in zip(hidden, kwargs):
            outputs.append(_out(block(h, **kw)))
            per_sample.append(dict(seen))
    finally:
        for handle in handles:
            handle.remove()
    return outputs, per_sample


def _wanda_prune_by_hand(linear, squared_sums, sparsity):
    """``|W| * sqrt(mean_n sum_t x^2)``; per row zero the floor(s * C_in) lowest (stable)."""
    r = torch.stack(squared_sums).mean(dim=0)
    score = linear.weight.float().abs() * r.sqrt()[None, :]
    count = math.floor(sparsity * linear.in_features)
    lowest = torch.sort(score, dim=1, stable=True).indices[:, :count]
    linear.weight.data.scatter_(1, lowest, 0.0)


# ---------------------------------------------------------------- sequential engine, every block


@torch.no_grad()
def _reference_wanda(model, calibration, pool, sparsity=0.5):
    """Prune block b with statistics of inputs produced by the already-pruned blocks 0..b-1."""
    adapter = get_adapter(model)
    inputs = capture_inputs(model, adapter, calibration, torch.device("cpu"))
    hidden = inputs.hidden
    for block in adapter.llm_layers:
        _, seen = _run_block(block, hidden, inputs.kwargs)
        for name, linear in _block_linears(block).items():
            sums = []
            for per_linear, visual in zip(seen, inputs.visual):
                keep = {"text": ~visual, "visual": visual, "mixed": torch.ones_like(visual)}[pool]
                sums.append(per_linear[name][0][keep].float().pow(2).sum(dim=0))
            _wanda_prune_by_hand(linear, sums, sparsity)
        hidden, _ = _run_block(block, hidden, inputs.kwargs)


@pytest.mark.parametrize("family, pool", [("llava", "text"), ("llava", "visual"), ("llava", "mixed")]
                         + [(f, "mixed") for f in FAMILIES if f != "llava"])
def test_sequential_engine_matches_reference_loop_on_every_linear(family, pool):
    """Every Linear of every block, each pool, every family: the engine's Wanda masks equal a loop
    that feeds each block the outputs of the blocks already pruned (not the dense ones)."""
    calibration = _calibration(family, n=2 if family == "llava" else 1)
    reference, _ = build_tiny(family, seed=0)
    _reference_wanda(reference, calibration, pool)
    model, _ = build_tiny(family, seed=0)
    prune(model, vp.weights.from_spec(f"wanda:sparsity=0.5,pool={pool}"), calibration=calibration)
    got, want = _block_linears(get_adapter(model).llm_layers), _block_linears(get_adapter(reference).llm_layers)
    assert len(got) == 7 * len(get_adapter(model).llm_layers)
    for name in want:
        assert torch.equal(got[name].weight == 0, want[name].weight == 0), name
        assert torch.equal(got[name].weight, want[name].weight), name


# ---------------------------------------------------------------- TAMP: similarities and DAS


def test_modality_similarities_by_hand():
    """s_vv, s_tt: mean of the positive pairwise similarities (i < j); s_vt: mean of all pairs."""
    c = math.cos(math.radians(60))
    raw = torch.tensor([[1.0, 0.0, 0.0], [c, math.sin(math.radians(60)), 0.0], [-1.0, 0.0, 0.0],  # visual
                        [0.0, 0.0, 1.0], [0.0, 0.6, 0.8]])                                            # text
    visual = torch.tensor([True, True, True, False, False])
    sims = modality_similarities(raw[None], visual)[0]
    # visual pairs: cos(v0, v1) = 0.5, cos(v0, v2) = -1, cos(v1, v2) = -0.5 -> positive: 0.5
    # text pair: 0.8; across: v0.t = 0, 0; v1.t = 0, 0.6 sin60; v2.t = 0, 0
    assert sims.tolist() == pytest.approx([0.5, 0.8, 0.6 * math.sin(math.radians(60)) / 6], abs=1e-6)


def _fake_blocks(shapes):
    return [{name: nn.Linear(cols, rows, bias=False) for name, (rows, cols) in shapes.items()}]


@pytest.mark.parametrize("sparsity, sims, expected", [
    # sizes 40, 40, 80 at s = 0.5, s_max = 0.6: floors keep 16, 16, 32 (64 of the 80 kept), 16 to share
    # by d = 0.5, 1.5, 2.0 -> 2, 6, 8: keep 18, 22, 40 -> zeros 11, 9 per row of 20, 5 per row of 10
    (0.5, {"a": (0.9, 0.8, 0.8), "b": (0.5, 0.5, 0.5), "c": (0.2, 0.4, 0.4)}, {"a": 0.55, "b": 0.45, "c": 0.5}),
    # s = 0.2, s_max = 0.3: floors keep 28, 28, 56 (112 of 128), 16 to share by d = 3, 0, 0.5 -> a would get
    # 13.7 > 12 free: a full (keeps 40), the 4 left go to c (d > 0): keep 60 of 80 -> 5 per row of 20
    (0.2, {"a": (0.0, 0.0, 0.0), "b": (1.0, 1.0, 1.0), "c": (0.9, 0.8, 0.8)}, {"a": 0.0, "b": 0.3, "c": 0.25}),
])
def test_das_allocation_by_hand(sparsity, sims, expected):
    """``d = (1 - s_vv) + (1 - s_tt) + (1 - s_vt)`` and kept weights shared in proportion to d, not
    d times the layer's size; a layer that fills up passes its excess on."""
    shapes = {"a": (2, 20), "b": (2, 20), "c": (8, 10)} if sparsity == 0.5 else {"a": (2, 20), "b": (2, 20), "c": (4, 20)}
    tamp = TAMP(sparsity=sparsity, das=1)
    tamp.similarity = {name: torch.tensor(value) for name, value in sims.items()}
    tamp.allocate(_fake_blocks(shapes))
    assert tamp.sparsities == pytest.approx(expected, abs=1e-9)
    zeros = sum(tamp.sparsities[n] * r * c for n, (r, c) in shapes.items())
    assert zeros == pytest.approx(sparsity * sum(r * c for r, c in shapes.values()))


def test_tamp_defaults_to_uniform_sparsity():
    """As ATV-Pruning ran it: AMIA only, every layer at the target; DAS is ``das=1``."""
    tamp = vp.weights.from_spec("tamp:sparsity=0.6")
    assert not tamp.needs_dense_sweep and tamp.layer_sparsity("any.q_proj") == 0.6
    assert vp.weights.from_spec("tamp:sparsity=0.6,das=1").needs_dense_sweep
    assert vp.weights.from_spec("tamp:pattern=2:4").describe()["das"] is False
    with pytest.raises(VlmpruneError, match="N:M pattern"):
        vp.weights.from_spec("tamp:das=1,pattern=2:4")


@pytest.mark.parametrize("target", [0.5, 0.6])
def test_tamp_das_on_a_model_follows_the_dense_similarities(target, calibration):
    """``tamp:das=1``: the layer sparsities are DAS of the similarities of the dense model's outputs
    (measured here by an own dense pass), rounded to whole rows; the total hits the target."""
    dense, _ = build_tiny("llava", seed=0)
    adapter = get_adapter(dense)
    inputs = capture_inputs(dense, adapter, calibration, torch.device("cpu"))
    hidden, similarity, shapes = inputs.hidden, {}, {}
    for block in adapter.llm_layers:
        outputs, seen = _run_block(block, hidden, inputs.kwargs)
        for name, linear in _block_linears(block).items():
            full = f"{_prefix(dense, block)}{name}"
            shapes[full] = tuple(linear.weight.shape)
            per_sample = [modality_similarities(F.normalize(s[name][1].float(), dim=-1)[None], v)[0]
                          for s, v in zip(seen, inputs.visual)]
            similarity[full] = torch.stack(per_sample).mean(dim=0)
        hidden = outputs
    importance = {n: float(3 - s.sum()) for n, s in similarity.items()}
    expected = whole_row_sparsities(diversity_allocation(importance, {n: r * c for n, (r, c) in shapes.items()},
                                                         target, target + 0.1), shapes)
    tamp = vp.weights.from_spec(f"tamp:sparsity={target},das=1")
    per_block = select_linears(dense, adapter, None, None)
    sweep(dense, calibration, tamp.observe_dense, linears=per_block, captured=inputs)   # the engine's dense sweep
    tamp.allocate(per_block)
    assert tamp.sparsities == pytest.approx(expected, abs=1e-9)
    zeros = sum(expected[n] * r * c for n, (r, c) in shapes.items())
    assert abs(zeros - target * sum(r * c for r, c in shapes.values())) <= 64 / 2     # half the largest row count
    assert max(expected.values()) <= target + 0.1 + 1e-9 and min(expected.values()) < target - 0.05


def _prefix(model, block):
    return next(name for name, module in model.named_modules() if module is block) + "."


# ---------------------------------------------------------------- TAMP: AMIA


def _amia_reference(out, score, density):
    """The published loop, written out: RBF on squared Euclidean distance of unit vectors, sigma 1."""
    out = F.normalize(out.double(), dim=-1)
    score = score.double().clone()
    distances = 1 - out @ out.T
    knn = torch.topk(distances, k=4, largest=False).indices[:, 1:]
    graph = score + (torch.exp(-torch.gather(distances, 1, knn)) * score[knn]).sum(dim=1)
    kernel = torch.exp(-torch.cdist(out, out).pow(2) / 2)
    chosen = []
    while True:
        pick = int(torch.argmax(graph))
        neighbours = knn[pick]
        graph[neighbours] -= torch.exp(-0.2 * distances[pick, neighbours]) * graph[pick].clamp(min=0)
        chosen.append(pick)
        graph[chosen] = float("-inf")
        s = torch.tensor(chosen)
        mmd2 = kernel.mean() + kernel[s][:, s].mean() - 2 * kernel[:, s].mean()
        if mmd2 < 0.1 * math.sqrt(1 - density) or len(chosen) == len(out):
            return sorted(chosen), float(mmd2)


def _amia_case():
    gen = torch.Generator().manual_seed(3)
    centres = F.normalize(torch.randn(3, 6, generator=gen), dim=-1)
    out = torch.cat([centres[i] + 0.6 * torch.randn(4, 6, generator=gen) for i in range(3)])
    score = torch.softmax(torch.randn(12, generator=gen), dim=0)
    return out, score


@pytest.mark.parametrize("density", [0.0, 0.5, 0.9])
def test_amia_matches_the_published_loop_at_intermediate_thresholds(density):
    out, score = _amia_case()
    want, _ = _amia_reference(out, score, density)
    got = amia_select(F.normalize(out, dim=-1)[None], score, torch.tensor([density]))[0]
    assert sorted(got.nonzero().flatten().tolist()) == want
    assert 1 < len(want) < len(out)                       # the threshold stops it part-way


def test_amia_first_pick_and_kernel_width_by_hand():
    """Tokens a (0 deg), b (90 deg), c (30 deg); attention favours a, which is picked first. With
    sigma 1 (``K = exp(-||x - y||^2 / 2) = exp(-D)``) MMD^2 of {a} against all is in closed form; a
    threshold just above it stops after a, just below it goes on."""
    unit = torch.stack([_unit(0), _unit(90), _unit(30)])[:, :2]
    score = torch.tensor([0.8, 0.15, 0.05])
    cos30 = math.cos(math.radians(30))
    k_xx = (3 + 2 * (math.exp(-1) + math.exp(-(1 - cos30)) + math.exp(-0.5))) / 9
    k_xy = (1 + math.exp(-1) + math.exp(-(1 - cos30))) / 3
    mmd_one = k_xx + 1 - 2 * k_xy                                   # 0.2492...
    stop = amia_select(unit[None], score, torch.tensor([1 - ((mmd_one + 0.002) / 0.1) ** 2]))[0]
    go = amia_select(unit[None], score, torch.tensor([1 - ((mmd_one - 0.002) / 0.1) ** 2]))[0]
    assert stop.tolist() == [True, False, False]
    assert go[0] and go.sum() >= 2


# ---------------------------------------------------------------- TAMP on a model: block 0 by hand


@torch.no_grad()
def test_tamp_block_zero_uses_last_token_attention_and_only_the_picked_tokens(calibration):
    """Block 0 of ``tamp``: attention row of the LAST token (eager attentions of the dense model),
    AMIA per Linear on its outputs, Wanda statistics over the picked tokens only."""
    reference, _ = build_tiny("llava", seed=0, attn_implementation="eager")
    adapter = get_adapter(reference)
    inputs = capture_inputs(reference, adapter, calibration, torch.device("cpu"))
    block = adapter.llm_layers[0]
    _, seen = _run_block(block, inputs.hidden, inputs.kwargs)
    scores = [reference(**sample, output_attentions=True).attentions[0].mean(dim=1)[0, -1].float()
              for sample in calibration]
    picked_fraction = []
    for name, linear in _block_linears(block).items():
        sums = []
        for score, per_linear, visual in zip(scores, seen, inputs.visual):
            x, y = per_linear[name]
            unit = F.normalize(y.float(), dim=-1)[None]
            density = modality_similarities(unit, visual).mean(dim=1)
            keep = amia_select(unit, score, density)[0]
            picked_fraction.append(float(keep.float().mean()))
            sums.append(x[keep].float().pow(2).sum(dim=0))
        _wanda_prune_by_hand(linear, sums, 0.5)
    assert 0 < min(picked_fraction) and max(picked_fraction) < 1     # AMIA keeps a strict subset
    model, _ = build_tiny("llava", seed=0)
    report = prune(model, vp.weights.from_spec("tamp:sparsity=0.5"), calibration=calibration, targets=[r"layers\.0\."])
    assert set(report.layer_sparsity.values()) == {0.5}                  # uniform: AMIA only
    got = _block_linears(get_adapter(model).llm_layers[0])
    for name, linear in _block_linears(block).items():
        assert torch.equal(got[name].weight, linear.weight), name


# ---------------------------------------------------------------- ATV ablations: ABS and DBS


@torch.no_grad()
def test_abs_saliency_reads_only_the_text_rows(calibration):
    """Block 0: ``sbar`` of ABS equals the hand mean, over visual tokens, of the attention they get
    from the text rows (eager attentions); the scaled form multiplies each sample by its N_vis."""
    model, _ = build_tiny("llava", seed=0, attn_implementation="eager")
    adapter = get_adapter(model)
    inputs = capture_inputs(model, adapter, calibration, torch.device("cpu"))
    literal, scaled, count = 0.0, 0.0, 0
    for sample, visual in zip(calibration, inputs.visual):
        attention = model(**sample, output_attentions=True).attentions[0].mean(dim=1)[0]
        s = attention[~visual][:, visual].mean(dim=0)
        literal += float(s.sum())
        scaled += float(s.sum()) * int(visual.sum())
        count += int(visual.sum())
    block = adapter.llm_layers[0]
    for saliency, expected in (("attention-literal", literal / count), ("attention", scaled / count)):
        ctx = BlockContext(0, block, _block_linears(block), inputs, adapter.llm.config, torch.device("cpu"))
        atv = ATV(saliency=saliency)
        atv.collect(ctx)
        assert atv.history[0]["saliency"] == pytest.approx(expected, rel=1e-5), saliency


def test_abs_selects_visual_tokens_where_the_literal_form_selects_none():
    """64 visual tokens, 12 to 18 text tokens: the literal mean attention (about 0.011 here) gives
    K = 0 in every block, so its masks are text-only Wanda's; the scaled ABS picks visual tokens
    (its saliency is the image's share of the text rows' attention) and so gives other masks."""
    wide = {"vision_config": {"image_size": 56}}
    _, make = build_tiny("llava", seed=0, **wide)
    calibration = [make(text_lens=(12 + 3 * s,), seed=s, image_size=(56, 56)) for s in range(2)]

    def run(spec):
        model, _ = build_tiny("llava", seed=0, **wide)
        method = vp.weights.from_spec(spec)
        prune(model, method, calibration=calibration)
        return method, _block_linears(get_adapter(model).llm_layers)

    literal, literal_w = run("atv:saliency=attention-literal")
    scaled, scaled_w = run("atv:saliency=attention")
    _, text_w = run("wanda:pool=text")
    assert all(h["visual_tokens"] == 0 for h in literal.history)
    assert all(torch.equal(literal_w[n].weight, text_w[n].weight) for n in text_w)
    assert min(h["visual_tokens"] for h in scaled.history) > 0
    assert all(0 < h["saliency"] <= 1 for h in scaled.history)
    assert any(not torch.equal(scaled_w[n].weight, text_w[n].weight) for n in text_w)


class _IdentityBlock(nn.Module):
    """Feeds its input to one Linear and returns it unchanged (DBS reads inputs only)."""

    def __init__(self, width):
        super().__init__()
        self.proj = nn.Linear(width, width, bias=False)

    def forward(self, hidden):
        self.proj(hidden)
        return hidden


def _unit(degrees):
    return torch.tensor([math.cos(math.radians(degrees)), math.sin(math.radians(degrees)), 0.0, 0.0])


def test_dbs_maxmin_starts_at_the_most_diverse_token():
    """Visual tokens at 44, 0, 90 and 50 degrees (not orthogonal). The most diverse on average is the
    one at 0 degrees (token 1); max-min from it adds the one at 90 -> {1, 2}. Starting at token 0
    (44 degrees) would add 90 too but keep 44 -> {0, 2}."""
    angles = [44, 0, 90, 50]
    visual_x = torch.stack([_unit(a) for a in angles])
    text_x = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 2.0], [0.0, 0.0, 1.0, 1.0]])
    x = torch.cat([text_x[:1], visual_x, text_x[1:]])
    visual = torch.tensor([False, True, True, True, True, False, False, False])
    cos = visual_x @ visual_x.T
    diversity = ((1 - cos).sum(dim=1)) / 3
    assert int(torch.argmax(diversity)) == 1
    sbar = float(diversity.mean())
    alpha = 1.4
    k = math.floor(min(1.0, alpha * sbar) * 4 + 0.5)
    assert k == 2
    block = _IdentityBlock(4)
    ctx = BlockContext(0, block, {"proj": block.proj}, BlockInputs([x[None]], [{}], [visual]), None, torch.device("cpu"))
    atv = ATV(alpha=alpha, saliency="diversity")
    norms, _ = atv.collect(ctx)
    assert atv.history[0]["saliency"] == pytest.approx(sbar, abs=1e-6)
    expected = text_x.pow(2).sum(dim=0) + visual_x[[1, 2]].pow(2).sum(dim=0)
    assert torch.allclose(norms["proj"], expected, atol=1e-6)
