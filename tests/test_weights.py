"""Weight pruning: masks, scores, SparseGPT's reconstruction, ATV's budget, the engine on tiny models."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import vlmprune as vp
from vlmprune.errors import VlmpruneError
from vlmprune.models.tiny import build_tiny
from vlmprune.weights.atv import ATV, budget
from vlmprune.weights.attention import AttentionRecorder
from vlmprune.weights.base import wanda_scores
from vlmprune.weights.masks import row_mask, score_mask
from vlmprune.weights.sequential import BlockContext, BlockInputs, capture_inputs, prune
from vlmprune.weights.sparsegpt import sparsegpt_weight
from vlmprune.weights.statistics import InputNorms
from vlmprune.models import get_adapter


@pytest.fixture(scope="module")
def calibration():
    _, make = build_tiny("llava", seed=0)
    return [make(text_lens=(12 + 3 * s,), seed=s) for s in range(3)]


def pruned(spec: str, calibration, **kwargs):
    model, _ = build_tiny("llava", seed=0)
    report = prune(model, vp.weights.from_spec(spec), calibration=calibration, **kwargs)
    return model, report


def llm_linears(model):
    layers = get_adapter(model).llm_layers
    return {name: m for name, m in layers.named_modules() if isinstance(m, nn.Linear)}


@pytest.mark.parametrize("spec", ["magnitude:sparsity=0.3", "wanda:sparsity=0.5", "atv:sparsity=0.6",
                                  "wanda:sparsity=0.5,pool=text"])
def test_exact_sparsity_per_row(spec, calibration):
    model, report = pruned(spec, calibration)
    sparsity = vp.weights.from_spec(spec).sparsity
    linears = llm_linears(model)
    assert len(linears) == len(report.layer_sparsity) == 4 * 7
    for linear in linears.values():
        zeros_per_row = (linear.weight == 0).sum(dim=1)
        assert torch.all(zeros_per_row == math.floor(sparsity * linear.in_features))


@pytest.mark.parametrize("spec", ["wanda:pattern=2:4", "sparsegpt:pattern=4:8", "atv:pattern=2:4", "magnitude:pattern=1:4"])
def test_every_n_m_group_valid(spec, calibration):
    model, _ = pruned(spec, calibration)
    n, m = vp.weights.from_spec(spec).pattern
    for linear in llm_linears(model).values():
        groups = linear.weight.reshape(linear.out_features, -1, m)
        assert torch.all((groups != 0).sum(dim=2) <= n)
        assert (groups != 0).sum() == n * groups.shape[0] * groups.shape[1]   # random weights: no extra zeros


def test_wanda_score_hand_checked():
    weight = torch.tensor([[1.0, -2.0, 3.0, -4.0], [1.0, -3.0, 4.0, 3.5]])
    norms = InputNorms(4, "cpu")
    norms.add(torch.tensor([[1.0, 0.0, 2.0, 1.0], [1.0, 1.0, 0.0, 1.0]]))   # sum x^2 = [2, 1, 4, 2]
    norms.add(torch.tensor([[0.0, 2.0, 0.0, 1.0]]))                         # sum x^2 = [0, 4, 0, 1]
    assert torch.allclose(norms.value, torch.tensor([1.0, 2.5, 2.0, 1.5]))
    scores = wanda_scores(weight, norms.value)
    root = torch.tensor([1.0, 2.5, 2.0, 1.5]).sqrt()
    assert torch.allclose(scores, weight.abs() * root)
    mask = row_mask(scores, 0.5)
    assert mask.tolist() == [[True, True, False, False], [True, False, False, True]]
    # magnitude alone would drop column 1 of row 2 instead of column 3
    assert row_mask(weight.abs(), 0.5)[1].tolist() == [True, True, False, False]
    assert score_mask(scores, 0.5, (1, 2)).tolist() == [[True, False, True, False], [True, False, False, True]]


def test_sparsegpt_reconstructs_better_than_wanda():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 64, generator=gen)
    mixing = torch.randn(64, 64, generator=gen) * 0.3 + torch.eye(64)
    x = torch.randn(512, 64, generator=gen) @ mixing                  # correlated input features
    hessian = 2 * x.T @ x / x.shape[0]
    norms = InputNorms(64, "cpu")
    norms.add(x)
    for sparsity, pattern in ((0.5, None), (0.5, (2, 4))):
        wanda = weight.masked_fill(score_mask(wanda_scores(weight, norms.value), sparsity, pattern), 0)
        sgpt = sparsegpt_weight(weight, hessian, sparsity, pattern, blocksize=32)
        assert (sgpt == 0).float().mean() == pytest.approx(0.5, abs=1e-6)
        error = lambda w: ((x @ (weight - w).T) ** 2).sum().item()
        assert error(sgpt) < 0.8 * error(wanda)


class _ScriptedBlock(nn.Module):
    """A block whose output is given per sample (so drift is known), with one Linear on its input."""

    def __init__(self, width: int):
        super().__init__()
        self.proj = nn.Linear(width, width, bias=False)

    def forward(self, hidden, out):
        self.proj(hidden)
        return out


def _drifted(unit: torch.Tensor, drift_value: float, spare: int) -> torch.Tensor:
    """A vector at cosine ``1 - drift_value`` from ``unit`` (orthogonal direction ``spare``)."""
    c = 1 - drift_value
    side = torch.zeros_like(unit)
    side[spare] = 1
    return c * unit + math.sqrt(1 - c * c) * side


def _scripted_context(width=8):
    e = torch.eye(width)
    # sample A: 2 text tokens, visual tokens e0, e1, e2 drifting 0.2, 0.6, 0.1
    # sample B: 4 text tokens, visual tokens e3, e4 drifting 0.3, 0.0
    samples = [([2 * e[6], e[0], e[1], e[2], 2 * e[7]], [None, 0.2, 0.6, 0.1, None]),
               ([e[6], e[3], e[4], e[6], e[7], e[7]], [None, 0.3, 0.0, None, None, None])]
    hidden, kwargs, visual = [], [], []
    for tokens, drifts in samples:
        x = torch.stack(tokens)
        y = torch.stack([t if d is None else _drifted(t, d, 5) for t, d in zip(tokens, drifts)])
        hidden.append(x[None])
        kwargs.append({"out": y[None]})
        visual.append(torch.tensor([d is not None for d in drifts]))
    block = _ScriptedBlock(width)
    return BlockContext(0, block, {"proj": block.proj}, BlockInputs(hidden, kwargs, visual), None, torch.device("cpu"))


@pytest.mark.parametrize("alpha, chosen", [
    (1.0, {3}),            # sbar = 0.24: K_A = round(0.48) = 0, K_B = round(0.96) = 1 -> e3 (drift 0.3)
    (2.5, {1, 3, 4}),      # 0.6: K_A = round(1.2) = 1 -> e1 (0.6); K_B = round(2.4) = 2 -> all of B
    (10.0, {0, 1, 3, 4}),  # min(1, 2.4) = 1: K_A = 2 -> e1, e0; K_B = 4 clipped to 2
    (0.0, set()),
])
def test_atv_budget_on_scripted_block(alpha, chosen):
    ctx = _scripted_context()
    atv = ATV(alpha=alpha)
    norms, _ = atv.collect(ctx)
    r = norms["proj"]
    assert atv.history[0]["saliency"] == pytest.approx(0.24, abs=1e-6)
    expected = torch.zeros(8)
    expected[list(chosen)] = 0.5                      # each selected unit token, mean over 2 samples
    expected[6] = (4 + 1 + 1) / 2                     # text tokens always count
    expected[7] = (4 + 1 + 1) / 2
    assert torch.allclose(r, expected, atol=1e-6)


def test_budget_formula():
    assert budget(0.24, 1.0, 4, 2) == 1
    assert budget(0.25, 1.0, 2, 9) == 1                 # round half up
    assert budget(0.9, 2.0, 30, 5) == 5                 # clipped to the visual tokens
    assert budget(0.0, 1.0, 30, 5) == 0


def test_atv_ablations_select_differently():
    """DBS is pinned on non-orthogonal inputs in test_weight_formulas.py."""
    ctx = _scripted_context()
    kept = {}
    for name, method in {"drift": ATV(alpha=2.5), "fixed": ATV(budget=1), "random": ATV(alpha=2.5, select="random")}.items():
        norms, _ = method.collect(ctx)
        kept[name] = set((norms["proj"][:5] > 0).nonzero().flatten().tolist())
    assert kept["drift"] == {1, 3, 4}
    assert kept["fixed"] == {1, 3}                      # top-1 by drift in each sample
    assert len(kept["random"] & {0, 1, 2}) == 1 and {3, 4} <= kept["random"]


def test_attention_recorder_matches_eager_attention(calibration):
    model, _ = build_tiny("llava", seed=0, attn_implementation="eager")
    adapter = get_adapter(model)
    with torch.no_grad():
        eager = model(**calibration[0], output_attentions=True).attentions[1].mean(dim=1)[0]
    inputs = capture_inputs(model, adapter, calibration[:1], torch.device("cpu"))
    adapter.llm.config._attn_implementation = "sdpa"
    try:
        with torch.no_grad(), AttentionRecorder(adapter.llm.config) as recorder:
            recorder.rows = torch.tensor([3, inputs.hidden[0].shape[1] - 1])
            hidden = adapter.llm_layers[0](inputs.hidden[0], **inputs.kwargs[0])
            adapter.llm_layers[1](hidden[0] if isinstance(hidden, tuple) else hidden, **inputs.kwargs[0])
    finally:
        adapter.llm.config._attn_implementation = "eager"
    assert torch.allclose(recorder.probs, eager[[3, -1]], atol=1e-5)


def test_targets_and_ignore(calibration):
    model, report = pruned("wanda", calibration, targets=[r"mlp\."], ignore=[r"layers\.0\."])
    assert set(report.layer_sparsity) and all("mlp." in n and "layers.0." not in n for n in report.layer_sparsity)
    assert len(report.layer_sparsity) == 3 * 3
    untouched = get_adapter(model).llm_layers[0].self_attn.q_proj.weight
    assert int((untouched == 0).sum()) == 0
    assert report.total_seconds > 0 and len(report.block_seconds) == 4


def test_whole_row_sparsities_carry_the_rounding():
    from vlmprune.weights.tamp import whole_row_sparsities

    shapes = {"a": (2, 10), "b": (2, 10), "c": (4, 10)}
    # wanted zeros 2*10*0.33 = 6.6 -> 3 per row (6), then 6.6 + 6.6 - 6 = 7.2 -> 4 per row (8),
    # then 13.2 + 20 - 14 = 19.2 -> 5 per row (20): 34 zeros for 33.2 wanted
    rounded = whole_row_sparsities({"a": 0.33, "b": 0.33, "c": 0.5}, shapes)
    assert rounded == {"a": 0.3, "b": 0.4, "c": 0.5}
    assert row_mask(torch.rand(2, 10), rounded["b"]).sum() == 8


@pytest.mark.parametrize("make_call, text", [
    (lambda m, c: vp.weights.from_spec("wanda:sparsity=1.0"), "sparsity must be in [0, 1)"),
    (lambda m, c: vp.weights.from_spec("wanda:sparsity=-0.1"), "sparsity must be in [0, 1)"),
    (lambda m, c: prune(m, vp.weights.from_spec("wanda:pattern=3:5"), calibration=c), "does not divide"),
    (lambda m, c: prune(m, vp.weights.from_spec("wanda"), calibration=[]), "calibration"),
    (lambda m, c: vp.weights.from_spec("obs:sparsity=0.5"), "unknown weight method"),
    (lambda m, c: vp.weights.from_spec("wanda:pool=images"), "unknown calibration pool"),
    (lambda m, c: vp.weights.from_spec("wanda:pattern=4:2"), "0 < N < M"),
])
def test_bad_input_is_one_line_error(make_call, text, calibration):
    model, _ = build_tiny("llava", seed=0)
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(VlmpruneError) as info:
        make_call(model, calibration)
    assert text in str(info.value) and "\n" not in str(info.value)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl"])
def test_engine_runs_on_every_family(family):
    """2:4 ATV (ABS) on each family: every Linear of the LLM's decoder layers (q, k, v, o, gate, up,
    down) is exactly 2:4 along its input, nothing else changes, ABS finds the family's visual tokens
    and selects some in every block, and the model answers differently but finitely. (Masks against
    an independent loop on every family: test_weight_formulas.py.)"""
    model, make = build_tiny(family, seed=0)
    sample = make(text_lens=(8,), seed=1)
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    with torch.no_grad():
        dense = model(**sample).logits
    method = vp.weights.from_spec("atv:saliency=attention,pattern=2:4")
    report = prune(model, method, calibration=[sample])
    assert report.sparsity == pytest.approx(0.5)
    assert all(0 < h["saliency"] <= 1 and h["visual_tokens"] > 0 for h in method.history)
    adapter = get_adapter(model)
    projections = {id(module.weight) for module in adapter.llm_layers.modules() if isinstance(module, nn.Linear)}
    for name, param in model.named_parameters():
        if id(param) in projections:
            zeros = (param == 0).view(param.shape[0], -1, 4).sum(-1)
            assert (zeros == 2).all(), name                         # exactly 2 of every 4 inputs pruned
            kept = param != 0
            assert torch.equal(param[kept], before[name][kept])     # ATV only masks: kept weights unchanged
        else:
            assert torch.equal(param, before[name]), name
    assert len(projections) == 7 * len(adapter.llm_layers)
    with torch.no_grad():
        logits = model(**sample).logits
    assert torch.isfinite(logits).all() and (logits - dense).abs().max() > 1e-3


def test_one_capture_serves_several_prunes(calibration):
    dense, _ = build_tiny("llava", seed=0)
    captured = vp.weights.capture(dense, calibration)
    hidden = [h.clone() for h in captured.hidden]
    for spec in ("wanda:sparsity=0.5", "tamp:sparsity=0.5"):
        reference, _ = pruned(spec, calibration)
        model, _ = build_tiny("llava", seed=0)
        prune(model, vp.weights.from_spec(spec), captured=captured)
        for (name, got), want in zip(llm_linears(model).items(), llm_linears(reference).values()):
            assert torch.equal(got.weight, want.weight), (spec, name)
    assert all(torch.equal(a, b) for a, b in zip(captured.hidden, hidden))      # not consumed
