"""Hand-checkable cases for the shared scoring and selection math."""
import pytest
import torch

from vlmprune.errors import VlmpruneError
from vlmprune.tokens import scorers

A1 = torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
A2 = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.5, 0.0, 0.5]])


def _batch(*mats):
    return [m.unsqueeze(0) for m in mats]


def test_residual_rollout_of_two_known_matrices():
    # norm(A1 + I) = [[.75,.25,0],[0,1,0],[0,0,1]]; norm(A2 + I) = [[.5,0,.5],[0,1,0],[.25,0,.75]]
    # R = norm(A2+I) @ norm(A1+I): first row = .5*[.75,.25,0] + .5*[0,0,1]
    out = scorers.grouped_rollout(_batch(A1, A2), "residual")[0]
    assert torch.allclose(out[0], torch.tensor([0.375, 0.125, 0.5]))
    assert torch.allclose(out[2], torch.tensor([0.1875, 0.0625, 0.75]))
    assert torch.allclose(out.sum(-1), torch.ones(3))


def test_rollout_variants():
    pair = _batch(A1, A2)
    assert torch.allclose(scorers.grouped_rollout(pair, "multiply")[0, 0], torch.tensor([0.0, 0.0, 1.0]))
    assert torch.allclose(scorers.grouped_rollout(pair, "layer")[0], A2)
    assert torch.allclose(scorers.grouped_rollout(pair, "group-mean")[0, 0], torch.tensor([0.25, 0.25, 0.5]))
    # mean of norm(A+I) rows 0: ([.75,.25,0] + [.5,0,.5]) / 2
    assert torch.allclose(scorers.grouped_rollout(pair, "mean")[0, 0], torch.tensor([0.625, 0.125, 0.25]))
    # max of the same rows [.75,.25,.5], renormalised by 1.5
    assert torch.allclose(scorers.grouped_rollout(pair, "max")[0, 0], torch.tensor([0.5, 1 / 6, 1 / 3]))
    with pytest.raises(VlmpruneError):
        scorers.grouped_rollout(pair, "median")


def test_significance_weights_rollout_by_value_norm_over_candidates_only():
    row = torch.tensor([[0.4, 0.2, 0.2, 0.2]])          # position 0 is [CLS]
    values = torch.tensor([[[9.0, 0.0], [3.0, 4.0], [0.0, 1.0], [0.0, 2.0]]])   # norms 9, 5, 1, 2
    score = scorers.significance(row, values, torch.tensor([[1, 2, 3]]))
    assert torch.allclose(score, torch.tensor([[5 / 8, 1 / 8, 2 / 8]]))


def test_top_indices_is_stable_on_ties():
    assert scorers.top_indices(torch.tensor([[1.0, 3.0, 3.0, 2.0]]), 3).tolist() == [[1, 2, 3]]


def test_resolve_keep_counts_fractions_and_errors():
    assert scorers.resolve_keep(16, 100) == 16
    assert scorers.resolve_keep(0.11, 576) == 63
    assert scorers.resolve_keep(64.0, 576) == 64
    for bad in (0, 1.5, -3, 700, "x", True):
        with pytest.raises(VlmpruneError):
            scorers.resolve_keep(bad, 576)


def test_cosine_to_reference():
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]]])
    assert torch.allclose(scorers.cosine_to(tokens, torch.tensor([[3.0, 0.0]])), torch.tensor([[1.0, 0.0, -1.0]]))


def test_evit_fuses_inattentive_tokens_by_attention():
    tokens = torch.tensor([[[1.0], [2.0], [3.0], [4.0], [5.0]]])
    attention = torch.tensor([[0.1, 0.4, 0.05, 0.3, 0.15]])
    keep, hidden = scorers.evit_fuse(tokens, attention, 3)
    # kept: 1, 3; fused: tokens 4, 0, 2 weighted .15, .1, .05 -> (.75 + .1 + .15) / .3; slot of token 4
    assert keep.tolist() == [[1, 3, 4]]
    assert torch.allclose(hidden[0, :, 0], torch.tensor([2.0, 4.0, 1.0 / 0.3]))


