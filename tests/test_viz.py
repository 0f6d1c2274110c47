"""Kept-token overlays, survival maps and the result plots."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from test_eval import tiny_llava  # noqa: F401  (shared fixture)
from vlmprune.cli import main
from vlmprune.tokens import Reduction, Site, TokenMethod, from_spec
from vlmprune.viz import command, plots
from vlmprune.viz.command import kept_per_site, survival
from vlmprune.viz.overlay import heat_overlay, kept_overlay, model_view

GOLD = [255, 215, 0]


def _noise(width, height, seed=0):
    """A deterministic RGB noise image, so dimming or moving any patch changes its pixels."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(16, 256, (height, width, 3), dtype=np.uint8))


def _check_kept_cells(panel, view, grid, scale, kept):
    """``panel`` (H, W, 3) is ``view`` enlarged ``scale`` times with exactly the patches in ``kept``
    (row-major over ``grid``) left bright and outlined in gold, and every other patch at a quarter."""
    rows, cols = grid
    big = np.asarray(view.resize((view.width * scale, view.height * scale), Image.Resampling.NEAREST))
    assert panel.shape == big.shape
    cell_h, cell_w = big.shape[0] // rows, big.shape[1] // cols
    inset = max(1, scale // 3) + 1                         # past the outline
    outlined = set()
    for index in range(rows * cols):
        r, c = divmod(index, cols)
        y, x = r * cell_h, c * cell_w
        inner = (slice(y + inset, y + cell_h - inset), slice(x + inset, x + cell_w - inset))
        if panel[y, x].tolist() == GOLD:
            outlined.add(index)
            assert panel[y + cell_h - 1, x + cell_w - 1].tolist() == GOLD, index
            assert np.array_equal(panel[inner], big[inner]), f"kept patch {index} is not drawn as it is"
        else:
            assert np.array_equal(panel[inner], (big[inner].astype(np.float32) * 0.25).astype(np.uint8)), \
                f"dropped patch {index} is not dimmed to a quarter"
    assert outlined == set(kept)


def test_kept_overlay_dims_exactly_the_dropped_patches():
    image = Image.new("RGB", (4, 4), (200, 200, 200))
    out = np.asarray(kept_overlay(image, (2, 2), [1, 2], scale=10))
    assert out.shape == (40, 40, 3)
    centre = {index: out[r * 20 + 10, c * 20 + 10] for index, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)])}
    assert centre[0].tolist() == [50, 50, 50] and centre[3].tolist() == [50, 50, 50]
    assert centre[1].tolist() == [200, 200, 200] and centre[2].tolist() == [200, 200, 200]
    assert out[0, 20].tolist() == GOLD  # kept patch (0, 1) is outlined from its corner


def test_kept_overlay_indexes_a_wide_grid_row_major():
    # 2 rows x 3 columns of one-pixel patches, each its own colour: a (row, col) mix-up moves the dimming
    image = _noise(3, 2, seed=1)
    for kept in ([1, 5], [0, 3, 4], [2]):
        out = np.asarray(kept_overlay(image, (2, 3), kept, scale=9))
        _check_kept_cells(out, image, (2, 3), 9, kept)


def test_heat_overlay_is_brightest_where_the_value_is_highest():
    image = Image.new("RGB", (4, 4), (100, 100, 100))
    out = np.asarray(heat_overlay(image, (2, 2), [0.0, 0.2, 0.5, 1.0], scale=10)).astype(int)
    reds = [out[r * 20 + 10, c * 20 + 10, 0] for r, c in [(0, 0), (0, 1), (1, 0), (1, 1)]]
    assert reds == sorted(reds) and reds[0] < reds[-1]


