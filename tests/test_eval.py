"""The eval harness: lmms-eval style normalisation, retention arithmetic, the JSON schema, caching."""
from __future__ import annotations

import json

import pytest
import torch

from vlmprune.errors import VlmpruneError
from vlmprune.eval import dense_cache, harness
from vlmprune.eval.normalize import is_correct, option_letter, vqa_normalize, yes_no
from vlmprune.eval.report import markdown_table
from vlmprune.eval.retention import retention


def build_micro():
    """The toy processor and a random-weight toy LVLM of the ``micro`` size (2+2 layers, 100 patches)."""
    from transformers import LlavaForConditionalGeneration
    from vlmprune.toyworld.configs import llava_config
    from vlmprune.toyworld.processor import build_processor
    from vlmprune.toyworld.scenes import COLOURS, SHAPES
    from vlmprune.toyworld.tokenizers import EXTRA_WORDS, build_llm_tokenizer
    words = ["yes no a b c d what is there how many objects number on the colour of which shape",
             *COLOURS, *SHAPES, *EXTRA_WORDS, "0 1 2 3 4 5 6 7 8 9 zero one two three four five"]
    tokenizer = build_llm_tokenizer([" ".join(words)])
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(llava_config("micro", tokenizer)).eval(), build_processor(tokenizer)


@pytest.fixture
def tiny_llava():
    return build_micro()


@pytest.mark.parametrize("reply, expected", [
    ("Two", "2"),
    ("The red square.", "red square"),
    ("a circle", "circle"),
    ("  Yes\n", "yes"),
    ("ten!", "10"),
    ("left-of", "left of"),
    ("it isnt", "it isn't"),
    ("3.5", "3.5"),
    ("what's that?", "what 's that"),
    ("none", "0"),
    ("3.", "3"),            # lmms-eval drops a period after a digit too, unless a digit follows
    ("1,000", "1000"),
    ("? (red)", "red"),     # punctuation next to a space is deleted, not spaced
    ("red/blue", "red blue"),
])
def test_vqa_normalize_follows_lmms_eval(reply, expected):
    assert vqa_normalize(reply) == expected


def test_yes_no_reads_the_leading_verdict():
    assert yes_no("Yes, there is.") == "yes"
    assert yes_no("no") == "no"
    assert yes_no("maybe yes") == "maybe yes"


@pytest.mark.parametrize("reply, letter", [
    ("B", "B"), ("b", "B"), ("(C) red", "C"), ("D.", "D"), ("blue", "B"), ("A red square", ""),
    ("E", ""), ("green", ""),
])
def test_option_letter(reply, letter):
    assert option_letter(reply, ["red", "blue", "green square", "pink"]) == letter


def test_is_correct_picks_the_rule_of_the_item():
    assert is_correct("three", "3")
    assert is_correct("Three.", "three")
    assert not is_correct("four", "three")
    assert is_correct("yes it is", "yes")
    assert not is_correct("no", "yes")
    assert is_correct("b", "b", ["red", "blue", "green", "pink"])
    assert is_correct("blue", "B", ["red", "blue", "green", "pink"])
    assert not is_correct("a", "b", ["red", "blue", "green", "pink"])


def test_retention_is_the_mean_of_per_task_ratios():
    dense = {"x": {"accuracy": 0.8, "n": 10}, "y": {"accuracy": 0.5, "n": 10}}
    pruned = {"x": {"accuracy": 0.4, "n": 10}, "y": {"accuracy": 0.5, "n": 10}}
    assert retention(pruned, dense) == pytest.approx(75.0)  # (50% + 100%) / 2, not 0.9 / 1.3
    dense["z"] = {"accuracy": 0.0, "n": 10}
    pruned["z"] = {"accuracy": 0.3, "n": 10}
    assert retention(pruned, dense) == pytest.approx(75.0)  # no ratio where dense scores 0
    assert retention({"z": pruned["z"]}, {"z": dense["z"]}) is None
    with pytest.raises(VlmpruneError):
        retention({"x": {"accuracy": 0.4, "n": 9}}, {"x": {"accuracy": 0.8, "n": 10}})
    with pytest.raises(VlmpruneError):
        retention({"x": pruned["x"]}, {"y": dense["y"]})


def test_score_and_average_follow_item_order():
    class Item:
        def __init__(self, answer, options=None):
            self.answer, self.options = answer, options
    items = {"a": [Item("yes"), Item("no")], "b": [Item("two"), Item("c", ["x", "y", "z"])]}
    tasks = harness.score(items, ["yes", "yes", "2", "C"])
    assert {t: (e["accuracy"], e["n"], e["correct"]) for t, e in tasks.items()} == {"a": (0.5, 2, "10"),
                                                                                  "b": (1.0, 2, "11")}
    assert harness.average(tasks) == pytest.approx(0.75)


def test_markdown_table_reports_failures_on_their_row():
    ok = {"tasks": {"x": {"accuracy": 0.5, "n": 2}}, "average": 0.5, "retention": 80.0,
          "flops": {"total": 2_000_000_000}, "prefill_ms": 1.25}
    table = markdown_table([{"label": "ok", "result": ok}, {"label": "bad", "error": "keep too large"}])
    lines = table.splitlines()
    assert lines[0] == "| method | x | average | retention % | GFLOPs | prefill ms |"
    assert lines[2] == "| ok | 50.0 | 50.0 | 80.0 | 2 | 1.2 |"
    assert lines[3].startswith("| bad | failed: keep too large |")


