"""Small-model guidance on the toy world: retention of PGP, SGP and the single-model methods at 5, 10,
20 and 30% of the visual tokens on the full test split, PGP against SGP by an exact McNemar test, the
cost of small + large (counted FLOPs and interleaved prefill timings) against dense toy-large, and SEE's
early exit along its threshold.

    .venv/bin/python benchmarks/guidance_results.py [--limit N] [--part all|retention|cost|see] [--threads 1]

Rows go to ``docs/results/guidance.json`` as they finish (a rerun skips rows whose settings match,
PGP rows include the shipped guide's digest), then ``docs/results/guidance.md``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from vlmprune import toyworld
from vlmprune.eval.harness import evaluate, load_items, model_inputs
from vlmprune.eval.statistics import compare_pooled, format_p

BUDGETS = (0.05, 0.1, 0.2, 0.3)
OUT = Path(__file__).resolve().parent.parent / "docs" / "results"
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
COST_SPECS = ("pgp:keep=0.05", "pgp:keep=0.05,share=false", "sgp:keep=0.05,layer=0",
              "sgp:keep=0.05,layer=0,share=false", "sgp:keep=0.05")


def method_specs(keep: float) -> dict[str, str]:
    """Every compared method at the same final share ``keep`` of the visual tokens (SGP also at layer
    0 at the smallest budget, where the papers prune that early)."""
    layer0 = {"sgp-layer0": f"sgp:keep={keep},layer=0"} if keep == BUDGETS[0] else {}
    return {"pgp": f"pgp:keep={keep}", "sgp": f"sgp:keep={keep}", **layer0,
            "ivtp": f"ivtp:keep={keep}", "divprune": f"divprune:keep={keep}", "fastv": f"fastv:layer=2,keep={keep}",
            "topk": f"topk:keep={keep}"}


def guide_digest() -> str:
    """The shipped PGP guide's digest (weights and settings): PGP rows of another guide are rerun."""
    from vlmprune.tokens.guidance.pgp import SETTINGS, WEIGHTS
    from vlmprune.tokens.methods.pgp import SHIPPED_GUIDE
    directory = toyworld.CHECKPOINTS / SHIPPED_GUIDE
    return hashlib.sha256((directory / WEIGHTS).read_bytes() + (directory / SETTINGS).read_bytes()).hexdigest()[:16]


class Journal:
    """``guidance.json``: rows by key with the settings they ran under; saved after every row."""

    def __init__(self, path: Path, setup: dict):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}
        self.data["setup"] = setup
        self.data.setdefault("rows", {})

    def row(self, key: str, settings: dict, work) -> dict:
        row = self.data["rows"].get(key)
        if row is not None and row.get("settings") == settings:
            return row["result"]
        started = time.time()
        result = work()
        self.data["rows"][key] = {"settings": settings, "result": result, "seconds": round(time.time() - started, 1)}
        self.save()
        print(f"{key}: {time.time() - started:.0f} s", flush=True)
        return result

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1) + "\n")


def retention_rows(journal: Journal, model, processor, limit: int | None, digest: str) -> None:
    dense = journal.row("dense", {"limit": limit}, lambda: evaluate(model, processor, limit=limit, progress=False))
    # PGP last: its rows are the ones a new guide reruns
    jobs = [(keep, name, spec) for keep in BUDGETS for name, spec in method_specs(keep).items()]
    for keep, name, spec in sorted(jobs, key=lambda job: job[1] == "pgp"):
        settings = {"limit": limit, "spec": spec, **({"guide": digest} if name == "pgp" else {})}
        journal.row(f"{name}@{keep}", settings, lambda spec=spec: evaluate(
            model, processor, tokens=spec, limit=limit, reference=dense["tasks"], progress=False))


