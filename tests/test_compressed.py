"""A compressed model saved whole (weights pruned, token method recorded) and reloaded by ``vp.load``."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import LlavaForConditionalGeneration

import vlmprune as vp
from vlmprune import toyworld
from vlmprune.cli import main
from vlmprune.compressed import token_spec
from vlmprune.eval.loading import load_model
from vlmprune.weights.saving import CONFIG_KEY

# micro has 2 LLM layers, and no CLIP text encoder in the cache: IVTP scores with the LLM only
RECIPE = """\
description: ATV 50% then IVTP keep 16
stages:
  - weights:
      method: atv
      sparsity: 0.5
      nsamples: 2
  - tokens:
      method: ivtp
      keep: 16
      llm_layers: 1
      instruction: ott+rt
"""


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """A float32 toy LLaVA (2 LLM layers) with its processor, saved as a directory."""
    from vlmprune.toyworld import configs
    from vlmprune.toyworld.processor import build_processor
    from vlmprune.toyworld.tokenizers import build_llm_tokenizer, corpus

    tokenizer = build_llm_tokenizer(corpus(n_scenes=60))
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(configs.llava_config("micro", tokenizer)).eval()
    source = tmp_path_factory.mktemp("micro") / "dense"
    model.save_pretrained(source)
    build_processor(tokenizer).save_pretrained(source)
    recipe = source.parent / "recipe.yaml"
    recipe.write_text(RECIPE)
    return source, recipe


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_prune_recipe_saves_a_directory_that_loads_back_whole(micro, tmp_path):
    source, recipe = micro
    out = tmp_path / "compressed"
    assert main(["prune", "--model", str(source), "--recipe", str(recipe), "--out", str(out)]) == 0

    # the same recipe in memory, with the calibration the command draws (seed 0, the recipe's 2 samples)
    model, processor = load_model(str(source))
    probe = toyworld.calibration(processor, n=1, seed=7)[0]
    applied = vp.apply_recipe(model, recipe, calibration=toyworld.calibration(processor, n=2, seed=0))
    expected = logits(model, probe)

    loaded, _ = vp.load(str(out))
    got = logits(loaded, probe)
    assert got.shape == expected.shape and got.shape[1] < probe["input_ids"].shape[1]
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    for (name, a), b in zip(model.named_parameters(), loaded.parameters()):
        assert torch.equal(a, b), name

    record = json.loads((out / "config.json").read_text())[CONFIG_KEY]
    assert (record["method"], record["sparsity"], record["nsamples"]) == ("atv", 0.5, 2)
    assert record["tokens"] == "ivtp:keep=16,llm_layers=1,instruction=ott+rt" == token_spec(out)
    assert record["recipe"] == {"file": "recipe.yaml", "text": RECIPE}
    assert record["measured_sparsity"] == pytest.approx(applied.report.sparsity)
    assert record["source"] == str(source.resolve())

    # the token method is what makes the difference: without it, the saved weights alone
    loaded.vlmprune_tokens.remove()
    applied.handle.remove()
    assert torch.allclose(logits(loaded, probe), logits(model, probe), atol=1e-5, rtol=0)
    bare, _ = vp.load(str(out), tokens=False)
    assert bare.vlmprune_tokens is None
    assert logits(bare, probe).shape[1] == probe["input_ids"].shape[1]


def test_token_only_recipe_records_the_method_and_keeps_the_weights(micro, tmp_path):
    source, _ = micro
    recipe = tmp_path / "fastv.yaml"
    recipe.write_text("stages:\n  - tokens: {method: fastv, layer: 1, keep: 8}\n")
    out = tmp_path / "fastv"
    assert main(["prune", "--model", str(source), "--recipe", str(recipe), "--out", str(out)]) == 0
    dense, _ = load_model(str(source))
    loaded, processor = vp.load(str(out))
    probe = toyworld.calibration(processor, n=1, seed=3)[0]
    with vp.tokens.apply(dense, "fastv:layer=1,keep=8"):
        expected = logits(dense, probe)
    assert torch.equal(logits(loaded, probe), expected)
    record = json.loads((out / "config.json").read_text())[CONFIG_KEY]
    assert "method" not in record and record["tokens"] == "fastv:layer=1,keep=8"


def test_dense_directory_and_toy_name_load_without_tokens(micro):
    source, _ = micro
    assert token_spec(source) is None
    model, _ = vp.load(str(source))
    assert model.vlmprune_tokens is None


def test_a_saved_toy_model_keeps_its_toy_clip_for_ivtp(tmp_path):
    """IVTP's text relevance needs the tower's own CLIP: for a saved copy of a toy model it is the toy
    CLIP still (the record names the source), not a download."""
    recipe = tmp_path / "ivtp.yaml"
    recipe.write_text("stages:\n  - tokens: {method: ivtp, keep: 16, llm_layers: 1}\n")
    out = tmp_path / "toy-small-ivtp"
    assert main(["prune", "--model", "toy-small", "--recipe", str(recipe), "--out", str(out)]) == 0
    dense, processor = toyworld.load("toy-small")
    loaded, _ = vp.load(str(out))
    probe = toyworld.calibration(processor, n=1, seed=3)[0]
    with vp.tokens.apply(dense, "ivtp:keep=16,llm_layers=1"):
        expected = logits(dense, probe)
    assert torch.allclose(logits(loaded, probe), expected, atol=1e-5, rtol=0)