def test_heat_overlay_places_each_value_on_its_patch_of_a_wide_grid():
    image = Image.new("RGB", (3, 2), (100, 100, 100))
    values = [3.0, 0.0, 1.0, 2.0, 5.0, 4.0]               # 2 rows x 3 columns, row-major
    out = np.asarray(heat_overlay(image, (2, 3), values, scale=10)).astype(int)
    assert out.shape == (20, 30, 3)
    cells = [out[r * 10:(r + 1) * 10, c * 10:(c + 1) * 10] for r in range(2) for c in range(3)]
    for cell in cells:
        assert (cell == cell[0, 0]).all()                 # one colour per patch
    reds = [int(cell[0, 0, 0]) for cell in cells]
    assert np.argsort(reds).tolist() == np.argsort(values).tolist()
    assert len(set(reds)) == 6
    # the lowest value leaves the dimmed image (35%), the highest is half way to pure red
    assert cells[1][0, 0].tolist() == [35, 35, 35]
    assert abs(cells[4][0, 0, 0] - (0.5 * 35 + 0.5 * 255)) <= 1 and abs(cells[4][0, 0, 1] - 17.5) <= 1
    # no spread in the values: no heat anywhere
    flat = np.asarray(heat_overlay(image, (2, 3), [0.7] * 6, scale=10))
    assert (flat == 35).all()


@pytest.mark.parametrize("size", [(160, 100), (100, 160)])
def test_model_view_matches_the_processor_crop(tiny_llava, size):  # noqa: F811
    _, processor = tiny_llava
    image = _noise(*size, seed=2)
    crop = processor.image_processor.crop_size
    view = model_view(image, (crop["width"], crop["height"]))
    assert view.size == (80, 80)
    # what the model receives, undone: the same pixels, so patch (r, c) covers the same part of the image
    pixels = processor.image_processor(image, return_tensors="pt")["pixel_values"][0]
    mean = torch.tensor(processor.image_processor.image_mean)[:, None, None]
    std = torch.tensor(processor.image_processor.image_std)[:, None, None]
    seen = ((pixels * std + mean) * 255).permute(1, 2, 0).numpy()
    # resampling rounds differently across Pillow releases (up to 12 levels at a few noise pixels with
    # Pillow 13); a shifted or squashed crop moves every pixel of a noise image by tens of levels
    difference = np.abs(seen - np.asarray(view, dtype=np.float32))
    assert difference.mean() < 0.5 and np.percentile(difference, 99) <= 2.0, (difference.mean(), difference.max())


class PermutedTokens(TokenMethod):
    """Two LLM stages with known, per-sample choices: sample b first keeps the patches of parity b
    (listed in reverse order), then the first ten of the tokens still present (positions 0-9)."""

    name = "permuted"

    def sites(self, plan):
        return [Site("llm", 0), Site("llm", 1)]

    def reduce(self, ctx):
        batch, present = ctx.visual.shape
        if ctx.site.layer == 0:
            keep = torch.stack([torch.arange(present - 1 - b % 2, -1, -2) for b in range(batch)])
        else:
            keep = torch.arange(10).expand(batch, -1)
        return Reduction(keep=keep.to(ctx.visual.device))


def test_kept_per_site_records_what_the_engine_keeps(tiny_llava):  # noqa: F811
    model, processor = tiny_llava
    image = _noise(80, 80, seed=0)
    questions = ["what colour is the circle?", "is there a red square?"]
    kept, grid = kept_per_site(model, processor, from_spec("topk:keep=12"), image, questions)
    assert grid == (10, 10)
    assert [site for site, _ in kept] == [Site("vision", 1)]     # micro's vision tower has 2 layers
    final = kept[-1][1]
    assert final.shape == (2, 12)
    # topk keeps the patches most cosine-similar to [CLS] where it prunes (the input of vision layer 1)
    pixels = processor.image_processor(image, return_tensors="pt")["pixel_values"]
    tower = model.vision_tower if hasattr(model, "vision_tower") else model.model.vision_tower
    with torch.no_grad():
        hidden = tower(pixels, output_hidden_states=True).hidden_states[1][0]
    similarity = torch.nn.functional.cosine_similarity(hidden[1:], hidden[:1], dim=-1)
    expected = set(similarity.topk(12).indices.tolist())
    for row in final:  # the same image twice: a vision-tower method keeps the same patches for both
        assert set(row.tolist()) == expected

    # after an earlier pruning site, positions are mapped back to the original patch indices
    kept, _ = kept_per_site(model, processor, PermutedTokens(), image, questions)
    assert [site for site, _ in kept] == [Site("llm", 0), Site("llm", 1)]
    first, second = kept[0][1], kept[1][1]
    assert sorted(first[0].tolist()) == list(range(1, 100, 2)) and sorted(first[1].tolist()) == list(range(0, 100, 2))
    assert second.shape == (2, 10)
    # the engine sorts each keep, so the second site's first ten are sample b's ten lowest patches of parity b
    assert sorted(second[0].tolist()) == list(range(1, 20, 2)) and sorted(second[1].tolist()) == list(range(0, 20, 2))


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

    # per sample, over three sites, with the sites' index lists in any order
    sites = [Site("llm", layer) for layer in range(3)]
    hand = [(sites[0], torch.tensor([[5, 4, 3, 2, 1], [0, 1, 2, 3, 4]])),
            (sites[1], torch.tensor([[1, 5, 3], [4, 0, 2]])),
            (sites[2], torch.tensor([[5], [2]]))]
    shares = survival(hand, 7)
    third = 1 / 3
    assert shares[0].tolist() == pytest.approx([0, 2 * third, third, 2 * third, third, 1, 0])
    assert shares[1].tolist() == pytest.approx([2 * third, third, 1, third, 2 * third, 0, 0])


