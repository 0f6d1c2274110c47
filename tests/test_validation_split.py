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