def alternative_guide_row(journal: Journal, model, processor, limit: int | None, directory: Path) -> None:
    """PGP at 5% with another guide (e.g. ``vlmprune toy train-pgp --recipe uncollapsed``), keyed by its digest."""
    from vlmprune.tokens.guidance.pgp import SETTINGS, WEIGHTS
    digest = hashlib.sha256((directory / WEIGHTS).read_bytes() + (directory / SETTINGS).read_bytes()).hexdigest()[:16]
    dense = journal.data["rows"]["dense"]["result"]
    spec = f"pgp:keep={BUDGETS[0]},guide={directory}"
    journal.row(f"pgp-alternative@{BUDGETS[0]}", {"limit": limit, "guide": digest}, lambda: evaluate(
        model, processor, tokens=spec, limit=limit, reference=dense["tasks"], progress=False))


def cost_rows(journal: Journal, model, processor, rounds: int, digest: str) -> None:
    """Median prefill ms over ``rounds`` interleaved rounds (each a median of 3 after a warm-up) of
    dense toy-large and each guided setting, at batch 1, on the first attribute item."""
    from vlmprune.measure.flops import count_flops
    from vlmprune.measure.latency import prefill_ms
    from vlmprune.models import get_adapter
    from vlmprune.models.presets import Preset, default_image_size
    from vlmprune.tokens import from_spec

    def work() -> dict:
        item = toyworld.test_split("attribute", 1)[0]
        inputs = model_inputs(processor, [item.image], [item.question], model.device, model.dtype)
        methods = {spec: from_spec(spec) for spec in COST_SPECS}
        times: dict[str, list[float]] = {"dense": [], **{spec: [] for spec in COST_SPECS}}
        for _ in range(rounds):
            times["dense"].append(prefill_ms(model, inputs, None, repeats=3))
            for spec, method in methods.items():
                times[spec].append(prefill_ms(model, inputs, method, repeats=3))
        # counted after the timed runs, which paired each method with the real models (tower sharing)
        text_tokens = int((inputs["attention_mask"].bool() & ~get_adapter(model).image_token_mask(inputs["input_ids"])).sum())
        preset = Preset("toy-large", model.config, default_image_size(model.config))
        flops = {"dense": count_flops(preset, text_tokens).flops.total,
                 **{spec: count_flops(preset, text_tokens, method).flops.total for spec, method in methods.items()}}
        return {key: {"median_ms": statistics.median(values), "rounds_ms": values, "flops": flops[key]}
                for key, values in times.items()}

    journal.row("prefill", {"rounds": rounds, "specs": list(COST_SPECS), "guide": digest}, work)


def see_rows(journal: Journal, model, processor, limit: int | None) -> None:
    """The small model's SEE scores and answers on every item; the sweep along the threshold is a
    function of them and of dense toy-large's outcomes."""
    from vlmprune.eval.normalize import is_correct
    from vlmprune.tokens.guidance.see import early_exit

    def work() -> dict:
        small, _ = toyworld.load("toy-small")
        rows = {}
        for task, items in load_items(list(toyworld.TASKS), limit).items():
            scores, hits = [], []
            for start in range(0, len(items), 50):
                batch = items[start:start + 50]
                inputs = model_inputs(processor, [i.image for i in batch], [i.question for i in batch],
                                      small.device, small.dtype)
                for item, decision in zip(batch, early_exit(small, inputs, threshold=1.0)):
                    reply = processor.tokenizer.decode(decision.answer, skip_special_tokens=True)
                    scores.append(round((decision.confidence + decision.consistency) / 2, 6))
                    hits.append(int(is_correct(reply, item.answer, item.options)))
            rows[task] = {"score": scores, "small_correct": hits}
        return rows

    journal.row("see", {"limit": limit}, work)


