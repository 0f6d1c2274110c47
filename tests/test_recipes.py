"""Recipes: errors that point at file:line:key, the shipped examples, and stages applied in order."""
from __future__ import annotations

import copy

import pytest
import torch

import vlmprune as vp
from vlmprune.cli import main
from vlmprune.errors import VlmpruneError
from vlmprune.models import get_adapter
from vlmprune.models.tiny import build_tiny, make_inputs, sample
from vlmprune.recipes import SHIPPED, parse_recipe, read_recipe
from vlmprune.weights.sequential import select_linears

GOOD = """\
description: wanda then fastv
stages:
  - weights:
      method: wanda
      sparsity: 0.5
      ignore: ['layers\\.0\\.mlp\\.down_proj']
      nsamples: 2
  - tokens:
      method: fastv
      layer: 1
      keep: 0.5
"""


def write(tmp_path, text: str, name: str = "recipe.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_good_recipe_becomes_specs_and_options(tmp_path):
    recipe = read_recipe(write(tmp_path, GOOD))
    weights, tokens = recipe.stages
    assert (weights.kind, weights.spec, weights.ignore, weights.targets, weights.nsamples) == \
        ("weights", "wanda:sparsity=0.5", ["layers\\.0\\.mlp\\.down_proj"], None, 2)
    assert (tokens.kind, tokens.spec) == ("tokens", "fastv:layer=1,keep=0.5")
    assert recipe.description == "wanda then fastv"


@pytest.mark.parametrize("old, new, where, says", [
    ("      sparsity: 0.5", "      sparsty: 0.5", "5: stages[0].weights.sparsty", "has no setting 'sparsty'"),
    ("      layer: 1", "      layers: 1", "10: stages[1].tokens.layers", "has no setting 'layers'"),
    ("description:", "descripton:", "1: descripton", "unknown key"),
    ("  - tokens:", "  - token:", "8: stages[1].token", "unknown key"),
    ("      nsamples: 2", "      nsamples: 0", "7: stages[0].weights.nsamples", "integer >= 1"),
    ("['layers", "['(layers", "6: stages[0].weights.ignore", "bad regex"),
    ("      sparsity: 0.5", "      sparsity: [0.5", "6", "not valid YAML"),
])
def test_bad_key_names_file_line_and_key(tmp_path, old, new, where, says):
    path = write(tmp_path, GOOD.replace(old, new))
    with pytest.raises(VlmpruneError) as error:
        read_recipe(path)
    assert str(error.value).startswith(f"{path}:{where}")
    assert says in str(error.value)


@pytest.mark.parametrize("old, new, where, says", [
    ("method: wanda", "method: wandaa", "4: stages[0].weights.method", "unknown weight method 'wandaa'"),
    ("method: fastv", "method: fast", "9: stages[1].tokens.method", "unknown token method 'fast'"),
    ("method: wanda", "method: 'wanda:sparsity=0.6'", "5: stages[0].weights.sparsity", "also set in the method SPEC"),
    ("method: wanda", "method: 'wanda:sparsty=0.6'", "4: stages[0].weights.method", "has no setting 'sparsty'"),
])
def test_unknown_method_or_conflict_is_refused(tmp_path, old, new, where, says):
    path = write(tmp_path, GOOD.replace(old, new))
    with pytest.raises(VlmpruneError) as error:
        read_recipe(path)
    assert str(error.value).startswith(f"{path}:{where}") and says in str(error.value)


def test_stage_order_and_count_are_checked():
    weights = "  - weights: {method: magnitude}\n"
    tokens = "  - tokens: {method: fastv}\n"
    with pytest.raises(VlmpruneError, match=r"^x.yaml:2: stages\[0\].tokens: the tokens stage must come after"):
        parse_recipe("stages:\n" + tokens + weights, "x.yaml")
    with pytest.raises(VlmpruneError, match=r"^x.yaml:3: stages\[1\].weights: a second weights stage"):
        parse_recipe("stages:\n" + weights + weights, "x.yaml")


def test_a_bad_setting_value_names_its_stage(tmp_path):
    recipe = read_recipe(write(tmp_path, GOOD.replace("sparsity: 0.5", "sparsity: 1.5")))
    with pytest.raises(VlmpruneError, match=r"recipe.yaml:3: stages\[0\].weights: sparsity must be in"):
        recipe.stage("weights").build()


def test_cli_refuses_a_bad_recipe_before_loading_anything(tmp_path, capsys):
    path = write(tmp_path, GOOD.replace("method: wanda", "method: wandaa"))
    assert main(["prune", "--model", "toy-small", "--recipe", str(path), "--out", str(tmp_path / "out")]) == 2
    assert f"{path}:4: stages[0].weights.method: unknown weight method" in capsys.readouterr().err
    assert main(["prune", "--model", "toy-small", "--recipe", str(path), "--method", "wanda",
                 "--out", str(tmp_path / "out")]) == 2
    assert "drop --method" in capsys.readouterr().err
    assert main(["eval", "--model", "toy-small", "--recipe", str(path)]) == 2
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, family", [("toy-large-atv50-ivtp16", "llava"), ("toy-large-sparsegpt24-fastv", "llava"),
                                          ("llava-1.5-7b-atv50-ivtp64", "llava"),
                                          ("qwen2-vl-7b-wanda24-fastv", "qwen2_vl")])
