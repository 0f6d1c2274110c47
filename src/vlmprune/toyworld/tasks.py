"""The six toy tasks, their fixed test splits, and the captions used for pre-training.

Every question is asked about a :class:`~vlmprune.toyworld.scenes.Scene` and answered from the scene's
own data, so answers are correct by construction (the tests re-derive them independently).
"""
from __future__ import annotations

import functools
import random
from dataclasses import dataclass

from PIL import Image

from ..errors import VlmpruneError
from .scenes import COLOURS, MAX_OBJECTS, SHAPES, Scene, render, sample_scene

TASKS = ("existence", "attribute", "counting", "spatial", "reading", "choice")
TEST_SIZE = 500
TEST_OBJECTS = (2, MAX_OBJECTS)
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
OPTION_LETTERS = ("A", "B", "C", "D")
SPATIAL_MARGIN = 10.0  # pixels between centres along the asked axis


@dataclass
class Item:
    task: str
    image: Image.Image
    question: str
    answer: str
    options: list[str] | None
    scene: Scene


def _existence(scene: Scene, rng: random.Random):
    present = {(o.colour, o.shape) for o in scene.objects}
    if rng.random() < 0.5:
        obj = rng.choice(scene.objects)
        return f"is there a {obj.colour} {obj.shape}?", "yes", None
    colours = {o.colour for o in scene.objects}
    shapes = {o.shape for o in scene.objects}
    # POPE-style adversarial negatives: a colour and a shape that are both in the scene, but apart.
    swapped = [(c, s) for c in colours for s in shapes if (c, s) not in present]
    near = [(c, s) for c in COLOURS for s in shapes if c not in colours] + \
           [(c, s) for c in colours for s in SHAPES if s not in shapes]
    pool = swapped if swapped and rng.random() < 0.6 else near
    colour, shape = rng.choice(sorted(pool))
    return f"is there a {colour} {shape}?", "no", None


def _attribute(scene: Scene, rng: random.Random):
    obj = rng.choice(scene.objects)
    template = rng.choice(("what colour is the {}?", "what is the colour of the {}?"))
    return template.format(obj.shape), obj.colour, None


def _counting(scene: Scene, rng: random.Random):
    if rng.random() < 0.5:
        return "how many objects are there?", NUMBER_WORDS[len(scene.objects)], None
    colours = sorted({o.colour for o in scene.objects})
    colour = rng.choice(colours) if rng.random() < 0.8 else rng.choice(sorted(set(COLOURS) - set(colours)))
    count = sum(o.colour == colour for o in scene.objects)
    return f"how many {colour} objects are there?", NUMBER_WORDS[count], None


def _spatial(scene: Scene, rng: random.Random):
    pairs = []
    for a in scene.objects:
        for b in scene.objects:
            if a is b:
                continue
            if abs(a.x - b.x) >= SPATIAL_MARGIN:
                pairs.append((a, b, "left of" if a.x < b.x else "right of", ("left of", "right of")))
            if abs(a.y - b.y) >= SPATIAL_MARGIN:
                pairs.append((a, b, "above" if a.y < b.y else "below", ("above", "below")))
    if not pairs:
        return None
    a, b, truth, relations = rng.choice(pairs)
    relation = rng.choice(relations)
    return f"is the {a.shape} {relation} the {b.shape}?", "yes" if relation == truth else "no", None


def _reading(scene: Scene, rng: random.Random):
    carriers = [o for o in scene.objects if o.glyph]
    if not carriers:
        return None
    obj = rng.choice(carriers)
    return f"what number is on the {obj.shape}?", obj.glyph, None


def _choice(scene: Scene, rng: random.Random):
    colour_counts = {c: sum(o.colour == c for o in scene.objects) for c in COLOURS}
    unique = [o for o in scene.objects if colour_counts[o.colour] == 1]
    if unique and rng.random() < 0.5:
        obj = rng.choice(unique)
        stem, truth, pool = f"which shape is {obj.colour}?", obj.shape, SHAPES
    else:
        obj = rng.choice(scene.objects)
        stem, truth, pool = f"what colour is the {obj.shape}?", obj.colour, tuple(COLOURS)
    options = rng.sample([v for v in pool if v != truth], len(OPTION_LETTERS) - 1) + [truth]
    rng.shuffle(options)
    listed = " ".join(f"{letter}. {option}" for letter, option in zip(OPTION_LETTERS, options))
    answer = OPTION_LETTERS[options.index(truth)].lower()
    return f"{stem} {listed} answer with the letter.", answer, options


_ASKERS = {
    "existence": _existence,
    "attribute": _attribute,
    "counting": _counting,
    "spatial": _spatial,
    "reading": _reading,
    "choice": _choice,
}


