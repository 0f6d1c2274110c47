"""Retraining mode, IVTP's Table 3 analogue: fine-tune toy-large dense and with IVTP in the loop for the
same steps on the same batches, then compare step time, memory and accuracy.

    .venv/bin/python benchmarks/retrain.py [--model toy-large] [--spec ivtp:keep=0.11] [--steps 12]
        [--batch-size 16] [--lr 1e-4] [--limit 16] [--out docs/results]

Writes ``OUT/retrain.md`` (the table, with the command and wall time in its header) and
``OUT/retrain.json`` (every number behind it).

The two settings run side by side, each in its own spawned process with one thread, so each resident
set peak is its own and both see the same machine load. Each process fine-tunes (only the step is
timed), evaluates the fine-tuned model (the pruned one with its method active), then reloads the
model as shipped and evaluates it the same way ("before": the paper's pure-inference column).
Retention is against the dense model at the same stage. ``--model`` also takes a checkpoint
directory; IVTP then needs ``--clip`` (the tower's toy-clip directory) and an explicit ``tau``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from multiprocessing import get_context
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "docs" / "results"


def build_method(spec: str | None, clip_dir: str | None, processor):
    """The token method for ``spec``; for a checkpoint directory, IVTP gets its CLIP from ``clip_dir``."""
    from transformers import CLIPModel, PreTrainedTokenizerFast
    from vlmprune.spec import parse_spec
    from vlmprune.tokens import REGISTRY, from_spec

    if spec is None:
        return None
    name, settings = parse_spec(spec)
    if name != "ivtp" or clip_dir is None:
        return from_spec(spec)
    clip = CLIPModel.from_pretrained(clip_dir).eval()
    return REGISTRY[name](**settings, clip=clip, clip_tokenizer=PreTrainedTokenizerFast.from_pretrained(clip_dir),
                          tokenizer=processor.tokenizer)


def accuracy(model, processor, method, limit: int) -> dict:
    """Per-task exact-match accuracy on the first ``limit`` test items, with ``method`` active."""
    from vlmprune.eval.harness import generate_answers, load_items, resolve_tasks, score
    from vlmprune.tokens import apply

    items_by_task = load_items(resolve_tasks(None), limit)
    items = [item for task_items in items_by_task.values() for item in task_items]
    with apply(model, method) if method is not None else nullcontext():
        replies = generate_answers(model, processor, items, progress=False)
    return score(items_by_task, replies)


def run_setting(settings: dict, spec: str | None) -> dict:
    """One setting in a fresh process: fine-tune, evaluate it, evaluate the shipped model the same way."""
    import torch
    from vlmprune import toyworld
    from vlmprune.tokens.finetune import finetune

    torch.set_num_threads(1)
    model, processor = toyworld.load(settings["model"])
    report = finetune(model, processor, build_method(spec, settings["clip"], processor), steps=settings["steps"],
                      batch_size=settings["batch_size"], lr=settings["lr"], seed=settings["seed"],
                      trainable=settings["trainable"])
    after = accuracy(model, processor, build_method(spec, settings["clip"], processor), settings["limit"])
    shipped, _ = toyworld.load(settings["model"])
    before = accuracy(shipped, processor, build_method(spec, settings["clip"], processor), settings["limit"])
    return {"report": report.as_dict(), "after": after, "before": before}


def markdown(settings: dict, spec: str, results: dict, command: str, wall_s: float) -> str:
    from vlmprune.eval.harness import average
    from vlmprune.eval.retention import retention

    dense, pruned = results["dense"], results[spec]
    rows = [("dense", dense), (spec, pruned)]

    def pct(value):
        return "n/a" if value is None else f"{value:.1f}%"

    def change(new, old):
        return f"{100 * (new / old - 1):+.0f}%"

    lines = [
        "# Retraining mode: fine-tuning with IVTP in the loop (IVTP Table 3 analogue)", "",
        f"Command: `{command}`; wall time {wall_s / 60:.1f} min (numbers in `retrain.json`).", "",
        f"Model `{settings['model']}`, {settings['steps']} AdamW steps of batch {settings['batch_size']} "
        f"(lr {settings['lr']}, trainable `{settings['trainable']}`, vision tower frozen, seed {settings['seed']}: "
        "the same instruct-stage conversations for both settings), then exact match on the first "
        f"{settings['limit']} test items of every task. Both settings ran side by side, one thread each, "
        f"on a shared {os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}, torch threads 1).", "",
        "Step time: forward (vision tower, IVTP's scoring and CLIP text relevance included), backward and "
        "optimizer step, median over the steps. Saved activations: the peak memory held by tensors saved "
        "for backward in one step (`saved_tensors_hooks`, each storage once). RSS growth: the rise of "
        "`getrusage(RUSAGE_SELF).ru_maxrss` over the fine-tuning in that process (optimizer state included).", "",
        "| setting | median step (s) | saved activations (MB) | RSS growth (MB) | loss, first / last 3 steps "
        "| accuracy before FT | retention before | accuracy after FT | retention vs dense-FT |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, result in rows:
        report = result["report"]
        losses = report["losses"]
        first, last = statistics.mean(losses[:3]), statistics.mean(losses[-3:])
        before_ret = None if result is dense else retention(result["before"], dense["before"])
        after_ret = None if result is dense else retention(result["after"], dense["after"])
        lines.append(
            f"| `{name}` | {report['median_step_s']:.2f} | {report['peak_saved_mb']:.0f} | "
            f"{report['peak_rss_delta_mb']:.0f} | {first:.3f} / {last:.3f} | "
            f"{100 * average(result['before']):.1f}% | {'100%' if result is dense else pct(before_ret)} | "
            f"{100 * average(result['after']):.1f}% | {'100%' if result is dense else pct(after_ret)} |")
    d, p = dense["report"], pruned["report"]
    lines += [
        "", f"IVTP against dense: step time {change(p['median_step_s'], d['median_step_s'])}, saved activations "
        f"{change(p['peak_saved_mb'], d['peak_saved_mb'])}, RSS growth "
        f"{change(p['peak_rss_delta_mb'], d['peak_rss_delta_mb'])} (the paper, LLaVA-1.5-7B SFT: time -29%, "
        "GPU memory -11%).", "",
        "Per task (accuracy before -> after fine-tuning):", "",
        "| task | " + " | ".join(f"`{name}`" for name, _ in rows) + " |",
        "|---|" + "---|" * len(rows),
    ]
    for task in dense["after"]:
        cells = [f"{100 * r['before'][task]['accuracy']:.0f} -> {100 * r['after'][task]['accuracy']:.0f}"
                 for _, r in rows]
        lines.append(f"| {task} (n={dense['after'][task]['n']}) | " + " | ".join(cells) + " |")
    lines += ["", "Loss curves (per step):", ""]
    for name, result in rows:
        lines.append(f"- `{name}`: " + " ".join(f"{x:.3f}" for x in result["report"]["losses"]))
    lines += [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy-large", help="toy-large, toy-small or a checkpoint directory")
    parser.add_argument("--spec", default="ivtp:keep=0.11", help="the token method trained with (SPEC)")
    parser.add_argument("--clip", default=None, help="toy-clip directory, for IVTP on a checkpoint directory")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--trainable", default="llm", choices=("llm", "projector+llm"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=16, help="test items per task")
    parser.add_argument("--out", type=Path, default=OUT, help="directory for retrain.md and retrain.json")
    args = parser.parse_args(argv)
    settings = {"model": args.model, "clip": args.clip, "steps": args.steps, "batch_size": args.batch_size,
                "lr": args.lr, "trainable": args.trainable, "seed": args.seed, "limit": args.limit}
    began = time.time()
    with ProcessPoolExecutor(max_workers=2, mp_context=get_context("spawn")) as pool:
        futures = {"dense": pool.submit(run_setting, settings, None), args.spec: pool.submit(run_setting, settings, args.spec)}
        results = {name: future.result() for name, future in futures.items()}
    wall_s = time.time() - began
    command = shlex.join(["python", "benchmarks/retrain.py", *(sys.argv[1:] if argv is None else argv)])
    text = markdown(settings, args.spec, results, command, wall_s)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "retrain.json").write_text(json.dumps(
        {"settings": settings, "spec": args.spec, "command": command, "wall_seconds": wall_s, "results": results},
        indent=1))
    (args.out / "retrain.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