def map_rows(journal: Journal, model, processor, items_per_task: int, digest: str) -> None:
    """Where each guide's top 5% lie (the share on object patches; a patch belongs to an object when
    at least 6 of its 64 pixels do) and how wide its map is (effective number of tokens, 1 / sum p^2
    of the scores normalised to sum 1), against the objects' share of the image."""
    import numpy as np

    from vlmprune.tokens.guidance.sgp import guide_answer
    from vlmprune.tokens.methods.pgp import PGP
    from vlmprune.tokens.methods.sgp import SGP
    from vlmprune.toyworld.scenes import PATCH_SIZE, render

    def work() -> dict:
        guide = PGP(keep=0.05).guide_model(model)
        small = SGP(keep=0.05).small_model(model)
        out = {}
        for task in toyworld.TASKS:
            items = toyworld.test_split(task, items_per_task)
            by_guide = {"pgp": [], "sgp": []}
            objects = []
            for start in range(0, len(items), 25):
                batch = items[start:start + 25]
                inputs = model_inputs(processor, [i.image for i in batch], [i.question for i in batch],
                                      model.device, model.dtype)
                with torch.no_grad():
                    scores = {"pgp": guide.importance(inputs), "sgp": guide_answer(small, inputs).scores}
                for row, item in enumerate(batch):
                    index = render(item.scene)[1]
                    grid = index.shape[0] // PATCH_SIZE
                    cells = (index.reshape(grid, PATCH_SIZE, grid, PATCH_SIZE).transpose(0, 2, 1, 3)
                             .reshape(grid * grid, -1) > 0).sum(1) >= 6
                    objects.append(cells.mean())
                    for name in by_guide:
                        values = scores[name][row].float().clamp_min(0)
                        top = values.topk(5).indices.numpy()
                        p = (values / values.sum()).numpy()
                        by_guide[name].append((float(cells[top].mean()), float(1 / (p ** 2).sum())))
            out[task] = {"object_share": float(np.mean(objects)),
                         **{name: {"top_on_objects": float(np.mean([v[0] for v in values])),
                                   "effective_tokens": float(np.mean([v[1] for v in values]))}
                            for name, values in by_guide.items()}}
        return out

    journal.row("maps", {"items_per_task": items_per_task, "guide": digest}, work)


def small_flops(text_tokens: int) -> dict:
    """Counted FLOPs of toy-small's prefill, dense and at 5% of its visual tokens (SEE's re-read)."""
    from vlmprune.measure.flops import count_flops
    from vlmprune.models.presets import Preset, default_image_size
    from vlmprune.tokens import from_spec

    small, _ = toyworld.load("toy-small")
    preset = Preset("toy-small", small.config, default_image_size(small.config))
    return {"dense": count_flops(preset, text_tokens).flops.total,
            "keep5": count_flops(preset, text_tokens, from_spec("topk:keep=0.05")).flops.total}


# -- report ------------------------------------------------------------------------------------

def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _row(rows: dict, key: str) -> dict | None:
    row = rows.get(key)
    return None if row is None else row["result"]