def _spy_kept(monkeypatch):
    """Record what ``kept_per_site`` returns to the viz commands."""
    calls = []

    def spy(*args, **kwargs):
        result = kept_per_site(*args, **kwargs)
        calls.append(result)
        return result

    monkeypatch.setattr(command, "kept_per_site", spy)
    return calls


def _panels_of(path, count, width, height):
    """The ``count`` side-by-side panels (each a title strip of 18 rows over a width x height image)."""
    with Image.open(path) as png:
        assert png.size == (count * width + 8 * (count - 1), height + 18)
        out = np.asarray(png.convert("RGB"))
    panels = []
    for i in range(count):
        x = i * (width + 8)
        title = out[:18, x:x + width]
        assert (title.sum(axis=-1) < 200).any()          # a title is written over each panel
        panels.append(out[18:, x:x + width])
        if i:
            assert (out[:, x - 8:x] == 255).all()          # a white gap between panels
    return panels


def test_viz_tokens_writes_one_panel_per_question(tiny_llava, monkeypatch, tmp_path, capsys):  # noqa: F811
    from vlmprune.eval import loading
    monkeypatch.setattr(loading, "load_model", lambda name: tiny_llava)
    calls = _spy_kept(monkeypatch)
    source = _noise(120, 80, seed=5)
    source.save(tmp_path / "scene.png")
    out = tmp_path / "kept.png"
    questions = ["what colour is the star?", "what colour is the cross?"]
    assert main(["viz", "tokens", "--model", "micro", "--tokens", "random:keep=10,layers=0/1",
                 "--image", str(tmp_path / "scene.png"),
                 "--question", questions[0], "--question", questions[1], "--out", str(out)]) == 0
    assert "kept 10 of 100" in capsys.readouterr().out
    (kept, grid), = calls
    final = kept[-1][1]
    assert final.shape == (2, 10) and set(final[0].tolist()) != set(final[1].tolist())
    view = model_view(source, (80, 80))
    for i, panel in enumerate(_panels_of(out, 2, 480, 480)):
        _check_kept_cells(panel, view, grid, 6, final[i].tolist())   # question i's panel shows its own final keep

    # one question: one panel
    one = tmp_path / "one.png"
    assert main(["viz", "tokens", "--model", "micro", "--tokens", "random:keep=10,layers=0/1",
                 "--image", str(tmp_path / "scene.png"), "--question", questions[1], "--out", str(one)]) == 0
    _check_kept_cells(_panels_of(one, 1, 480, 480)[0], view, grid, 6, calls[-1][0][-1][1][0].tolist())


