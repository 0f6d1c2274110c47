"""IVTP+ (IVTP's ranking for part of each site's count, farthest-point spread for the rest), and the
IVTP settings it shares: the budget split between the stages and the instruction's "ASSISTANT:"."""
from types import SimpleNamespace

import pytest
import torch

from test_ivtp import _word_tokenizer, tiny_ivtp  # noqa: F401  (shared fixture and tokenizer builder)
from vlmprune.errors import VlmpruneError
from vlmprune.tokens import apply, from_spec
from vlmprune.tokens.methods.ivtp import IVTP, instruction_ids
from vlmprune.tokens.methods.ivtp_plus import IVTPPlus, farthest_points


def _cells(side):
    index = torch.arange(side * side)
    return torch.stack([index // side, index % side], -1)[None]


def test_farthest_points_on_a_hand_grid():
    # 4 x 4 grid, (0, 0) kept: the far corner, then the two other corners (distance 3 each; lower index first)
    assert farthest_points(_cells(4), torch.tensor([[0]]), 3).tolist() == [[15, 3, 12]]
    # from the centre-ish (1, 1) of a 5 x 5 grid: (4, 4) first, then nothing closer than 3 cells is left out
    picks = farthest_points(_cells(5), torch.tensor([[6]]), 4)[0].tolist()
    assert picks[0] == 24 and len(set(picks) | {6}) == 5
    kept = torch.tensor([6] + picks)
    cells = _cells(5)[0][kept].float()
    assert torch.cdist(cells, cells).add(torch.eye(5) * 99).amin() >= 2.0   # no two kept tokens adjacent
    assert farthest_points(_cells(4), torch.tensor([[0]]), 0).shape == (1, 0)


def test_settings():
    method = from_spec("ivtp_plus:keep=0.11,relevant=0.25,budget=equal")
    assert (method.keep, method.relevant, method.budget, method.spread_at) == (0.11, 0.25, "equal", "all")
    for bad in ("ivtp_plus:relevant=0", "ivtp_plus:relevant=1.5", "ivtp_plus:spread_at=first", "ivtp_plus:group=0",
                "ivtp_plus:relevent=0.5", "ivtp:budget=half", "ivtp:assistant=maybe"):
        with pytest.raises(VlmpruneError):
            from_spec(bad)


# ---------------------------------------------------------------- through the engine

def _method(tiny_ivtp, cls=IVTPPlus, **settings):
    _, _, clip, clip_tokenizer, tokenizer = tiny_ivtp
    return cls(clip=clip, clip_tokenizer=clip_tokenizer, tokenizer=tokenizer, tau=0.0, **settings)


def _decisions(model, inputs, method):
    """Logits and every site's (where, layer, sorted keep indices, original indices of the survivors)."""
    kept, reduce = [], method.reduce

    def recording(ctx):
        reduction = reduce(ctx)
        kept.append((ctx.site.where, ctx.site.layer, reduction.keep.sort(1).values,
                     ctx.original.gather(1, reduction.keep)))
        return reduction

    method.reduce = recording
    with apply(model, method), torch.no_grad():
        logits = model(**inputs).logits
    return logits, kept


def test_keep_all_is_dense(tiny_ivtp):
    model, make_inputs, *_ = tiny_ivtp
    inputs = make_inputs(text_lens=(5, 3))
    with torch.no_grad():
        dense = model(**inputs).logits
    logits, _ = _decisions(model, inputs, _method(tiny_ivtp, keep=16))
    assert torch.allclose(logits[:, -1], dense[:, -1], atol=1e-4)


def test_relevant_one_is_ivtp(tiny_ivtp):
    model, make_inputs, *_ = tiny_ivtp
    inputs = make_inputs(text_lens=(5, 3), seed=2)
    ivtp_logits, ivtp = _decisions(model, inputs, _method(tiny_ivtp, IVTP, keep=3))
    plus_logits, plus = _decisions(model, inputs, _method(tiny_ivtp, keep=3, relevant=1.0))
    assert [(w, l) for w, l, *_ in plus] == [(w, l) for w, l, *_ in ivtp] == [("vision", 3), ("llm", 3)]
    assert all(torch.equal(a[2], b[2]) for a, b in zip(plus, ivtp))
    assert torch.allclose(plus_logits, ivtp_logits, atol=1e-6)


def test_the_rest_of_the_count_is_spread_over_the_grid(tiny_ivtp):
    """Half of each site's count is IVTP's top (so IVTP's first site keeps it too), the other half
    lies farther from it on the 4 x 4 grid than IVTP's own next picks."""
    model, make_inputs, *_ = tiny_ivtp
    inputs = make_inputs(text_lens=(5, 3), seed=2)
    _, ivtp = _decisions(model, inputs, _method(tiny_ivtp, IVTP, keep=4, budget="equal"))
    _, plus = _decisions(model, inputs, _method(tiny_ivtp, keep=4, budget="equal", relevant=0.5))
    (_, _, ivtp_keep, ivtp_original), (_, _, plus_keep, plus_original) = ivtp[0], plus[0]
    count = plus_keep.shape[1]
    assert count == ivtp_keep.shape[1] == 10
    spread_total = ivtp_total = 0.0
    for b in range(2):
        relevant = set(plus_original[b, :5].tolist())
        assert relevant <= set(ivtp_original[b].tolist())
        spread, theirs = plus_original[b, 5:], [i for i in ivtp_original[b].tolist() if i not in relevant]
        cells = _cells(4)[0].float()

        def distance_to_relevant(indices):
            return torch.cdist(cells[list(indices)], cells[sorted(relevant)]).amin(1).sum().item()

        spread_total += distance_to_relevant(spread.tolist())
        ivtp_total += distance_to_relevant(theirs)
    assert spread_total > ivtp_total


def test_spread_at_last_leaves_the_earlier_sites_to_ivtp(tiny_ivtp):
    model, make_inputs, *_ = tiny_ivtp
    inputs = make_inputs(text_lens=(5, 3), seed=2)
    _, ivtp = _decisions(model, inputs, _method(tiny_ivtp, IVTP, keep=4))
    _, last = _decisions(model, inputs, _method(tiny_ivtp, keep=4, spread_at="last"))
    _, every = _decisions(model, inputs, _method(tiny_ivtp, keep=4))
    assert torch.equal(last[0][2], ivtp[0][2]) and not torch.equal(every[0][2], ivtp[0][2])


# ---------------------------------------------------------------- IVTP's settings

def test_budget_equal_removes_the_same_number_at_every_site(tiny_ivtp):
    model, make_inputs, *_ = tiny_ivtp
    inputs = make_inputs(text_lens=(5,))
    _, twice = _decisions(model, inputs, _method(tiny_ivtp, IVTP, keep=2))
    _, equal = _decisions(model, inputs, _method(tiny_ivtp, IVTP, keep=2, budget="equal"))
    assert [k[2].shape[1] for k in twice] == [4, 2]        # the 2n rule: the ViT stops at 2n
    assert [k[2].shape[1] for k in equal] == [9, 2]        # 16 -> 9 -> 2: seven removed at each


def test_instruction_leaves_out_a_trailing_assistant_prompt_when_asked():
    tokenizer = _word_tokenizer(["<unk>", "how", "many", "?", "assistant", ":", "<image>"])
    adapter = SimpleNamespace(image_token_mask=lambda ids: ids == 6)
    ids = torch.tensor([[6, 1, 2, 3, 4, 5, 0, 0], [6, 6, 1, 2, 4, 3, 4, 5]])      # padding is left out
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    assert [r.tolist() for r in instruction_ids(adapter, ids, mask)] == [[1, 2, 3, 4, 5], [1, 2, 4, 3, 4, 5]]
    # the last "assistant :" goes; an "assistant" inside the question stays
    assert [r.tolist() for r in instruction_ids(adapter, ids, mask, tokenizer)] == [[1, 2, 3], [1, 2, 4, 3]]
    plain = torch.tensor([[6, 1, 2, 3]])
    assert instruction_ids(adapter, plain, None, tokenizer)[0].tolist() == [1, 2, 3]


def test_assistant_false_changes_the_pseudo_cls_only_through_the_instruction(tiny_ivtp):
    """The tiny tokenizer knows no "assistant": leaving it out must change nothing there."""
    model, make_inputs, *_ = tiny_ivtp
    inputs = make_inputs(text_lens=(5, 3))
    with_prompt, _ = _decisions(model, inputs, _method(tiny_ivtp, IVTP, keep=4))
    without, _ = _decisions(model, inputs, _method(tiny_ivtp, IVTP, keep=4, assistant=False))
    assert torch.allclose(with_prompt, without, atol=1e-6)


def test_ivtp_plus_never_keeps_a_token_twice(tiny_ivtp):
    model, make_inputs, *_ = tiny_ivtp
    _, kept = _decisions(model, make_inputs(text_lens=(5, 3), seed=4), _method(tiny_ivtp, keep=5, relevant=0.3))
    for _, _, keep, _ in kept:
        assert (keep.diff(dim=1) > 0).all()