def test_tome_merges_on_six_tokens():
    # A = tokens 0, 2, 4; B = tokens 1, 3, 5. 0 matches 1 and 2 matches 3 exactly (cos 1);
    # 4 matches 5 less well (cos .95), so r = 2 merges 0 -> 1 and 2 -> 3 and leaves 4.
    metric = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.5]]])
    tokens = torch.arange(6.0).view(1, 6, 1)
    sizes = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 3.0]])
    keep, hidden, new_sizes = scorers.bipartite_soft_matching(metric, tokens, sizes, 2)
    assert keep.tolist() == [[4, 1, 3, 5]]
    assert torch.allclose(hidden[0, :, 0], torch.tensor([4.0, 0.5, 2.5, 5.0]))
    assert new_sizes.tolist() == [[1.0, 2.0, 2.0, 3.0]]
    # size-weighted: merging token 4 (size 1) into token 5 (size 3) with r = 3
    _, hidden3, sizes3 = scorers.bipartite_soft_matching(metric, tokens, sizes, 3)
    assert torch.allclose(hidden3[0, :, 0], torch.tensor([0.5, 2.5, (4.0 + 15.0) / 4]))
    assert sizes3.tolist() == [[2.0, 2.0, 4.0]]


def test_divprune_picks_among_four_points():
    # Directions at 0, 10, 90 and 180 degrees: 180 is farthest from its nearest neighbour (90),
    # then 0 (farthest from 180), then 90 (90 degrees from both beats 10).
    angles = torch.tensor([0.0, 10.0, 90.0, 180.0]).deg2rad()
    points = torch.stack([angles.cos(), angles.sin()], -1).unsqueeze(0)
    assert scorers.max_min_diverse(points, 3).tolist() == [[3, 0, 2]]


def test_visionzip_dominant_plus_contextual():
    tokens = torch.arange(6.0).view(1, 6, 1)
    attention = torch.tensor([[0.5, 0.1, 0.1, 0.1, 0.1, 0.1]])
    keys = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 1.0]]])
    keep, hidden = scorers.visionzip_select(tokens, attention, keys, dominant=1, contextual=2)
    # rest = 1..5, step 2 -> targets 1 and 3; 2 joins 1, 4 and 5 join 3
    assert keep.tolist() == [[0, 1, 3]]
    assert torch.allclose(hidden[0, :, 0], torch.tensor([0.0, 1.0 + 2.0, 3.0 + 4.5]))


def test_spatial_pool_halves_a_grid_by_block_means():
    tokens = torch.arange(16.0).view(1, 16, 1)
    keep, hidden = scorers.spatial_pool(tokens, (4, 4), (2, 2))
    assert torch.allclose(hidden[0, :, 0], torch.tensor([2.5, 4.5, 10.5, 12.5]))
    assert keep.tolist() == [[5, 7, 13, 15]]


def test_schedules_follow_the_2n_rule():
    assert scorers.merge_schedule(10, 3, 3) == [7, 5, 3]
    vit, llm = scorers.ivtp_schedule(576, 64, 8, 4, threshold=128)
    assert vit[-1] == 128 and vit[0] == 576 - 56 and llm == [112, 96, 80, 64]
    vit, llm = scorers.ivtp_schedule(576, 192, 8, 4, threshold=128)
    assert vit == [544, 512, 480, 448, 416, 384, 352, 320] and llm == [288, 256, 224, 192]
    assert scorers.ivtp_schedule(576, 16, 8, 0, threshold=128) == (scorers.merge_schedule(576, 16, 8), [])


def test_square_grid():
    assert scorers.square_grid(576) == (24, 24)
    with pytest.raises(VlmpruneError):
        scorers.square_grid(10)


def test_group_ends():
    assert scorers.group_ends(23, 3) == [3, 6, 9, 12, 15, 18, 21, 23]
    assert scorers.group_ends(5, 3) == [3, 5]
    assert scorers.group_ends(12, 3) == [3, 6, 9, 12]
    assert scorers.group_ends(5, 100) == [5]


@pytest.mark.parametrize("variant", scorers.ROLLOUTS)
def test_rollout_row_equals_the_row_of_the_full_rollout(variant):
    torch.manual_seed(0)
    maps = {layer: torch.softmax(torch.randn(2, 5, 5), -1) for layer in (4, 5, 6)}
    maps[5][1, 2] = float("nan")   # a fully masked query row (softmax over no key)

    def attention(layer, rows=None):
        full = maps[layer]
        return full if rows is None else full.gather(1, rows[..., None].expand(-1, -1, 5))

    query = torch.tensor([0, 3])
    full = scorers.grouped_rollout([maps[4], maps[5], maps[6]], variant)
    expected = full[torch.arange(2), query]
    assert torch.allclose(scorers.grouped_rollout_row(attention, [4, 5, 6], query, variant), expected, atol=1e-6)
