"""``vlmprune demo --quick`` end to end on a micro LVLM standing in for toy-large (seconds, not minutes)."""
from __future__ import annotations

import json

from test_eval import build_micro
from vlmprune import toyworld
from vlmprune.cli import main
from vlmprune.eval import demo


def test_demo_quick_end_to_end(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("VLMPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(toyworld, "load", lambda name: build_micro())
    monkeypatch.setattr(demo, "QUICK", demo.Plan(
        limit=4, token_budgets=(0.11,), weight_specs=("sparsity=0.5",), calibration=2,
        token_methods=("random", "fastv"), weight_methods=("magnitude",)))
    out = tmp_path / "report"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    labels = [row["label"] for row in results["rows"]]
    assert labels == ["dense", "random:keep=0.11", "fastv:keep=0.11", "magnitude:sparsity=0.5"]
    rows = {row["label"]: row for row in results["rows"]}
    dense, random_row = rows["dense"]["result"], rows["random:keep=0.11"]["result"]
    assert dense["tokens"] is None and random_row["tokens"] == "random:keep=0.11"
    assert random_row["flops"]["total"] < dense["flops"]["total"]
    assert rows["magnitude:sparsity=0.5"]["result"]["retention"] is not None or \
        all(t["accuracy"] == 0 for t in dense["tasks"].values())
    # FastV ranks at LLM layer 2, which the 2-layer micro model lacks: a failed row, not a crash
    assert rows["fastv:keep=0.11"]["result"] is None and "out of range" in rows["fastv:keep=0.11"]["error"]
    report = (out / "report.md").read_text()
    assert "| fastv:keep=0.11 | failed: VlmpruneError:" in report
    for png in ("tokens_accuracy_flops.png", "weights_retention.png"):
        assert (out / png).stat().st_size > 0
    assert "| random:keep=0.11 |" in capsys.readouterr().out


def test_demo_out_must_be_a_directory(tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("x")
    assert main(["demo", "--quick", "--out", str(target)]) == 2
    assert "is a file" in capsys.readouterr().err
    assert target.read_text() == "x"
