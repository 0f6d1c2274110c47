"""The toy models' quality figures: dense accuracy per task on the test split and CLIP text relevance.

``python -m vlmprune.toyworld.quality [--limit N]`` prints both, as recorded in docs/TOYWORLD.md.
"""
from __future__ import annotations

import argparse
import json
import re

import torch

from ..tokens.text_relevance import clip_token_relevance
from .scenes import COLOURS, GLYPHS, SHAPES
from .tasks import TASKS, test_split
from .train import accuracy_by_task, pixel_values

OBJECT_WORDS = frozenset(COLOURS) | frozenset(SHAPES) | frozenset(GLYPHS)
FUNCTION_WORDS = frozenset({"is", "the", "a", "what", "there", "of", "on", "how", "many", "are", "which", "with"})


def _mean_score(offsets, scores, text: str, words: frozenset) -> float | None:
    spans = [(m.start(), m.end()) for m in re.finditer(r"\w+", text) if m.group() in words]
    picked = [float(s) for (start, _), s in zip(offsets, scores) if any(a <= start < b for a, b in spans)]
    return sum(picked) / len(picked) if picked else None


def relevance_figure(clip, clip_tokenizer, items) -> float:
    """Fraction of questions naming an object whose object words have a higher mean CLIP relevance
    (IVTP Eq. 6, against the question's own image) than its function words."""
    wins = total = 0
    for start in range(0, len(items), 64):
        chunk = items[start:start + 64]
        results = clip_token_relevance(clip, clip_tokenizer, pixel_values([it.image for it in chunk]),
                                       [it.question for it in chunk])
        for item, (offsets, scores) in zip(chunk, results):
            objects = _mean_score(offsets, scores, item.question, OBJECT_WORDS)
            function = _mean_score(offsets, scores, item.question, FUNCTION_WORDS)
            if objects is not None and function is not None:
                wins += objects > function
                total += 1
    return wins / total


def main(argv: list[str] | None = None) -> None:
    from . import load, load_clip

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--limit", type=int, default=None, help="test items per task (default: all 500)")
    parser.add_argument("--models", default="toy-large,toy-small")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    items = [item for task in TASKS for item in test_split(task, args.limit)]
    clip, clip_tokenizer = load_clip()
    naming = [item for item in items if item.task != "counting" or re.search(r"many (\w+) objects", item.question)]
    report = {"clip_relevance_object_over_function_words": relevance_figure(clip, clip_tokenizer, naming)}
    for name in filter(None, args.models.split(",")):
        model, processor = load(name)
        acc = accuracy_by_task(model, processor, items)
        report[name] = {"tasks": acc, "average": sum(acc.values()) / len(acc)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
