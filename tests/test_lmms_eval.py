"""The lmms-eval plugin: lmms-eval's own command line runs the ``vlmprune`` model on the shipped toy tasks,
offline, and agrees item by item with vlmprune's harness on the same items."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from vlmprune import toyworld
from vlmprune.eval.harness import evaluate
from vlmprune.integrations import LMMS_TASKS_DIR
from vlmprune.integrations.command import lmms_eval_argv
from vlmprune.integrations.task_export import parquet_path

LIMIT = 8
SPEC = "ivtp:keep=16"


@pytest.fixture(scope="module")
def lmms_eval_run(tmp_path_factory):
    """The real ``lmms-eval`` CLI (its ``__main__``), the model found through vlmprune's entry point."""
    out = tmp_path_factory.mktemp("lmms")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HF_DATASETS_CACHE": str(out / "hf-cache")}
    command = [sys.executable, "-m", "lmms_eval", "--model", "vlmprune",
               "--model_args", f"pretrained=toy-large,tokens={SPEC}", "--tasks", "toyworld",
               "--include_path", str(LMMS_TASKS_DIR), "--limit", str(LIMIT),
               "--output_path", str(out / "results"), "--log_samples"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # lmms-eval reports an error during evaluation in its log and still exits 0
    found = list((out / "results").rglob("*_results.json"))
    assert len(found) == 1, "lmms-eval wrote no results: " + result.stderr[-3000:]
    (results_file,) = found
    samples = {}
    for path in (out / "results").rglob("*_samples_*.jsonl"):
        rows = sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda row: row["doc_id"])
        samples[path.stem.rsplit("_samples_", 1)[1]] = "".join(str(int(row["accuracy"])) for row in rows)
    return json.loads(results_file.read_text())["results"], samples, result.stdout


def test_lmms_eval_agrees_with_the_harness_item_by_item(lmms_eval_run):
    results, samples, stdout = lmms_eval_run
    model, processor = toyworld.load("toy-large")
    ours = evaluate(model, processor, tokens=SPEC, limit=LIMIT, measure=False, progress=False)
    for task, mine in ours["tasks"].items():
        name = f"toyworld_{task}"
        assert samples[name] == mine["correct"], task
        assert results[name]["accuracy,none"] == pytest.approx(mine["accuracy"]), task
    assert results["toyworld"]["accuracy,none"] == pytest.approx(ours["average"])
    assert "toyworld_counting" in stdout          # the table is printed
    assert "0" in "".join(samples.values())       # the items are not all right: a comparison that can fail


def test_the_shipped_datasets_are_the_test_splits():
    for task in toyworld.TASKS:
        rows = pq.read_table(parquet_path(task)).to_pylist()
        items = toyworld.test_split(task)
        assert [(row["index"], row["task"], row["question"], row["answer"], row["options"]) for row in rows] == \
            [(i, task, item.question, item.answer, item.options or []) for i, item in enumerate(items)], task


def test_a_quoted_spec_with_commas_reaches_the_model():
    from vlmprune.integrations.lmms_eval import VlmpruneLMM

    lmm = VlmpruneLMM(pretrained="toy-large", tokens="'fastv:layer=2,keep=0.5'", device="cpu")
    assert lmm.model.vlmprune_tokens._engine.method.spec().startswith("fastv:layer=2,keep=0.5")
    lmm.model.vlmprune_tokens.remove()


def test_the_launcher_adds_the_task_folder_once():
    assert lmms_eval_argv(["--tasks", "toyworld"]) == ["--tasks", "toyworld", "--include_path", str(LMMS_TASKS_DIR)]
    assert lmms_eval_argv(["--include_path", "/x", "--tasks", "t"]) == ["--include_path", "/x", "--tasks", "t"]
    assert lmms_eval_argv([]) == []


def test_vlmprune_help_imports_neither_lmms_eval_nor_torch():
    code = ("import sys; from vlmprune.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'lmms_eval', 'compressed_tensors') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip().endswith("[]"), result.stdout + result.stderr
