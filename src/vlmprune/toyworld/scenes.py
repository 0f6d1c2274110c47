"""Procedural scenes: coloured shapes, some carrying a digit, on a lightly textured background.

A scene is plain data (:class:`Scene`); :func:`render` draws it and also returns the per-pixel object
map, from which :func:`patch_labels` derives free per-patch supervision for the vision tower.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 80
PATCH_SIZE = 8
GRID = IMAGE_SIZE // PATCH_SIZE
MAX_OBJECTS = 5

COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 80, 225),
    "yellow": (235, 215, 40),
    "purple": (150, 55, 190),
    "orange": (245, 140, 25),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
SIZES = {"small": 7, "large": 11}
GLYPHS = ("1", "2", "3", "4", "5", "6", "7", "8", "9")
# Objects that can carry a glyph: large and with a solid centre that holds a 9x15 digit (a diamond's
# does not). Digits drawn at 2x scale (6x10 pixels, under one 8-pixel patch wide) were readable from
# the trained tower's features in only 57% of objects.
GLYPH_SHAPES = ("circle", "square")
GLYPH_SCALE = 3

# 3x5 bitmaps of the digits, drawn at GLYPH_SCALE (9x15 pixels).
_DIGIT_BITMAPS = {
    "1": ("010", "110", "010", "010", "111"),
    "2": ("111", "001", "111", "100", "111"),
    "3": ("111", "001", "111", "001", "111"),
    "4": ("101", "101", "111", "001", "001"),
    "5": ("111", "100", "111", "001", "111"),
    "6": ("111", "100", "111", "101", "111"),
    "7": ("111", "001", "010", "010", "010"),
    "8": ("111", "101", "111", "101", "111"),
    "9": ("111", "101", "111", "001", "111"),
}


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    x: float
    y: float
    glyph: str | None = None

    @property
    def radius(self) -> int:
        return SIZES[self.size]


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: int  # grey level of the background
    texture_seed: int = field(default=0)

    def find(self, shape: str) -> SceneObject | None:
        """Shapes are distinct within a scene, so a shape name picks at most one object."""
        for obj in self.objects:
            if obj.shape == shape:
                return obj
        return None

    def describe(self) -> str:
        """Every object, left to right, with all its attributes: the long caption."""
        parts = []
        for obj in sorted(self.objects, key=lambda o: o.x):
            text = f"a {obj.size} {obj.colour} {obj.shape}"
            if obj.glyph:
                text += f" with {obj.glyph} on it"
            parts.append(text)
        count = len(self.objects)
        noun = "object" if count == 1 else "objects"
        return f"{count} {noun} from left to right : " + " , ".join(parts) + " ."


def sample_scene(rng: random.Random, n_objects: int, glyph_rate: float = 0.5) -> Scene:
    """Distinct shapes, non-overlapping, at free positions; the number of objects is exact."""
    if not 1 <= n_objects <= MAX_OBJECTS:
        raise ValueError(f"n_objects must be in [1, {MAX_OBJECTS}]")
    while True:
        shapes = rng.sample(SHAPES, n_objects)
        placed: list[SceneObject] = []
        for shape in shapes:
            size = rng.choice(tuple(SIZES))
            radius = SIZES[size]
            glyph = None
            if shape in GLYPH_SHAPES and size == "large" and rng.random() < glyph_rate:
                glyph = rng.choice(GLYPHS)
            for _ in range(60):
                x = rng.uniform(radius + 1, IMAGE_SIZE - radius - 1)
                y = rng.uniform(radius + 1, IMAGE_SIZE - radius - 1)
                if all(math.hypot(x - o.x, y - o.y) > radius + o.radius + 3 for o in placed):
                    placed.append(SceneObject(shape, rng.choice(tuple(COLOURS)), size, x, y, glyph))
                    break
            else:
                break
        if len(placed) == n_objects:
            return Scene(tuple(placed), background=rng.randint(105, 150), texture_seed=rng.randrange(2**31))


def _outline(obj: SceneObject) -> list[tuple[float, float]] | None:
    """Polygon vertices for the polygonal shapes; None for the circle."""
    x, y, r = obj.x, obj.y, obj.radius
    if obj.shape == "square":
        s = r * 0.85
        return [(x - s, y - s), (x + s, y - s), (x + s, y + s), (x - s, y + s)]
    if obj.shape == "triangle":
        return [(x, y - r), (x + r * 0.95, y + r * 0.75), (x - r * 0.95, y + r * 0.75)]
    if obj.shape == "diamond":
        return [(x, y - r), (x + r, y), (x, y + r), (x - r, y)]
    if obj.shape == "cross":
        a, b = r * 0.35, r
        return [(x - a, y - b), (x + a, y - b), (x + a, y - a), (x + b, y - a), (x + b, y + a), (x + a, y + a),
                (x + a, y + b), (x - a, y + b), (x - a, y + a), (x - b, y + a), (x - b, y - a), (x - a, y - a)]
    if obj.shape == "star":
        points = []
        for k in range(10):
            angle = -math.pi / 2 + k * math.pi / 5
            radius = r if k % 2 == 0 else r * 0.45
            points.append((x + radius * math.cos(angle), y + radius * math.sin(angle)))
        return points
    return None


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, fill) -> None:
    outline = _outline(obj)
    if outline is None:
        r = obj.radius
        draw.ellipse([obj.x - r, obj.y - r, obj.x + r, obj.y + r], fill=fill)
    else:
        draw.polygon(outline, fill=fill)


def _draw_glyph(draw: ImageDraw.ImageDraw, obj: SceneObject) -> None:
    r, g, b = COLOURS[obj.colour]
    ink = (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)
    left, top = round(obj.x) - 3 * GLYPH_SCALE // 2, round(obj.y) - 5 * GLYPH_SCALE // 2
    for row, bits in enumerate(_DIGIT_BITMAPS[obj.glyph]):
        for col, bit in enumerate(bits):
            if bit == "1":
                x0, y0 = left + GLYPH_SCALE * col, top + GLYPH_SCALE * row
                draw.rectangle([x0, y0, x0 + GLYPH_SCALE - 1, y0 + GLYPH_SCALE - 1], fill=ink)


def render(scene: Scene) -> tuple[Image.Image, np.ndarray]:
    """The RGB image and an (H, W) uint8 map holding 1 + the index of the object at each pixel (0: none)."""
    noise = np.random.default_rng(scene.texture_seed).integers(-9, 10, size=(IMAGE_SIZE, IMAGE_SIZE, 1))
    base = np.clip(scene.background + noise, 0, 255).astype(np.uint8).repeat(3, axis=2)
    image = Image.fromarray(base, "RGB")
    index_map = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw, draw_index = ImageDraw.Draw(image), ImageDraw.Draw(index_map)
    for i, obj in enumerate(scene.objects):
        _draw_object(draw, obj, COLOURS[obj.colour])
        _draw_object(draw_index, obj, i + 1)
        if obj.glyph:
            _draw_glyph(draw, obj)
    return image, np.asarray(index_map)


# Per-patch label heads: name -> number of classes (class 0 is "background" / "none").
PATCH_LABELS = {
    "colour": len(COLOURS) + 1,
    "shape": len(SHAPES) + 1,
    "glyph": len(GLYPHS) + 1,
    "centre": 2,
    "row": GRID,
    "col": GRID,
}


def patch_labels(scene: Scene, index_map: np.ndarray) -> dict[str, np.ndarray]:
    """Free supervision for each of the GRID x GRID patches, in raster order.

    A patch belongs to the object covering most of its pixels (at least 6 of 64). Every patch of an
    object carries the object's colour, shape and glyph, so a single patch suffices to read them; the
    patch holding the object's centre is marked, which makes objects countable patch by patch.
    """
    n = len(scene.objects)
    blocks = index_map.reshape(GRID, PATCH_SIZE, GRID, PATCH_SIZE).transpose(0, 2, 1, 3).reshape(GRID * GRID, -1)
    counts = np.stack([(blocks == i + 1).sum(axis=1) for i in range(n)], axis=1)
    owner = np.where(counts.max(axis=1) >= 6, counts.argmax(axis=1) + 1, 0)
    colour_ids = {c: i + 1 for i, c in enumerate(COLOURS)}
    shape_ids = {s: i + 1 for i, s in enumerate(SHAPES)}
    glyph_ids = {g: i + 1 for i, g in enumerate(GLYPHS)}
    table = np.zeros((n + 1, 3), dtype=np.int64)
    for i, obj in enumerate(scene.objects):
        table[i + 1] = (colour_ids[obj.colour], shape_ids[obj.shape], glyph_ids.get(obj.glyph, 0))
    centre = np.zeros(GRID * GRID, dtype=np.int64)
    for obj in scene.objects:
        centre[min(int(obj.y) // PATCH_SIZE, GRID - 1) * GRID + min(int(obj.x) // PATCH_SIZE, GRID - 1)] = 1
    positions = np.arange(GRID * GRID)
    return {
        "colour": table[owner, 0],
        "shape": table[owner, 1],
        "glyph": table[owner, 2],
        "centre": centre,
        "row": positions // GRID,
        "col": positions % GRID,
    }