def test_viz_importance_writes_a_heat_map(tiny_llava, monkeypatch, tmp_path, capsys):  # noqa: F811
    from vlmprune.eval import loading
    monkeypatch.setattr(loading, "load_model", lambda name: tiny_llava)
    calls = _spy_kept(monkeypatch)
    Image.new("RGB", (80, 80), (120, 120, 120)).save(tmp_path / "grey.png")
    out = tmp_path / "survival.png"
    assert main(["viz", "importance", "--model", "micro", "--tokens", "random:keep=10,layers=0/1",
                 "--image", str(tmp_path / "grey.png"), "--question", "is there a red square?",
                 "--question", "what colour is the circle?", "--out", str(out)]) == 0
    assert "over llm:0, llm:1" in capsys.readouterr().out
    (kept, grid), = calls
    assert len(kept) == 2
    for i, panel in enumerate(_panels_of(out, 2, 480, 480)):
        # the share of the two sites each patch came through, counted here from what was kept
        shares = [sum(j in indices[i].tolist() for _, indices in kept) / 2 for j in range(100)]
        assert shares.count(1.0) == 10 and shares.count(0.5) == 45 and shares.count(0.0) == 45
        colour = {}
        for j, share in enumerate(shares):
            r, c = divmod(j, 10)
            cell = panel[r * 48:(r + 1) * 48, c * 48:(c + 1) * 48]
            assert (cell == cell[0, 0]).all()
            colour.setdefault(share, set()).add(tuple(cell[0, 0].tolist()))
        assert all(len(found) == 1 for found in colour.values())   # the colour is a function of the share
        cold, warm, hot = (colour[s].pop() for s in (0.0, 0.5, 1.0))
        assert cold == (42, 42, 42)                                 # never survives: only dimmed (35%)
        assert cold[0] < warm[0] < hot[0] and hot[1] < warm[1] < cold[1]


def _row(kind, label, total, average, retention):
    return {"kind": kind, "label": label, "error": None,
            "result": {"flops": {"total": total}, "average": average, "retention": retention}}


def _spy_figures(monkeypatch):
    figures = []
    real = plots.plt.subplots

    def spy(*args, **kwargs):
        fig, ax = real(*args, **kwargs)
        figures.append(fig)
        return fig, ax

    monkeypatch.setattr(plots.plt, "subplots", spy)
    return figures


def _check_png(path, size):
    with Image.open(path) as png:
        assert png.size == size
        pixels = np.asarray(png.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10


def test_result_plots_are_written(tmp_path, monkeypatch):
    figures = _spy_figures(monkeypatch)
    # a failed row and one without FLOPs have no point but a red legend entry; every other row is a point,
    # budgets out of order
    token_rows = [_row("tokens", "ivtp:keep=0.25", 2e9, 0.88, 97.0),
                  {"kind": "tokens", "label": "tome:keep=0.11", "result": None, "error": "boom"},
                  _row("tokens", "tome:keep=0.25", 2.5e9, 0.80, 89.0),
                  {"kind": "tokens", "label": "fastv:keep=0.11", "error": None,
                   "result": {"flops": None, "average": 0.5, "retention": 50.0}},
                  _row("dense", "dense", 4e9, 0.9, None),
                  _row("tokens", "ivtp:keep=0.11", 1e9, 0.85, 94.0)]
    plots.accuracy_vs_flops(token_rows, tmp_path / "a.png")
    _check_png(tmp_path / "a.png", (768, 528))
    ax, = figures[-1].axes
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}
    assert lines == {"ivtp": ([1.0, 2.0], pytest.approx([85.0, 88.0])), "tome": ([2.5], pytest.approx([80.0]))}
    star, = ax.collections
    assert star.get_label() == "dense" and star.get_offsets().tolist() == [[4.0, pytest.approx(90.0)]]
    legend = {text.get_text(): text.get_color() for text in ax.get_legend().get_texts()}
    assert sorted(legend) == ["dense", "fastv:keep=0.11: no FLOPs", "ivtp", "tome", "tome:keep=0.11: failed"]
    assert [name for name, colour in legend.items() if colour == "red"] == \
        ["tome:keep=0.11: failed", "fastv:keep=0.11: no FLOPs"]

    weight_rows = [_row("weights", "wanda:sparsity=0.5", 4e9, 0.8, 90.0),
                   {"kind": "weights", "label": "atv:sparsity=0.5", "result": None, "error": "boom"},
                   _row("weights", "sparsegpt:sparsity=0.5", 4e9, 0.7, 70.0)]
    plots.retention_bars(weight_rows, tmp_path / "b.png")
    _check_png(tmp_path / "b.png", (492, 528))
    ax, = figures[-1].axes
    bars, = ax.containers
    assert [bar.get_height() for bar in bars] == [90.0, 0.0, 70.0]
    assert [bar.get_x() + bar.get_width() / 2 for bar in bars] == [0, 1, 2]
    assert [label.get_text() for label in ax.get_xticklabels()] == [row["label"] for row in weight_rows]
    assert [(text.get_text(), text.get_color()) for text in ax.texts] == \
        [("90", "black"), ("failed", "red"), ("70", "black")]
    assert [label.get_color() for label in ax.get_xticklabels()][1] == "red"
    assert any(list(line.get_ydata()) == [100, 100] for line in ax.get_lines())   # the dense level
    plots.retention_bars([_row("weights", "wanda:sparsity=0.5", 4e9, 0.8, None)], tmp_path / "c.png")
    assert [(text.get_text(), text.get_color()) for text in figures[-1].axes[0].texts] == [("-", "black")]