def report(data: dict) -> str:
    rows = data["rows"]
    setup = data["setup"]
    dense = _row(rows, "dense")
    if dense is None:
        return "# Small-model guidance\n\nno rows yet\n"
    lines = ["# Small-model guidance: SGP, SEE and PGP on the toy world", "",
             f"Command: `{setup['command']}`; {setup['machine']}; test items per task: "
             f"{setup['limit'] or 500}; dense toy-large average {_pct(dense['average'])}% "
             f"(95% interval {_pct(dense['average_interval'][0])}-{_pct(dense['average_interval'][1])}), "
             f"counted {dense['flops']['total'] / 1e9:.3f} GFLOPs per prefill.", "",
             "## Retention at equal budgets", "",
             "Retention = average accuracy / dense average. SGP prunes at layer 2 (0.3 of the depth, its "
             "default) or 0; the others at their usual sites. GFLOPs: one prefill, small + large, counted.", "",
             "| method | " + " | ".join(f"{int(100 * k)}% kept: retention (95% interval of the average), GFLOPs"
                                      for k in BUDGETS) + " |",
             "|---|" + "---|" * len(BUDGETS)]
    for name in method_specs(BUDGETS[0]):
        cells = []
        for keep in BUDGETS:
            run = _row(rows, f"{name}@{keep}")
            if run is None:
                cells.append("not run")
                continue
            low, high = (x / dense["average"] for x in run["average_interval"])
            cells.append(f"{run['retention']:.1f} ({_pct(low)}-{_pct(high)}), {run['flops']['total'] / 1e9:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## PGP against SGP (exact McNemar test, all items of the six tasks pooled)", "",
              "| kept | PGP avg | SGP (layer 2) avg | only PGP right | only SGP right | p | verdict |",
              "|---|---|---|---|---|---|---|"]
    for keep in BUDGETS:
        a, b = _row(rows, f"pgp@{keep}"), _row(rows, f"sgp@{keep}")
        if a is None or b is None:
            continue
        test = compare_pooled({t: v["correct"] for t, v in a["tasks"].items()},
                              {t: v["correct"] for t, v in b["tasks"].items()}, list(a["tasks"]))
        verdict = test["verdict"].replace("A better", "PGP better").replace("B better", "SGP better")
        lines.append(f"| {int(100 * keep)}% | {_pct(a['average'])} | {_pct(b['average'])} | {test['b']} | "
                     f"{test['c']} | {format_p(test['p'])} | {verdict} |")
    alternative, shipped = _row(rows, f"pgp-alternative@{BUDGETS[0]}"), _row(rows, f"pgp@{BUDGETS[0]}")
    if alternative is not None and shipped is not None:
        test = compare_pooled({t: v["correct"] for t, v in alternative["tasks"].items()},
                              {t: v["correct"] for t, v in shipped["tasks"].items()}, list(shipped["tasks"]))
        verdict = test["verdict"].replace("A better", "alternative better").replace("B better", "shipped better")
        lines += ["", f"PGP at 5% with the guide `{alternative['tokens'].split('guide=')[1].split(',')[0]}`: retention "
                  f"{alternative['retention']:.1f} against the shipped guide's {shipped['retention']:.1f}; only the "
                  f"alternative right on {test['b']} items, only the shipped on {test['c']}: {verdict}."]
    prefill = _row(rows, "prefill")
    if prefill is not None:
        lines += ["", "## Cost of small + large against dense toy-large", "",
                  f"Prefill at batch 1, one thread: median over {len(prefill['dense']['rounds_ms'])} interleaved "
                  "rounds (each a median of 3 runs after one warm-up); `share=false`: the guide runs its own "
                  "copy of the shared vision tower. Counted GFLOPs: one prefill of the same item, small + large "
                  "(SGP's guide counted over its prompt only, its decode steps not counted).", "",
                  "| setting | prefill ms | / dense | counted GFLOPs | / dense |", "|---|---|---|---|---|"]
        for key, value in prefill.items():
            lines.append(f"| {key} | {value['median_ms']:.1f} | {value['median_ms'] / prefill['dense']['median_ms']:.2f}"
                         f" | {value['flops'] / 1e9:.3f} | {value['flops'] / prefill['dense']['flops']:.2f} |")
    maps = _row(rows, "maps")
    if maps is not None:
        lines += ["", "## Where the guides' top 5% lie", "",
                  f"First {rows['maps']['settings']['items_per_task']} test items per task, one image per "
                  "forward. On objects: share of the top-5 patches on an object (a patch is an object's when at "
                  "least 6 of its 64 pixels are); objects cover the share given in the second column. Width: "
                  "effective number of tokens of the map (1 / sum p^2, scores normalised to sum 1; 100 = flat).", "",
                  "| task | objects' share of the image % | PGP top-5 on objects % | SGP top-5 on objects % "
                  "| PGP width | SGP width |", "|---|---|---|---|---|---|"]
        for task, value in maps.items():
            lines.append(f"| {task} | {_pct(value['object_share'])} | {_pct(value['pgp']['top_on_objects'])} | "
                         f"{_pct(value['sgp']['top_on_objects'])} | {value['pgp']['effective_tokens']:.1f} | "
                         f"{value['sgp']['effective_tokens']:.1f} |")
    see = _row(rows, "see")
    if see is not None:
        lines += see_report(see, dense, data.get("small_flops"))
    return "\n".join(lines) + "\n"


