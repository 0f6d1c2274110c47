"""Drawing visual tokens over the image they came from: kept patches bright, dropped ones dimmed."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageOps


def model_view(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The image as a CLIP-style processor sees it: shortest side resized, centre cropped to ``size``
    (width, height), so patch (r, c) of the grid covers the same pixels here."""
    return ImageOps.fit(image.convert("RGB"), size, method=Image.Resampling.BICUBIC)


def _enlarged(image: Image.Image, scale: int) -> Image.Image:
    return image.convert("RGB").resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)


def _titled(image: Image.Image, title: str | None) -> Image.Image:
    if not title:
        return image
    canvas = Image.new("RGB", (image.width, image.height + 18), "white")
    canvas.paste(image, (0, 18))
    ImageDraw.Draw(canvas).text((4, 3), title, fill="black")
    return canvas


def kept_overlay(image: Image.Image, grid: tuple[int, int], kept: Sequence[int], scale: int = 6,
                 title: str | None = None) -> Image.Image:
    """``image`` enlarged ``scale`` times with the patches not in ``kept`` (row-major indices into the
    ``grid`` of (rows, cols)) darkened and the kept ones outlined."""
    rows, cols = grid
    big = _enlarged(image, scale)
    mask = np.zeros(rows * cols, dtype=bool)
    mask[list(kept)] = True
    cell_w, cell_h = big.width / cols, big.height / rows
    pixels = np.asarray(big).astype(np.float32)
    for index in np.flatnonzero(~mask):
        r, c = divmod(int(index), cols)
        y0, y1, x0, x1 = round(r * cell_h), round((r + 1) * cell_h), round(c * cell_w), round((c + 1) * cell_w)
        pixels[y0:y1, x0:x1] *= 0.25
    out = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for index in np.flatnonzero(mask):
        r, c = divmod(int(index), cols)
        draw.rectangle([c * cell_w, r * cell_h, (c + 1) * cell_w - 1, (r + 1) * cell_h - 1],
                       outline=(255, 215, 0), width=max(1, scale // 3))
    return _titled(out, title)


def heat_overlay(image: Image.Image, grid: tuple[int, int], values: Sequence[float], scale: int = 6,
                 title: str | None = None) -> Image.Image:
    """``image`` enlarged with a per-patch value (row-major over ``grid``) blended in as a red heat map,
    scaled to [0, 1] over the patches."""
    rows, cols = grid
    big = _enlarged(image, scale)
    heat = np.asarray(values, dtype=np.float32).reshape(rows, cols)
    span = float(heat.max() - heat.min())
    heat = (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)
    heat_img = Image.fromarray((heat * 255).astype(np.uint8)).resize(big.size, Image.Resampling.NEAREST)
    alpha = np.asarray(heat_img, dtype=np.float32)[..., None] / 255.0
    red = np.zeros((big.height, big.width, 3), dtype=np.float32)
    red[..., 0] = 255.0
    base = np.asarray(big, dtype=np.float32) * 0.35
    out = Image.fromarray((base * (1 - alpha) + (0.5 * base + 0.5 * red) * alpha).clip(0, 255).astype(np.uint8))
    return _titled(out, title)
