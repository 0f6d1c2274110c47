"""The toy world: generated VQA scenes and a miniature LLaVA stack trained on them from scratch.

``load("toy-large")`` gives a real ``LlavaForConditionalGeneration`` and ``LlavaProcessor``;
``test_split(task)`` the fixed test items; ``build_prompt`` the chat prompt for a question.
"""
from __future__ import annotations

import random
from pathlib import Path

from ..errors import VlmpruneError
from . import configs
from .processor import build_prompt
from .scenes import MAX_OBJECTS, render, sample_scene
from .tasks import TASKS, Item, test_split

__all__ = ["TASKS", "Item", "test_split", "build_prompt", "load", "load_clip", "checkpoint_dir", "calibration",
           "configs", "MODELS"]

MODELS = ("toy-large", "toy-small")
CLIP = "toy-clip"
CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"


def checkpoint_dir(name: str) -> Path:
    """Where the shipped checkpoint ``name`` (toy-large, toy-small or toy-clip) lives."""
    if name not in MODELS + (CLIP,):
        raise VlmpruneError(f"unknown toy model {name!r}; choose from {', '.join(MODELS + (CLIP,))}")
    path = CHECKPOINTS / name
    if not (path / "config.json").is_file():
        raise VlmpruneError(f"{path} has no checkpoint; run 'vlmprune toy train' and copy its output there")
    return path


def _resolve(name_or_dir: str) -> Path:
    if name_or_dir in MODELS:
        return checkpoint_dir(name_or_dir)
    path = Path(name_or_dir)
    if (path / "config.json").is_file():
        return path
    raise VlmpruneError(f"unknown toy model {name_or_dir!r}; choose from {', '.join(MODELS)} or a checkpoint directory")


def load(name: str):
    """(model, processor) in float32 and eval mode, for toy-large, toy-small or a saved directory."""
    import torch
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    path = _resolve(name)
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return model, LlavaProcessor.from_pretrained(path)


def load_clip():
    """(CLIPModel, its own subword tokenizer), float32, eval mode."""
    import torch
    from transformers import CLIPModel, PreTrainedTokenizerFast

    path = checkpoint_dir(CLIP)
    return CLIPModel.from_pretrained(path, dtype=torch.float32).eval(), PreTrainedTokenizerFast.from_pretrained(path)


def calibration(processor, n: int, seed: int = 0) -> list:
    """``n`` processor outputs (batch 1): an image with its long caption, the ShareGPT4V analogue."""
    if n < 1:
        raise VlmpruneError(f"calibration needs n >= 1 samples, got {n}")
    rng = random.Random(f"vlmprune-toy-calibration-{seed}")
    samples = []
    for _ in range(n):
        scene = sample_scene(rng, rng.randint(1, MAX_OBJECTS))
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image."}]},
            {"role": "assistant", "content": [{"type": "text", "text": scene.describe()}]},
        ]
        text = processor.apply_chat_template(messages)
        samples.append(processor(images=[render(scene)[0]], text=[text], return_tensors="pt"))
    return samples