def test_ivtp_keeps_different_tokens_for_questions_about_different_objects():
    from vlmprune import toyworld
    model, processor = toyworld.load("toy-large")  # a shipped checkpoint that does not load is a failure
    from vlmprune.toyworld.scenes import render, sample_scene
    import random
    rng = random.Random(8)
    scene = sample_scene(rng, 4)
    image = render(scene)[0]
    a, b = scene.objects[0].shape, scene.objects[-1].shape
    kept, _ = kept_per_site(model, processor, from_spec("ivtp:keep=16"), image,
                            [f"what colour is the {a}?", f"what colour is the {b}?"])
    first, second = (set(row.tolist()) for row in kept[-1][1])
    assert len(first) == len(second) == 16
    # measured on the shipped toy-large: 7 of 16 kept tokens differ here, 2 to 7 on the scenes of seeds 0-11
    assert len(first - second) >= 4


def test_viz_drift_plots_atv_profile(tiny_llava, monkeypatch, tmp_path, capsys):  # noqa: F811
    from vlmprune.eval import loading
    from vlmprune.weights import atv
    monkeypatch.setattr(loading, "load_model", lambda name: tiny_llava)
    profiles = []
    real_profile = atv.drift_profile

    def spy(*args, **kwargs):
        profiles.append(real_profile(*args, **kwargs))
        return profiles[-1]

    monkeypatch.setattr(atv, "drift_profile", spy)
    figures = _spy_figures(monkeypatch)
    out = tmp_path / "drift.png"
    assert main(["viz", "drift", "--model", "micro", "--nsamples", "2", "--out", str(out)]) == 0
    assert "over 2 blocks on 2 captions" in capsys.readouterr().out
    _check_png(out, (864, 456))
    profile, = profiles
    assert [p["block"] for p in profile] == [0, 1]                  # every LLM block of micro
    left, right = figures[-1].axes
    bars, = left.containers
    assert [bar.get_height() for bar in bars] == pytest.approx([p["saliency"] for p in profile])
    assert [bar.get_x() + bar.get_width() / 2 for bar in bars] == pytest.approx([0, 1])
    line, = right.get_lines()
    assert list(line.get_xdata()) == [0, 1]
    assert list(line.get_ydata()) == pytest.approx([p["visual_tokens"] for p in profile])
    assert "alpha=1" in left.get_title()


@pytest.mark.parametrize("what", ["drift", "tokens", "importance"])
def test_viz_rejects_an_output_that_is_not_png(what, capsys, tmp_path, monkeypatch):
    from vlmprune.eval import loading

    def no_load(name):
        raise AssertionError("the output path is checked before the model is loaded")

    monkeypatch.setattr(loading, "load_model", no_load)
    argv = ["viz", what, "--model", "toy-large", "--out", str(tmp_path / "d.jpg")]
    if what != "drift":
        argv += ["--tokens", "topk:keep=10", "--question", "is there a red square?"]
    assert main(argv) == 2
    assert "ending in .png" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
