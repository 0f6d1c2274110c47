"""The toy-task harness: batched greedy answers, exact-match accuracy, retention, FLOPs and latency.

A result is a plain dict (the ``vlmprune eval --json`` contract)::

    {"model": name, "tokens": SPEC or None,
     "tasks": {task: {"accuracy": fraction, "n": items, "interval": [lo, hi], "correct": "0110..."}},
     "average": fraction, "average_interval": [lo, hi], "retention": percent or None,
     "flops": {"vision", "projector", "llm", "extra", "total"}, "prefill_ms": median}

``interval`` is a 95% Wilson interval; ``correct`` holds one 0/1 character per item in split order,
so two results on the same items can be compared item by item (see :mod:`.compare`). ``split`` is
``"test"`` (reports) or ``"validation"`` (choosing a method's settings without looking at the test items).

With a token method, retention is measured against the same model without it on the same items;
that dense result is cached on disk (see :mod:`.dense_cache`) so sweeps do not recompute it.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch

from .. import toyworld
from ..errors import VlmpruneError
from ..progress import progress as report_progress
from . import dense_cache
from .normalize import is_correct
from .retention import retention
from .statistics import mean_interval, outcome_string, wilson_interval

MAX_NEW_TOKENS = 5  # toy answers are one word (or a letter) and </s>
LATENCY_REPEATS = 5
SPLITS = ("test", "validation")


def resolve_tasks(tasks: str | Iterable[str] | None) -> list[str]:
    """Task names to run: all toy tasks when ``None``; a comma-separated string or a list otherwise."""
    if tasks is None:
        return list(toyworld.TASKS)
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    unknown = [t for t in names if t not in toyworld.TASKS]
    if unknown or not names:
        raise VlmpruneError(
            f"unknown task {unknown[0] if unknown else '(none given)'!r}; choose from: {', '.join(toyworld.TASKS)}")
    return names


def load_items(tasks: Sequence[str], limit: int | None, split: str = "test") -> dict[str, list]:
    """The first ``limit`` items of each task's fixed ``split`` (all of it when ``None``)."""
    if limit is not None and limit < 1:
        raise VlmpruneError(f"--limit must be at least 1, got {limit}")
    if split not in SPLITS:
        raise VlmpruneError(f"unknown split {split!r}; choose from: {', '.join(SPLITS)}")
    from ..toyworld.tasks import validation_split
    items = toyworld.test_split if split == "test" else validation_split
    return {task: list(items(task, limit)) for task in tasks}


def token_method(tokens: Any):
    """A token method from a SPEC string, an already built method, or ``None``."""
    if tokens is None or not isinstance(tokens, str):
        return tokens
    from .. import tokens as token_api
    return token_api.from_spec(tokens)


def model_inputs(processor, images: Sequence, questions: Sequence[str], device: torch.device,
                 dtype: torch.dtype) -> dict:
    """Processor outputs for a batch of (image, question), left padded so that generation appends at
    the same column for every sample."""
    tokenizer = processor.tokenizer
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        prompts = [toyworld.build_prompt(processor, question) for question in questions]
        inputs = processor(images=list(images), text=prompts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    inputs = inputs.to(device)
    if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return dict(inputs)


@torch.no_grad()
def generate_answers(model, processor, items: Sequence, batch_size: int = 32,
                     max_new_tokens: int = MAX_NEW_TOKENS, desc: str = "eval",
                     progress: bool = True) -> list[str]:
    """Greedy replies to each item's question, decoded without special tokens."""
    if batch_size < 1:
        raise VlmpruneError(f"--batch-size must be at least 1, got {batch_size}")
    tokenizer = processor.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    replies: list[str] = []
    starts = range(0, len(items), batch_size)
    for start in report_progress(starts, desc=desc, unit="batch", enabled=progress):
        batch = items[start:start + batch_size]
        inputs = model_inputs(processor, [item.image for item in batch], [item.question for item in batch],
                              model.device, model.dtype)
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=pad_id)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        replies.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return replies


def score(items_by_task: dict[str, list], replies: Sequence[str]) -> dict[str, dict]:
    """``{task: {"accuracy", "n", "interval", "correct"}}`` from replies given in the order of the items."""
    tasks: dict[str, dict] = {}
    position = 0
    for task, items in items_by_task.items():
        hits = [is_correct(reply, item.answer, item.options)
                for item, reply in zip(items, replies[position:position + len(items)])]
        position += len(items)
        accuracy = sum(hits) / len(items) if items else 0.0
        tasks[task] = {"accuracy": accuracy, "n": len(items), "interval": list(wilson_interval(accuracy, len(items))),
                       "correct": outcome_string(hits)}
    return tasks


