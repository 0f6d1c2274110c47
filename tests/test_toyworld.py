"""The toy world's data: determinism, answers re-derived from the scenes, tokenizers and the processor."""
from __future__ import annotations

import random
import re

import numpy as np
import pytest

from vlmprune.errors import VlmpruneError
from vlmprune.toyworld import TASKS, build_prompt, calibration, test_split
from vlmprune.toyworld.processor import build_processor
from vlmprune.toyworld.scenes import COLOURS, GRID, SHAPES, patch_labels, render, sample_scene
from vlmprune.toyworld.tasks import NUMBER_WORDS, TEST_SIZE, caption
from vlmprune.toyworld.tokenizers import build_clip_tokenizer, build_llm_tokenizer, corpus
from vlmprune.toyworld.train import SequenceBuilder, token_concepts


@pytest.fixture(scope="module")
def texts():
    return corpus()


@pytest.fixture(scope="module")
def processor(texts):
    return build_processor(build_llm_tokenizer(texts))


def test_generators_are_deterministic():
    first, second = test_split("attribute", 8), test_split("attribute", 8)
    assert [(i.question, i.answer) for i in first] == [(i.question, i.answer) for i in second]
    a = sample_scene(random.Random(3), 4)
    b = sample_scene(random.Random(3), 4)
    assert a == b
    assert np.array_equal(np.asarray(render(a)[0]), np.asarray(render(b)[0]))
    assert sample_scene(random.Random(4), 4) != a


def _expected_answer(item) -> str:
    """The answer re-derived from the scene with parsing of the question, independent of the generator."""
    scene, q = item.scene, item.question
    if item.task == "existence":
        colour, shape = re.fullmatch(r"is there a (\w+) (\w+)\?", q).groups()
        return "yes" if any(o.colour == colour and o.shape == shape for o in scene.objects) else "no"
    if item.task == "attribute":
        shape = re.search(r"the (\w+)\?$", q).group(1)
        return scene.find(shape).colour
    if item.task == "counting":
        colour = re.fullmatch(r"how many (?:(\w+) )?objects are there\?", q).group(1)
        return NUMBER_WORDS[sum(colour in (None, o.colour) for o in scene.objects)]
    if item.task == "spatial":
        a, relation, b = re.fullmatch(r"is the (\w+) (left of|right of|above|below) the (\w+)\?", q).groups()
        a, b = scene.find(a), scene.find(b)
        truth = {"left of": a.x < b.x, "right of": a.x > b.x, "above": a.y < b.y, "below": a.y > b.y}[relation]
        return "yes" if truth else "no"
    if item.task == "reading":
        return scene.find(re.search(r"on the (\w+)\?$", q).group(1)).glyph
    if item.task == "choice":
        listed = re.findall(r"([A-D])\. (\w+)", q)
        assert [option for _, option in listed] == item.options
        if q.startswith("which shape"):
            colour = re.match(r"which shape is (\w+)\?", q).group(1)
            truth = [o.shape for o in scene.objects if o.colour == colour]
            assert len(truth) == 1
            truth = truth[0]
        else:
            truth = scene.find(re.match(r"what colour is the (\w+)\?", q).group(1)).colour
        return next(letter for letter, option in listed if option == truth).lower()
    raise AssertionError(item.task)


@pytest.mark.parametrize("task", TASKS)
def test_every_answer_follows_from_its_scene(task):
    items = test_split(task)
    assert len(items) == TEST_SIZE >= 500
    for item in items[:150]:
        assert item.answer == _expected_answer(item), item.question
        assert item.image.mode == "RGB" and item.image.size == (80, 80)
        assert len({o.shape for o in item.scene.objects}) == len(item.scene.objects)
    answers = [item.answer for item in items]
    assert len(set(answers)) >= 2
    if task in ("existence", "spatial"):
        assert 0.35 < answers.count("yes") / len(answers) < 0.65


def test_adversarial_negatives_use_what_is_in_the_scene():
    negatives = [i for i in test_split("existence") if i.answer == "no"]
    swapped = 0
    for item in negatives:
        colour, shape = re.fullmatch(r"is there a (\w+) (\w+)\?", item.question).groups()
        swapped += colour in {o.colour for o in item.scene.objects} and shape in {o.shape for o in item.scene.objects}
    assert swapped / len(negatives) > 0.3


