"""``vlmprune demo --quick`` end to end on a micro LVLM standing in for toy-large (seconds, not minutes):
the report, a failing method (loud: exit 1, marked row and plots, errors.log), Ctrl-C and ``--resume``."""
from __future__ import annotations

import json

from test_eval import build_micro
from vlmprune import toyworld
from vlmprune.cli import main
from vlmprune.eval import demo
from vlmprune.measure import latency
from vlmprune.tokens.methods.random import Random
from vlmprune.viz import plots

SMALL = demo.Plan(limit=2, token_budgets=(0.11,), weight_specs=("sparsity=0.5",), calibration=2,
                  token_methods=("random",), weight_methods=("magnitude",))
RUN_ROW = demo.run_row


def _micro(monkeypatch, tmp_path, plan):
    monkeypatch.setenv("VLMPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(toyworld, "load", lambda name: build_micro())
    monkeypatch.setattr(demo, "QUICK", plan)


def _steady_clock(monkeypatch):
    """A fixed prefill latency: fast, and the only timing in report.md, so whole reports compare equal."""
    monkeypatch.setattr(latency, "prefill_ms", lambda *args, **kwargs: 1.0)


def _count_rows(monkeypatch, interrupt_at=None, references=None):
    """Labels of the rows evaluated, in order; KeyboardInterrupt from inside row number ``interrupt_at``;
    each row's dense reference into ``references``."""
    calls = []

    def spy(kind, spec, plan, model, processor, reference):
        calls.append(spec)
        if references is not None:
            references[spec] = reference
        if len(calls) == interrupt_at:
            raise KeyboardInterrupt
        return RUN_ROW(kind, spec, plan, model, processor, reference)

    monkeypatch.setattr(demo, "run_row", spy)
    return calls


def _spy_legends(monkeypatch):
    """Each figure's legend or tick and annotation texts, with their colours, as it is saved."""
    seen, real = [], plots._save

    def spy(fig, path):
        ax, = fig.axes
        legend = ax.get_legend()
        texts = [*(legend.get_texts() if legend else []), *ax.texts, *ax.get_xticklabels()]
        seen.append((path.name, {(t.get_text(), t.get_color()) for t in texts}))
        real(fig, path)

    monkeypatch.setattr(plots, "_save", spy)
    return seen


def _content(out):
    """results.json without the wall-clock seconds of each row."""
    results = json.loads((out / "results.json").read_text())
    for row in results["rows"]:
        row.pop("seconds")
    return results


def test_demo_quick_end_to_end(monkeypatch, tmp_path, capsys):
    _micro(monkeypatch, tmp_path, demo.Plan(
        limit=4, token_budgets=(0.11,), weight_specs=("sparsity=0.5",), calibration=2,
        token_methods=("random", "fastv"), weight_methods=("magnitude",)))
    out = tmp_path / "report"
    # FastV ranks at LLM layer 2, which the 2-layer micro model lacks: a failed row, the others run, exit 1
    assert main(["demo", "--quick", "--out", str(out)]) == 1
    results = json.loads((out / "results.json").read_text())
    labels = [row["label"] for row in results["rows"]]
    assert labels == ["dense", "random:keep=0.11", "fastv:keep=0.11", "magnitude:sparsity=0.5"]
    assert results["partial"] is False and results["planned"] == 4
    rows = {row["label"]: row for row in results["rows"]}
    dense, random_row = rows["dense"]["result"], rows["random:keep=0.11"]["result"]
    assert dense["tokens"] is None and random_row["tokens"] == "random:keep=0.11"
    assert random_row["flops"]["total"] < dense["flops"]["total"]
    assert rows["magnitude:sparsity=0.5"]["result"]["retention"] is not None or \
        all(t["accuracy"] == 0 for t in dense["tasks"].values())
    assert rows["fastv:keep=0.11"]["result"] is None and "out of range" in rows["fastv:keep=0.11"]["error"]
    report = (out / "report.md").read_text()
    assert "| fastv:keep=0.11 | failed: VlmpruneError:" in report
    for png in ("tokens_accuracy_flops.png", "weights_retention.png"):
        assert (out / png).stat().st_size > 0
    captured = capsys.readouterr()
    assert "| random:keep=0.11 |" in captured.out
    assert "vlmprune: demo: fastv:keep=0.11 failed: VlmpruneError: fastv: Site" in captured.err
    assert [json.loads(line)["key"] for line in (out / "rows.jsonl").read_text().splitlines()] == labels


def test_a_failing_method_is_loud_and_retried_on_resume(monkeypatch, tmp_path, capsys):
    _micro(monkeypatch, tmp_path, SMALL)
    _steady_clock(monkeypatch)

    def explode(self, ctx):
        raise RuntimeError("boom in reduce\nsecond line")

    monkeypatch.setattr(Random, "reduce", explode)
    figures = _spy_legends(monkeypatch)
    out = tmp_path / "report"
    assert main(["demo", "--quick", "--out", str(out)]) == 1
    failures = [line for line in capsys.readouterr().err.splitlines() if line.startswith("vlmprune:")]
    assert failures == [f"vlmprune: demo: random:keep=0.11 failed: RuntimeError: boom in reduce "
                        f"(traceback in {out / 'errors.log'})"]
    rows = {row["label"]: row for row in json.loads((out / "results.json").read_text())["rows"]}
    assert rows["magnitude:sparsity=0.5"]["result"] is not None          # the failure stopped nothing
    report = (out / "report.md").read_text()
    assert "| random:keep=0.11 | failed: RuntimeError: boom in reduce |" in report
    assert "**1 of 3 runs failed** (random:keep=0.11)" in report and "[errors.log](errors.log)" in report
    log = (out / "errors.log").read_text()
    assert log.startswith("== random:keep=0.11\nTraceback (most recent call last):")
    assert "in explode" in log and "RuntimeError: boom in reduce\nsecond line" in log
    assert dict(figures)["tokens_accuracy_flops.png"] >= {("random:keep=0.11: failed", "red"), ("dense", "black")}

    monkeypatch.undo()                                                   # the method works again
    _micro(monkeypatch, tmp_path, SMALL)
    _steady_clock(monkeypatch)
    calls = _count_rows(monkeypatch)
    assert main(["demo", "--quick", "--out", str(out), "--resume"]) == 0
    assert calls == ["random:keep=0.11"]                                  # only the failed row runs again
    assert "failed" not in (out / "report.md").read_text()
    assert not (out / "errors.log").exists()


def test_a_failed_weight_method_is_marked_on_the_retention_plot(monkeypatch, tmp_path):
    _micro(monkeypatch, tmp_path, demo.Plan(**{**SMALL.__dict__, "token_methods": ()}))
    _steady_clock(monkeypatch)
    monkeypatch.setattr(demo, "_weight_pruned", lambda *args: 1 / 0)
    figures = _spy_legends(monkeypatch)
    assert main(["demo", "--quick", "--out", str(tmp_path / "report")]) == 1
    marked = dict(figures)["weights_retention.png"]
    assert ("failed", "red") in marked and ("magnitude:sparsity=0.5", "red") in marked


def test_interrupted_demo_leaves_a_partial_report_and_resumes_to_the_full_one(monkeypatch, tmp_path, capsys):
    _micro(monkeypatch, tmp_path, SMALL)
    _steady_clock(monkeypatch)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(["demo", "--quick", "--out", str(whole)]) == 0

    calls = _count_rows(monkeypatch, interrupt_at=3)
    figures = _spy_legends(monkeypatch)
    assert main(["demo", "--quick", "--out", str(cut)]) == 130
    assert calls == ["dense", "random:keep=0.11", "magnitude:sparsity=0.5"]
    report = (cut / "report.md").read_text()
    assert "**Partial report: 2 of 3 runs finished**" in report
    assert f"`vlmprune demo --quick --out {cut} --resume`" in report
    assert "| random:keep=0.11 |" in report and "magnitude" not in report.split("samples.")[1]
    partial = _content(cut)
    assert partial["partial"] is True and [row["label"] for row in partial["rows"]] == ["dense", "random:keep=0.11"]
    assert [name for name, _ in figures] == ["tokens_accuracy_flops.png", "weights_retention.png"]
    assert f"resume with: vlmprune demo --quick --out {cut} --resume" in capsys.readouterr().err

    references = {}
    calls = _count_rows(monkeypatch, references=references)
    assert main(["demo", "--quick", "--out", str(cut), "--resume"]) == 0
    assert calls == ["magnitude:sparsity=0.5"]                           # finished rows are not run again
    assert references["magnitude:sparsity=0.5"] == partial["rows"][0]["result"]["tasks"]   # the resumed dense
    assert _content(cut) == _content(whole)
    assert (cut / "report.md").read_text() == (whole / "report.md").read_text()


def test_resume_reruns_rows_recorded_with_other_settings(monkeypatch, tmp_path):
    dense_only = demo.Plan(**{**SMALL.__dict__, "token_methods": (), "weight_methods": ()})
    _micro(monkeypatch, tmp_path, dense_only)
    _steady_clock(monkeypatch)
    out = tmp_path / "report"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    monkeypatch.setattr(demo, "QUICK", demo.Plan(**{**dense_only.__dict__, "limit": 1}))
    calls = _count_rows(monkeypatch)
    assert main(["demo", "--quick", "--out", str(out), "--resume"]) == 0
    assert calls == ["dense"]
    assert json.loads((out / "results.json").read_text())["limit"] == 1


def test_demo_out_must_be_a_directory(tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("x")
    assert main(["demo", "--quick", "--out", str(target)]) == 2
    assert "is a file" in capsys.readouterr().err
    assert target.read_text() == "x"


def test_demo_refuses_a_directory_of_the_users_own(tmp_path, capsys):
    """A directory holding files vlmprune did not write is refused (one line, exit 2, untouched) unless
    --overwrite; a directory a demo wrote is its own and is written into again."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("my notes")
    assert main(["demo", "--quick", "--out", str(mine)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did not write" in err and "--overwrite" in err
    assert sorted(p.name for p in mine.iterdir()) == ["report.md"] and (mine / "report.md").read_text() == "my notes"