def average(tasks: dict[str, dict]) -> float:
    """Unweighted mean of the per-task accuracies (each task counts the same, as in the papers)."""
    return sum(t["accuracy"] for t in tasks.values()) / len(tasks)


def average_interval(tasks: dict[str, dict]) -> list[float]:
    """The 95% interval of :func:`average` (see :func:`.statistics.mean_interval`)."""
    return list(mean_interval([t["accuracy"] for t in tasks.values()], [t["n"] for t in tasks.values()]))


def _cost(model, processor, method, sample) -> tuple[dict, float]:
    """Counted FLOPs by part (one prefill of ``sample``'s prompt at batch 1, on a meta-device copy of
    the architecture with ``method`` attached) and the median measured prefill latency in ms."""
    from ..measure import latency
    from ..measure.flops import count_flops
    from ..models import get_adapter
    from ..models.presets import Preset, default_image_size

    inputs = model_inputs(processor, [sample.image], [sample.question], model.device, model.dtype)
    is_image = get_adapter(model).image_token_mask(inputs["input_ids"])
    text_tokens = int((inputs["attention_mask"].bool() & ~is_image).sum())
    preset = Preset(getattr(model, "name_or_path", "") or "model", model.config, default_image_size(model.config))
    flops = count_flops(preset, text_tokens, method).flops.as_dict()
    prefill_ms = latency.prefill_ms(model, inputs, method, repeats=LATENCY_REPEATS)
    parts = {part: int(flops[part]) for part in ("vision", "projector", "llm", "extra")}
    return {**parts, "total": sum(parts.values())}, prefill_ms


def _accuracy(model, processor, method, items_by_task, batch_size, max_new_tokens, progress, desc):
    items = [item for task_items in items_by_task.values() for item in task_items]
    if method is None:
        replies = generate_answers(model, processor, items, batch_size, max_new_tokens, desc, progress)
    else:
        from .. import tokens as token_api
        with token_api.apply(model, method):
            replies = generate_answers(model, processor, items, batch_size, max_new_tokens, desc, progress)
    return score(items_by_task, replies)


def dense_accuracy(model, processor, items_by_task: dict[str, list], limit: int | None,
                   batch_size: int = 32, max_new_tokens: int = MAX_NEW_TOKENS,
                   progress: bool = True, split: str = "test") -> dict[str, dict]:
    """Per-task accuracy without token pruning, from the on-disk cache when this model has been run."""
    key = dense_cache.key(model, list(items_by_task), limit, max_new_tokens, split)
    cached = dense_cache.read(key)
    if cached is not None:
        return cached
    tasks = _accuracy(model, processor, None, items_by_task, batch_size, max_new_tokens, progress,
                      "eval dense")
    dense_cache.write(key, tasks)
    return tasks


def evaluate(model, processor, tokens=None, tasks=None, limit: int | None = None, *,
             batch_size: int = 32, max_new_tokens: int = MAX_NEW_TOKENS,
             reference: dict | None = None, measure: bool = True, progress: bool = True,
             model_name: str | None = None, split: str = "test") -> dict:
    """Evaluate ``model`` on the toy tasks, optionally with a token method (SPEC or object) attached.

    ``reference``: the ``"tasks"`` part of a dense result to compute retention against (a
    weight-pruned model against its original); by default, with a token method, the same model
    without it. ``measure=False`` skips FLOPs and latency (both are then ``None``). ``split``: the
    items, ``"test"`` or ``"validation"``.
    """
    method = token_method(tokens)
    names = resolve_tasks(tasks)
    items_by_task = load_items(names, limit, split)
    if method is None:
        per_task = dense_accuracy(model, processor, items_by_task, limit, batch_size, max_new_tokens,
                                  progress, split)
    else:
        per_task = _accuracy(model, processor, method, items_by_task, batch_size, max_new_tokens,
                             progress, f"eval {method.spec()}")
        if reference is None:
            reference = dense_accuracy(model, processor, items_by_task, limit, batch_size,
                                       max_new_tokens, progress, split)
    flops, prefill_ms = (None, None)
    if measure:
        flops, prefill_ms = _cost(model, processor, method, items_by_task[names[0]][0])
    return {
        "model": model_name or getattr(model, "name_or_path", "") or type(model).__name__,
        "tokens": tokens if isinstance(tokens, str) or method is None else method.spec(),
        "tasks": per_task,
        "average": average(per_task),
        "average_interval": average_interval(per_task),
        "retention": None if reference is None else retention(per_task, reference),
        "flops": flops,
        "prefill_ms": prefill_ms,
    }