def see_report(see: dict, dense: dict, flops: dict | None) -> list[str]:
    """Exit rate, accuracy of the combined system (the small answer on exit, dense toy-large's
    otherwise) and the FLOPs per item, along the threshold."""
    lines = ["", "## SEE: early exit along the threshold", "",
             "Exit when (S_conf + S_cons) / 2 > threshold; on exit the small model's answer counts, otherwise "
             "dense toy-large's. FLOPs per item: toy-small's prefill + its re-read at 5% of the visual tokens "
             "(S_cons) + toy-large's prefill where it does not exit (decode steps not counted).", "",
             "| threshold | exit rate % | accuracy of exited items % | system average % | dense large average % "
             "| GFLOPs per item | / dense large |", "|---|---|---|---|---|---|---|"]
    large_flops = dense["flops"]["total"]
    for threshold in THRESHOLDS:
        exits = correct_exit = 0
        per_task = []
        for task, row in see.items():
            large = dense["tasks"][task]["correct"]
            hits = [(s if score > threshold else int(large[i])) for i, (score, s) in
                    enumerate(zip(row["score"], row["small_correct"]))]
            exits += sum(score > threshold for score in row["score"])
            correct_exit += sum(s for score, s in zip(row["score"], row["small_correct"]) if score > threshold)
            per_task.append(sum(hits) / len(hits))
        n = sum(len(row["score"]) for row in see.values())
        rate = exits / n
        cost = "-" if flops is None else (flops["dense"] + flops["keep5"] + (1 - rate) * large_flops)
        lines.append(f"| {threshold} | {_pct(rate)} | {'-' if not exits else _pct(correct_exit / exits)} | "
                     f"{_pct(sum(per_task) / len(per_task))} | {_pct(dense['average'])} | "
                     f"{'-' if flops is None else f'{cost / 1e9:.3f}'} | "
                     f"{'-' if flops is None else f'{cost / large_flops:.2f}'} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="test items per task (default: all 500)")
    parser.add_argument("--part", choices=("all", "retention", "cost", "maps", "see"), default="all")
    parser.add_argument("--alternative-guide", type=Path, default=None, metavar="DIR",
                        help="also PGP at 5%% with this guide, against the shipped one")
    parser.add_argument("--map-items", type=int, default=100, help="test items per task for the map statistics")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    command = shlex.join(["python", "benchmarks/guidance_results.py", *(sys.argv[1:] if argv is None else argv)])
    setup = {"command": command, "limit": args.limit, "threads": args.threads,
             "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                        f"torch {torch.__version__}, {args.threads} thread(s)"}
    journal = Journal(args.out / "guidance.json", setup)
    if not args.report_only:
        model, processor = toyworld.load("toy-large")
        digest = guide_digest()
        if args.part in ("all", "retention", "cost"):
            retention_rows(journal, model, processor, args.limit, digest)
        if args.alternative_guide is not None:
            alternative_guide_row(journal, model, processor, args.limit, args.alternative_guide)
        if args.part in ("all", "cost"):
            cost_rows(journal, model, processor, args.rounds, digest)
        if args.part in ("all", "maps"):
            map_rows(journal, model, processor, args.map_items, digest)
        if args.part in ("all", "see"):
            see_rows(journal, model, processor, args.limit)
            question = toyworld.test_split("attribute", 1)[0].question
            prompt = processor.tokenizer(toyworld.build_prompt(processor, question))["input_ids"]
            journal.data["small_flops"] = small_flops(len(prompt) - prompt.count(model.config.image_token_id) + 1)
        journal.save()
    (args.out / "guidance.md").write_text(report(journal.data))
    print(f"wrote {args.out / 'guidance.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