def ask(task: str, scene: Scene, rng: random.Random) -> tuple[str, str, list[str] | None] | None:
    """(question, answer, options) about ``scene``, or None when the scene cannot pose this task."""
    if task not in _ASKERS:
        raise VlmpruneError(f"unknown toy task {task!r}; choose from {', '.join(TASKS)}")
    return _ASKERS[task](scene, rng)


def sample_item(task: str, rng: random.Random, n_objects: int) -> Item:
    """A fresh item whose scene has exactly ``n_objects`` objects."""
    while True:
        scene = sample_scene(rng, n_objects, glyph_rate=0.9 if task == "reading" else 0.5)
        posed = ask(task, scene, rng)
        if posed is not None:
            image, _ = render(scene)
            return Item(task, image, *posed, scene=scene)


@functools.lru_cache(maxsize=None)
def _test_items(task: str) -> tuple[Item, ...]:
    rng = random.Random(f"vlmprune-toy-test-{task}")
    return tuple(sample_item(task, rng, rng.randint(*TEST_OBJECTS)) for _ in range(TEST_SIZE))


def test_split(task: str, n: int | None = None) -> list[Item]:
    """The fixed, seeded test items of ``task`` (the first ``n`` of them when given)."""
    if task not in TASKS:
        raise VlmpruneError(f"unknown toy task {task!r}; choose from {', '.join(TASKS)}")
    if n is not None and not 1 <= n <= TEST_SIZE:
        raise VlmpruneError(f"n must be between 1 and {TEST_SIZE}, got {n}")
    return list(_test_items(task)[: n or TEST_SIZE])


test_split.__test__ = False  # a data accessor, not a test, when imported into a test module

VALIDATION_SIZE = 500


def _scene_key(scene: Scene) -> tuple:
    return scene.objects, scene.background, scene.texture_seed


@functools.lru_cache(maxsize=None)
def _validation_items(task: str) -> tuple[Item, ...]:
    rng = random.Random(f"vlmprune-toy-method-validation-{task}")
    test_scenes = {_scene_key(item.scene) for item in _test_items(task)}
    items: list[Item] = []
    while len(items) < VALIDATION_SIZE:
        item = sample_item(task, rng, rng.randint(*TEST_OBJECTS))
        if _scene_key(item.scene) not in test_scenes:
            items.append(item)
    return tuple(items)


def validation_split(task: str, n: int | None = None) -> list[Item]:
    """Fixed, seeded items of ``task`` for choosing a method's settings, so that the test split only
    reports (the first ``n`` when given). Drawn like the test split from a seed of their own, and no
    scene of the test split is among them."""
    if task not in TASKS:
        raise VlmpruneError(f"unknown toy task {task!r}; choose from {', '.join(TASKS)}")
    if n is not None and not 1 <= n <= VALIDATION_SIZE:
        raise VlmpruneError(f"n must be between 1 and {VALIDATION_SIZE}, got {n}")
    return list(_validation_items(task)[: n or VALIDATION_SIZE])


def caption(scene: Scene, rng: random.Random) -> str:
    """A training caption naming each object in random order, binding names both ways.

    "the triangle is red" asks for the colour at the triangle; "the red one is a triangle" asks for the
    shape at the red patches: both directions of lookup by name are rewarded.
    """
    colour_counts = {c: sum(o.colour == c for o in scene.objects) for c in COLOURS}
    sentences = []
    objects = list(scene.objects)
    rng.shuffle(objects)
    for obj in objects:
        forms = [f"the {obj.shape} is {obj.colour}", f"there is a {obj.size} {obj.colour} {obj.shape}"]
        if colour_counts[obj.colour] == 1:
            forms.append(f"the {obj.colour} one is a {obj.shape}")
        sentence = rng.choice(forms)
        if obj.glyph:
            sentence += rng.choice((f" with {obj.glyph} on it", f" . the {obj.shape} shows {obj.glyph}"))
        sentences.append(sentence)
    if len(objects) >= 2 and rng.random() < 0.5:
        a, b = rng.sample(objects, 2)
        if abs(a.x - b.x) >= SPATIAL_MARGIN:
            sentences.append(f"the {a.shape} is {'left of' if a.x < b.x else 'right of'} the {b.shape}")
    count = len(objects)
    lead = f"there {'is' if count == 1 else 'are'} {NUMBER_WORDS[count]} {'object' if count == 1 else 'objects'}"
    if rng.random() < 0.5:
        sentences.insert(0, lead)
    else:
        sentences.append(lead)
    return " . ".join(sentences) + " ."
