"""The validation split: fixed, seeded, and sharing no scene with the test split."""
import pytest

from vlmprune.errors import VlmpruneError
from vlmprune.toyworld.tasks import test_split, validation_split


def _scene(item):
    return item.scene.objects, item.scene.background, item.scene.texture_seed


def test_validation_is_fixed_and_disjoint_from_the_test_split():
    items = validation_split("attribute")
    assert len(items) == 500
    assert [(i.question, _scene(i)) for i in validation_split("attribute", 10)] == \
        [(i.question, _scene(i)) for i in items[:10]]
    assert not {_scene(i) for i in items} & {_scene(i) for i in test_split("attribute")}
    assert all(item.task == "attribute" and item.answer == item.scene.find(item.question.split()[-1][:-1]).colour
               for item in items[:50])
    with pytest.raises(VlmpruneError):
        validation_split("attribute", 501)
    with pytest.raises(VlmpruneError):
        validation_split("nope")


def test_evaluate_reads_the_split_it_is_given_and_caches_each_apart(monkeypatch, tmp_path):
    import torch

    from vlmprune.eval import harness

    monkeypatch.setenv("VLMPRUNE_CACHE", str(tmp_path))
    asked = []

    def oracle(model, processor, items, *args, **kwargs):   # answers every item right, notes what it was asked
        asked.append([item.question for item in items])
        return [item.answer for item in items]

    monkeypatch.setattr(harness, "generate_answers", oracle)
    model = torch.nn.Linear(2, 2)
    for split, items in (("validation", validation_split), ("test", test_split)):
        result = harness.evaluate(model, None, tasks="counting", limit=30, measure=False, progress=False, split=split)
        assert asked[-1] == [item.question for item in items("counting", 30)]
        assert result["tasks"]["counting"]["correct"] == "1" * 30
    assert len(asked) == 2 and asked[0] != asked[1]      # the test run was not served the validation entry
    harness.evaluate(model, None, tasks="counting", limit=30, measure=False, progress=False, split="validation")
    assert len(asked) == 2                                # the validation entry is cached under its own key
    with pytest.raises(VlmpruneError, match="unknown split 'train'"):
        harness.load_items(["counting"], 5, "train")
