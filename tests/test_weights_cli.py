"""Saving pruned models and the ``vlmprune prune`` command's error handling."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import LlavaForConditionalGeneration

import vlmprune as vp
from vlmprune.cli import main
from vlmprune.errors import VlmpruneError
from vlmprune.models.tiny import build_tiny
from vlmprune.weights.command import method_spec
from vlmprune.weights.saving import CONFIG_KEY, save_pruned


def test_save_load_round_trip_keeps_zeros(tmp_path):
    model, make = build_tiny("llava", seed=0)
    calibration = [make(text_lens=(10,), seed=s) for s in range(2)]
    method = vp.weights.from_spec("atv:sparsity=0.5,pattern=2:4")
    report = vp.weights.prune(model, method, calibration=calibration)
    out = tmp_path / "pruned"
    save_pruned(model, None, out, {**report.method, "targets": "every Linear of the LLM decoder layers"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]         # nothing left beside it
    record = json.loads((out / "config.json").read_text())[CONFIG_KEY]
    assert record["method"] == "atv" and record["pattern"] == "2:4" and record["sparsity"] == 0.5
    loaded = LlavaForConditionalGeneration.from_pretrained(out)
    saved = dict(model.named_parameters())
    for name, param in loaded.named_parameters():
        assert torch.equal(param == 0, saved[name] == 0), name
    inputs = make(text_lens=(4,), seed=9)
    with torch.no_grad():
        assert torch.allclose(loaded(**inputs).logits, model(**inputs).logits, atol=1e-5)
    save_pruned(model, None, out, {"method": "again"})                         # replacing works too
    assert json.loads((out / "config.json").read_text())[CONFIG_KEY] == {"method": "again"}


def test_failed_save_leaves_nothing(tmp_path):
    class Broken:
        config = type("Config", (), {})()

        def save_pretrained(self, path):
            (path / "half.bin").write_text("x")
            raise OSError("disk full")

    with pytest.raises(OSError):
        save_pruned(Broken(), None, tmp_path / "out", {})
    assert list(tmp_path.iterdir()) == []


def test_method_spec_merges_flags():
    assert method_spec("atv", 0.6, None) == "atv:sparsity=0.6"
    assert method_spec("atv", None, "1:4") == "atv:pattern=1:4"
    assert method_spec("atv:alpha=2", 0.5, "2:4") == "atv:alpha=2,sparsity=0.5,pattern=2:4"
    assert vp.weights.from_spec(method_spec("wanda", 0.5, "4:8")).pattern == (4, 8)


@pytest.mark.parametrize("sparsity, pattern, expected", [
    (None, None, 0.5), (0.3, None, 0.3), (None, "1:4", 0.75), (0.5, "2:4", 0.5), (0.5, "4:8", 0.5)])
def test_default_and_consistent_sparsity_with_pattern(sparsity, pattern, expected):
    assert vp.weights.from_spec(method_spec("wanda", sparsity, pattern)).sparsity == expected


@pytest.mark.parametrize("argv, text", [
    (["--method", "wanda", "--sparsity", "1.5"], "sparsity must be in [0, 1)"),
    (["--method", "wanda", "--sparsity", "-0.2"], "sparsity must be in [0, 1)"),
    (["--method", "pruneall"], "unknown weight method"),
    (["--method", "wanda", "--pattern", "2-4"], "bad pattern"),
    (["--method", "wanda", "--nsamples", "0"], "needs calibration samples"),
    (["--method", "wanda", "--pattern", "2:4", "--sparsity", "0.6"], "sparsity 0.6 conflicts with pattern 2:4"),
    (["--method", "wanda:sparsity=0.7", "--pattern", "4:8"], "sparsity 0.7 conflicts with pattern 4:8"),
])
def test_cli_bad_input_exits_2(argv, text, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["prune", "--model", "toy-large", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert text in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_bad_device_is_one_line():
    model, make = build_tiny("llava", seed=0)
    with pytest.raises(VlmpruneError, match="unknown device"):
        vp.weights.prune(model, vp.weights.from_spec("magnitude"), device="gpu7")


def test_cli_prunes_and_saves_a_loadable_directory(tmp_path):
    from vlmprune.toyworld import configs
    from vlmprune.toyworld.processor import build_processor
    from vlmprune.toyworld.tokenizers import build_llm_tokenizer, corpus

    tokenizer = build_llm_tokenizer(corpus(n_scenes=60))
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(configs.llava_config("micro", tokenizer)).eval()
    source = tmp_path / "micro"
    model.save_pretrained(source)
    build_processor(tokenizer).save_pretrained(source)
    out = tmp_path / "pruned"
    argv = ["prune", "--model", str(source), "--method", "wanda", "--sparsity", "0.5", "--pattern", "4:8",
            "--nsamples", "2", "--out", str(out)]
    assert main(argv) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["micro", "pruned"]
    record = json.loads((out / "config.json").read_text())[CONFIG_KEY]
    assert (record["method"], record["pattern"], record["nsamples"]) == ("wanda", "4:8", 2)
    assert record["targets"] == "every Linear of the LLM decoder layers"
    loaded = LlavaForConditionalGeneration.from_pretrained(out)
    q = loaded.model.language_model.layers[0].self_attn.q_proj.weight
    assert (q.reshape(q.shape[0], -1, 8) != 0).sum(dim=2).max() == 4
    assert int((loaded.model.multi_modal_projector.linear_1.weight == 0).sum()) == 0
