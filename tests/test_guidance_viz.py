"""``vlmprune viz guidance``: the figure's pixels show the scores and kept sets it was given (kept
cells at full brightness, the rest dimmed; the hottest cell the highest score), one row per question."""
import numpy as np
import pytest
import torch

from vlmprune.viz.guidance import GAP, PANELS, Guidance, guidance_figure
from vlmprune.viz.overlay import _enlarged, model_view

GRID, SIZE, SCALE, TITLE = (10, 10), (80, 80), 6, 18


def _scene():
    import random
    from vlmprune.toyworld.scenes import render, sample_scene
    return render(sample_scene(random.Random(3), 4))[0]


def _panel(figure, row, column):
    width, height = SIZE[0] * SCALE, SIZE[1] * SCALE + TITLE
    x, y = column * (width + GAP), row * (height + GAP)
    return np.asarray(figure)[y + TITLE:y + height, x:x + width].astype(np.float32)


def _cell_means(pixels):
    """(cells, 3) mean colour of each patch's inner part (its outline left out)."""
    cell = SCALE * SIZE[0] // GRID[1]
    inner = slice(cell // 4, cell - cell // 4)
    return np.stack([pixels[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell][inner, inner].reshape(-1, 3).mean(0)
                     for r in range(GRID[0]) for c in range(GRID[1])])


@pytest.fixture(scope="module")
def drawn():
    image = _scene()
    gen = torch.Generator().manual_seed(0)
    guidance = Guidance(torch.rand(2, 100, generator=gen), torch.rand(2, 100, generator=gen), count=5)
    figure = guidance_figure(image, SIZE, GRID, ["q one", "q two"], guidance, SCALE)
    view = _cell_means(np.asarray(_enlarged(model_view(image, SIZE), SCALE)).astype(np.float32))
    return figure, guidance, view


def test_the_figure_has_a_row_per_question_and_four_panels(drawn):
    figure, _, _ = drawn
    width, height = SIZE[0] * SCALE, SIZE[1] * SCALE + TITLE
    assert figure.size == (len(PANELS) * width + 3 * GAP, 2 * height + GAP)


@pytest.mark.parametrize("column,which", [(1, "pgp"), (3, "sgp")])
def test_kept_panels_light_exactly_the_top_scored_patches(drawn, column, which):
    figure, guidance, view = drawn
    for row in range(2):
        ratio = (_cell_means(_panel(figure, row, column)).sum(1) + 1) / (view.sum(1) + 1)
        lit = set(np.flatnonzero(ratio > 0.6).tolist())
        assert lit == set(guidance.kept(getattr(guidance, which))[row].tolist())
        assert np.all(ratio[ratio <= 0.6] < 0.35)                    # the rest dimmed to a quarter


@pytest.mark.parametrize("column,which", [(0, "pgp"), (2, "sgp")])
def test_heat_panels_show_the_scores_scaled_to_the_patches_range(drawn, column, which):
    """The red blend of each patch, read back from its pixels, is its score min-max scaled."""
    figure, guidance, view = drawn
    base = 0.35 * view[:, 0]
    for row in range(2):
        red = _cell_means(_panel(figure, row, column))[:, 0]
        alpha = (red - base) / (127.5 - 0.5 * base)
        scores = getattr(guidance, which)[row].numpy()
        expected = (scores - scores.min()) / (scores.max() - scores.min())
        np.testing.assert_allclose(alpha, expected, atol=0.03)


def test_the_command_draws_the_shipped_guides_scores(tmp_path):
    """End to end on toy-large: the PGP kept panel lights the shipped guide's top-5 patches."""
    from vlmprune import cli, toyworld
    from vlmprune.viz.command import _image
    from vlmprune.viz.guidance import guidance_scores
    from PIL import Image

    out = tmp_path / "g.png"
    questions = ["what colour is the star?", "how many squares are there?"]
    args = ["viz", "guidance", "--model", "toy-large", "--seed", "3", "--out", str(out)]
    for q in questions:
        args += ["--question", q]
    assert cli.main(args) == 0
    model, processor = toyworld.load("toy-large")
    expected = guidance_scores(model, processor, _image(None, 3)[0], questions, 0.05)
    figure = Image.open(out).convert("RGB")
    view = _cell_means(np.asarray(_enlarged(model_view(_image(None, 3)[0], SIZE), SCALE)).astype(np.float32))
    for row in range(2):
        ratio = (_cell_means(_panel(figure, row, 1)).sum(1) + 1) / (view.sum(1) + 1)
        assert set(np.flatnonzero(ratio > 0.6).tolist()) == set(expected.kept(expected.pgp)[row].tolist())