def test_dense_cache_key_changes_with_the_weights(tiny_llava):
    model, _ = tiny_llava
    before = dense_cache.key(model, ["existence"], 20, 8)
    assert before == dense_cache.key(model, ["existence"], 20, 8)
    assert before != dense_cache.key(model, ["existence"], 10, 8)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = 0.0
    assert before != dense_cache.key(model, ["existence"], 20, 8)


SCHEMA_PARTS = {"vision", "projector", "llm", "extra", "total"}


def check_schema(result: dict, tasks: list[str], n: int) -> None:
    assert set(result) == {"model", "tokens", "tasks", "average", "average_interval", "retention", "flops",
                           "prefill_ms"}
    assert list(result["tasks"]) == tasks
    for entry in result["tasks"].values():
        assert set(entry) == {"accuracy", "n", "interval", "correct"} and entry["n"] == n and 0 <= entry["accuracy"] <= 1
        assert len(entry["correct"]) == n and entry["correct"].count("1") == pytest.approx(n * entry["accuracy"])
        assert 0 <= entry["interval"][0] <= entry["accuracy"] <= entry["interval"][1] <= 1
    assert 0 <= result["average_interval"][0] <= result["average"] <= result["average_interval"][1] <= 1
    assert result["average"] == pytest.approx(sum(t["accuracy"] for t in result["tasks"].values()) / len(tasks))
    json.dumps(result)


def test_evaluate_on_a_20_item_slice(tiny_llava, monkeypatch, tmp_path):
    monkeypatch.setenv("VLMPRUNE_CACHE", str(tmp_path))
    model, processor = tiny_llava
    calls = []
    real = harness.generate_answers
    monkeypatch.setattr(harness, "generate_answers", lambda *a, **k: calls.append(1) or real(*a, **k))
    result = harness.evaluate(model, processor, tasks="existence,counting", limit=20, batch_size=8,
                              measure=False, progress=False)
    check_schema(result, ["existence", "counting"], 20)
    assert result["tokens"] is None and result["retention"] is None
    again = harness.evaluate(model, processor, tasks="existence,counting", limit=20, measure=False,
                             progress=False)
    assert again["tasks"] == result["tasks"] and len(calls) == 1  # the dense run came from the cache


def test_batched_generation_equals_one_by_one(tiny_llava):
    model, processor = tiny_llava
    from vlmprune import toyworld
    items = toyworld.test_split("attribute", 5)
    batched = harness.generate_answers(model, processor, items, batch_size=5, progress=False)
    single = [harness.generate_answers(model, processor, [item], batch_size=1, progress=False)[0]
              for item in items]
    assert batched == single


def test_bad_tasks_and_limits_are_one_line_errors():
    with pytest.raises(VlmpruneError, match="unknown task 'nope'"):
        harness.resolve_tasks("existence,nope")
    with pytest.raises(VlmpruneError, match="at least 1"):
        harness.load_items(["existence"], 0)



def test_eval_command_on_a_saved_directory(tiny_llava, monkeypatch, tmp_path, capsys):
    from vlmprune.cli import main
    monkeypatch.setenv("VLMPRUNE_CACHE", str(tmp_path / "cache"))
    model, processor = tiny_llava
    model.save_pretrained(tmp_path / "saved")
    processor.save_pretrained(tmp_path / "saved")
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    assert main(["eval", "--model", str(tmp_path / "saved"), "--tokens", "random:keep=20", "--tasks",
                 "existence,choice", "--limit", "3", "--json", str(out_json), "--md", str(out_md)]) == 0
    result = json.loads(out_json.read_text())
    check_schema(result, ["existence", "choice"], 3)
    assert result["tokens"] == "random:keep=20" and result["model"] == str(tmp_path / "saved")
    assert set(result["flops"]) == SCHEMA_PARTS and result["flops"]["total"] == sum(
        result["flops"][part] for part in ("vision", "projector", "llm", "extra"))
    assert result["prefill_ms"] > 0
    assert out_md.read_text().splitlines()[2].startswith("| random:keep=20 |")
    assert "| random:keep=20 |" in capsys.readouterr().out


def test_eval_rows_name_the_weight_recipe_a_pruned_model_carries(tiny_llava):
    from vlmprune.eval.command import row_label
    from vlmprune.weights.saving import CONFIG_KEY
    model, _ = tiny_llava
    assert row_label(model, None) == "dense" and row_label(model, "fastv:keep=8") == "fastv:keep=8"
    setattr(model.config, CONFIG_KEY, {"method": "atv", "sparsity": 0.5, "pattern": "2:4"})
    try:
        assert row_label(model, None) == "atv:sparsity=0.5,pattern=2:4"
        assert row_label(model, "fastv:keep=8") == "atv:sparsity=0.5,pattern=2:4 + fastv:keep=8"
    finally:
        delattr(model.config, CONFIG_KEY)