def test_rendering_matches_the_description():
    rng = random.Random(0)
    for _ in range(30):
        scene = sample_scene(rng, rng.randint(1, 5))
        image, index_map = render(scene)
        pixels = np.asarray(image)
        for i, obj in enumerate(scene.objects):
            x, y = int(obj.x), int(obj.y)
            assert index_map[y, x] == i + 1
            if not obj.glyph:
                assert tuple(pixels[y, x]) == COLOURS[obj.colour]
        labels = patch_labels(scene, index_map)
        assert labels["centre"].sum() == len(scene.objects)
        shape_ids = set(labels["shape"].tolist()) - {0}
        assert shape_ids <= {SHAPES.index(o.shape) + 1 for o in scene.objects}
        assert labels["row"].shape == (GRID * GRID,)


def test_unknown_task_and_bad_n_are_user_errors():
    with pytest.raises(VlmpruneError):
        test_split("nope")
    with pytest.raises(VlmpruneError):
        test_split("counting", n=0)


def test_llm_tokenizer_round_trips_every_question(processor):
    tok = processor.tokenizer
    for task in TASKS:
        for item in test_split(task, 40):
            ids = tok(item.question, add_special_tokens=False)["input_ids"]
            assert tok.unk_token_id not in ids
            assert tok.decode(ids) == item.question.lower()
            assert tok.decode(tok(item.answer, add_special_tokens=False)["input_ids"]) == item.answer


def test_clip_tokenizer_is_subword_with_offsets(texts):
    tok = build_clip_tokenizer(texts)
    text = "the diamond shows 7 and the triangle is orange"
    enc = tok(text, return_offsets_mapping=True)
    tokens = tok.convert_ids_to_tokens(enc["input_ids"])
    assert tokens[0] == tok.bos_token and tokens[-1] == tok.eos_token
    assert len(tokens) - 2 > len(text.split())  # some word is split into pieces
    for token, (start, end) in zip(tokens[1:-1], enc["offset_mapping"][1:-1]):
        assert token.replace("</w>", "") == text[start:end]
    assert tok.decode(enc["input_ids"], skip_special_tokens=True) == text
    assert tok.eos_token_id != 2  # CLIP pools at the first EOS only when its id is not the legacy 2


def test_token_concepts_label_content_words(texts):
    tok = build_clip_tokenizer(texts)
    text = "what colour is the triangle?"
    enc = tok(text, return_offsets_mapping=True)
    labels = token_concepts([tuple(o) for o in enc["offset_mapping"]], text)
    pieces = tok.convert_ids_to_tokens(enc["input_ids"])
    assert labels[0] == labels[-1] == -2
    assert all((lab >= 0) == piece.startswith("tri") or "angle" in piece for piece, lab in zip(pieces[1:-1], labels[1:-1]))


def test_processor_expands_the_image_and_training_ids_match(processor):
    item = test_split("spatial", 1)[0]
    prompt = build_prompt(processor, item.question)
    assert prompt.startswith("USER: <image>") and prompt.endswith("ASSISTANT:")
    inputs = processor(images=[item.image], text=[prompt], return_tensors="pt")
    assert (inputs["input_ids"] == processor.image_token_id).sum().item() == GRID * GRID
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 80, 80)
    ids, labels = SequenceBuilder(processor).conversation([(item.question, item.answer)])
    prompt_ids = inputs["input_ids"][0].tolist()
    assert ids[: len(prompt_ids)] == prompt_ids
    assert processor.tokenizer.decode(ids[len(prompt_ids):], skip_special_tokens=True) == item.answer
    assert labels[: len(prompt_ids)] == [-100] * len(prompt_ids)


def test_calibration_samples_are_image_plus_long_caption(processor):
    samples = calibration(processor, n=3)
    assert len(samples) == 3
    for sample in samples:
        assert sample["input_ids"].shape[0] == 1
        assert (sample["input_ids"] == processor.image_token_id).sum().item() == GRID * GRID
        text = processor.tokenizer.decode(sample["input_ids"][0], skip_special_tokens=True)
        assert "from left to right" in text
    with pytest.raises(VlmpruneError):
        calibration(processor, n=0)


def test_captions_name_every_object():
    rng = random.Random(5)
    for _ in range(20):
        scene = sample_scene(rng, rng.randint(1, 5))
        text = caption(scene, rng)
        assert all(o.shape in text for o in scene.objects)
        assert all(o.shape in scene.describe() and o.colour in scene.describe() for o in scene.objects)