def test_shipped_recipes_read_and_their_regexes_select_layers(name, family):
    assert sorted(p.stem for p in SHIPPED.glob("*.yaml")) == sorted(
        ["toy-large-atv50-ivtp16", "toy-large-sparsegpt24-fastv", "llava-1.5-7b-atv50-ivtp64",
         "qwen2-vl-7b-wanda24-fastv"])
    recipe = read_recipe(name)
    stage = recipe.stage("weights")
    stage.build()
    recipe.stage("tokens").build()
    model, _ = build_tiny(family, seed=0)
    adapter = get_adapter(model)
    selected = [n for block in select_linears(model, adapter, stage.targets, stage.ignore) for n in block]
    every = [n for block in select_linears(model, adapter, None, None) for n in block]
    ignored = [n for n in every if n not in selected]
    assert selected and set(selected) <= set(every)
    if stage.targets and "mlp" in stage.targets[0] and "self_attn" not in stage.targets[0]:
        assert all(".mlp." in n for n in selected) and all(".self_attn." in n for n in ignored)
    if stage.ignore:
        assert ignored == ["model.language_model.layers.0.mlp.down_proj"]


def test_stages_apply_in_order_weights_calibrated_without_the_token_method():
    """The weights stage runs first, on the dense token sequence (the engine refuses to calibrate through
    an attached token method): pruning a copy by hand, then attaching the token method, gives the same
    weights and logits."""
    model, _ = build_tiny("llava", seed=0)
    inputs = make_inputs(model, "llava", text_lens=(6, 6, 6), seed=1)
    calibration = [sample(inputs, i) for i in range(3)]
    probe = sample(inputs, 0)
    recipe = parse_recipe("stages:\n  - weights: {method: wanda, sparsity: 0.5, nsamples: 2}\n"
                          "  - tokens: {method: fastv, layer: 1, keep: 0.25}\n")
    by_recipe, by_hand = model, copy.deepcopy(model)

    applied = vp.apply_recipe(by_recipe, recipe, calibration=calibration)
    vp.weights.prune(by_hand, vp.weights.from_spec("wanda:sparsity=0.5"), calibration=calibration[:2])
    with torch.no_grad(), vp.tokens.apply(by_hand, vp.tokens.from_spec("fastv:layer=1,keep=0.25")):
        expected = by_hand(**probe).logits
        got = by_recipe(**probe).logits
    assert applied.nsamples == 2 and applied.report.sparsity == pytest.approx(0.5, abs=0.01)
    assert torch.equal(got, expected)
    for (name, a), b in zip(by_recipe.named_parameters(), by_hand.parameters()):
        assert torch.equal(a, b), name
    assert got.shape[1] < probe["input_ids"].shape[1]          # the token stage is attached
    applied.handle.remove()
    with torch.no_grad():
        assert by_recipe(**probe).logits.shape[1] == probe["input_ids"].shape[1]


def test_calibration_shortfall_and_absence_are_errors():
    model, _ = build_tiny("llava", seed=0)
    recipe = parse_recipe("stages:\n  - weights: {method: wanda, nsamples: 4}\n", "r.yaml")
    with pytest.raises(VlmpruneError, match=r"^r.yaml:2: stages\[0\].weights: wanda needs calibration"):
        vp.apply_recipe(model, recipe)
    inputs = make_inputs(model, "llava", text_lens=(6,), seed=1)
    with pytest.raises(VlmpruneError, match="nsamples is 4 but only 1 calibration"):
        vp.apply_recipe(model, recipe, calibration=[inputs])
