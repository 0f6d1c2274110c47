"""IVTP, IVTP+ and CDPruner on the full toy test split: settings chosen on the validation split, the
retention-FLOPs curve at 5/11/22/33% kept against the baselines, paired McNemar tests, counting by
question type with a kept-token probe, and the instruction's effect at equal tokens into the LLM.

    .venv/bin/python benchmarks/ivtp_study.py --threads 1 [--part all|sweep|curve|corrections|single] [--report-only]

``--part single``: IVTP+ as one selection (``at=feature``/``input``, ``fill``, ``merge``), chosen on the
validation split among the settings that cost no more counted FLOPs than DivPrune at 11%, then that
one choice against DivPrune and CDPruner on the test split. Once that choice is in the journal, the
curve (``--part curve`` or ``all``) also runs it as ``ivtp_plus_single`` at every budget, the same
settings with the keep scaled (chosen at 11% only; the other budgets were never part of the choice).

Every run is journaled to ``docs/results/ivtp_study.json`` as it finishes (keyed by split and the
method's full SPEC) and skipped on a rerun; ``ivtp_study.md`` and ``ivtp_tradeoff.png`` are written
from that JSON only. Order: the validation sweep (which fixes the defaults the test runs use), the
curve at 11%, the corrections, then the curve's other budgets, so a run cut short still has what the later parts need.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from token_results import canonical, plot_tradeoff  # noqa: E402  (shared with that script)

from vlmprune import toyworld  # noqa: E402
from vlmprune.eval import statistics  # noqa: E402
from vlmprune.eval.harness import evaluate, generate_answers, model_inputs  # noqa: E402
from vlmprune.tokens.base import Reduction, Site, TokenMethod  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "docs" / "results"
BUDGETS = (0.05, 0.11, 0.22, 0.33)
CLAIM = 0.11
CURVE = ("ivtp", "ivtp_paper", "ivtp_plus", "ivtp_plus_single", "cdpruner", "divprune", "fastv", "pyramiddrop", "topk")
PAIRS = [("ivtp_plus", "divprune"), ("ivtp_plus", "cdpruner"),
         ("ivtp_plus_single", "divprune"), ("ivtp_plus_single", "cdpruner"), ("ivtp", "divprune"), ("ivtp", "cdpruner"),
         ("ivtp", "ivtp_plus"), ("ivtp", "fastv"), ("ivtp", "pyramiddrop"), ("ivtp", "topk")]
PLUS_STEPS = ("relevant", "spread_at")
VISION_DEPTH = 5   # toy-large's LLM reads the output of ViT layer 5 (index 4): IVTP's ViT sites are after 3 and 5
PROBED = ("ivtp", "ivtp_paper", "ivtp_plus", "divprune", "cdpruner")
SINGLE_RIVALS = ("divprune", "cdpruner")


# ---------------------------------------------------------------- what runs

def sweep_steps(keep: int) -> list[tuple[str, dict[str, str]]]:
    """IVTP's settings, one at a time on top of the best so far (coordinate ascent, in this order),
    then IVTP+'s (its own two) on top of the chosen IVTP. Each step: (setting, {label: SPEC suffix})."""
    return [
        ("budget", {"2n": "budget=2n", "equal": "budget=equal"}),
        ("llm_layers", {"one step at LLM layer 3 (default)": "",
                        "one step at LLM layer 6": "llm_layers=6,llm_group=6",
                        "steps at LLM layers 3 and 6": "llm_layers=6,llm_group=3"}),
        ("pcls", {p: f"pcls={p}" for p in ("llm", "clip", "hybrid", "visual")}),
        ("assistant", {"true": "assistant=true", "false": "assistant=false"}),
        ("relevant", {str(r): f"relevant={r}" for r in (0.25, 0.5, 0.75)}),
        ("spread_at", {s: f"spread_at={s}" for s in ("all", "last")}),
    ]


def _spec(method: str, keep: int, settings: list[str]) -> str:
    return ",".join([f"{method}:keep={keep}", *[s for s in settings if s]])


def curve_specs(keep: int, chosen: dict, single: dict | None = None) -> dict[str, str]:
    """The curve's SPECs at ``keep``; ``ivtp_plus_single`` (IVTP+ as one selection, the settings
    ``--part single`` chose on the validation split at 11%) only once that choice is complete."""
    plus = {"ivtp_plus": _spec("ivtp_plus", keep, chosen["ivtp"] + chosen["ivtp_plus"])}
    if single and single.get("complete"):
        plus["ivtp_plus_single"] = _spec("ivtp_plus", keep, single["chosen"])
    return {
        "ivtp": _spec("ivtp", keep, chosen["ivtp"]),
        "ivtp_paper": f"ivtp:keep={keep}",
        **plus,
        "cdpruner": f"cdpruner:keep={keep}",
        "divprune": f"divprune:keep={keep}",
        "fastv": f"fastv:layer=2,keep={keep}",
        "pyramiddrop": f"pyramiddrop:keep={keep}",
        "topk": f"topk:keep={keep}",
    }


def correction_specs(keep: int, chosen: dict) -> dict[str, dict[str, str]]:
    """The instruction's effect at equal tokens into the LLM, for the paper's and the chosen schedule:
    IVTP; the same schedule with the projected visual [CLS] as query; IVTP-V (no LLM stage) letting
    as many tokens into the LLM as IVTP does (its ViT schedule is then IVTP's: the 2n rule's 2n); and
    IVTP-V ending at IVTP's final count."""
    tables = {}
    schedule = [s for s in chosen["ivtp"] if not s.startswith(("pcls", "assistant"))]   # the query is what varies
    for name, settings in (("paper defaults", []), ("chosen schedule", schedule)):
        base = _spec("ivtp", keep, settings)
        into = into_llm(base)             # IVTP-V's ViT removes the same number per step: its schedule ends there
        tables[name] = {"IVTP": base, "same schedule, visual [CLS] as query": f"{base},pcls=visual",
                        "IVTP-V, as many tokens into the LLM": f"ivtp:keep={into},llm=false",
                        "IVTP-V, IVTP's final count": f"ivtp:keep={keep},llm=false"}
    return tables


# ---------------------------------------------------------------- question types and patch probes

def question_type(item) -> str:
    """What the question asks, finer than the task (counting: every object or one colour's)."""
    q = item.question
    if item.task == "counting":
        return "how many objects" if q == "how many objects are there?" else "how many <colour> objects"
    if item.task == "existence":
        if item.answer == "yes":
            return "present object"
        colour, shape = q[len("is there a "):-1].split()
        apart = colour in {o.colour for o in item.scene.objects} and shape in {o.shape for o in item.scene.objects}
        return "absent: colour and shape present apart" if apart else "absent: one attribute not in scene"
    if item.task == "spatial":
        return "left/right" if (" left of " in q or " right of " in q) else "above/below"
    if item.task == "choice":
        return "which shape is <colour>" if q.startswith("which shape") else "what colour is the <shape>"
    return item.task


def patch_owner(item) -> torch.Tensor:
    """(GRID * GRID,) 1 + the index of the object covering each patch (0: background), raster order."""
    from vlmprune.toyworld.scenes import GRID, patch_labels, render
    _, index_map = render(item.scene)
    labels = patch_labels(item.scene, index_map)
    blocks = torch.as_tensor(index_map.copy()).reshape(GRID, 8, GRID, 8).permute(0, 2, 1, 3).reshape(GRID * GRID, -1)
    counts = torch.stack([(blocks == i + 1).sum(1) for i in range(len(item.scene.objects))], 1)
    owner = torch.where(counts.amax(1) >= 6, counts.argmax(1) + 1, 0)
    assert bool(((owner > 0) == torch.as_tensor(labels["colour"] > 0)).all())
    return owner


@torch.no_grad()
def kept_on_objects(model, processor, spec: str, items, batch: int = 32) -> dict:
    """Share of the finally kept tokens on object patches, and of objects with at least one kept patch."""
    from vlmprune import tokens
    from vlmprune.viz.command import KeptTokens

    on_object = covered = kept_total = objects = 0
    for start in range(0, len(items), batch):
        chunk = items[start:start + batch]
        recorder = KeptTokens(tokens.from_spec(spec))
        inputs = model_inputs(processor, [i.image for i in chunk], [i.question for i in chunk], model.device, model.dtype)
        with tokens.apply(model, recorder):
            model(**inputs)
        final = recorder.kept[-1][1]
        for item, kept in zip(chunk, final):
            owner = patch_owner(item)[kept]
            on_object += int((owner > 0).sum())
            kept_total += len(kept)
            covered += len(set(owner.tolist()) - {0})
            objects += len(item.scene.objects)
    return {"object_share": on_object / kept_total, "objects_covered": covered / objects, "items": len(items)}


class Oracle(TokenMethod):
    """Keeps given patches before the LLM, one list per prefill, in order (batch 1)."""

    name = "oracle"

    def __init__(self, keeps: list[list[int]]):
        self.queue = list(keeps)

    def sites(self, plan):
        return [Site("llm", 0)]

    def reduce(self, ctx):
        keep = self.queue.pop(0)
        return Reduction(keep=torch.tensor([keep], device=ctx.visual.device))

    def spec(self) -> str:
        return "oracle"


def oracle_keeps(item, rule: str, count: int) -> list[int]:
    """Patches to keep: ``objects``: ``count`` object patches, one object after another in turn;
    ``all-objects``: every object patch; ``centre+background``: each object's centre patch, the rest
    background patches spread by farthest-point sampling."""
    from vlmprune.tokens.methods.ivtp_plus import farthest_points
    from vlmprune.toyworld.scenes import GRID, PATCH_SIZE
    owner = patch_owner(item)
    per_object = [torch.nonzero(owner == i + 1).flatten().tolist() for i in range(len(item.scene.objects))]
    if rule == "all-objects":
        return sorted(p for patches in per_object for p in patches)
    if rule == "objects":
        picked, depth = [], 0
        while len(picked) < count and any(depth < len(p) for p in per_object):
            picked += [p[depth] for p in per_object if depth < len(p)][: count - len(picked)]
            depth += 1
        return sorted(picked)
    centres = sorted({min(int(o.y) // PATCH_SIZE, GRID - 1) * GRID + min(int(o.x) // PATCH_SIZE, GRID - 1)
                      for o in item.scene.objects})
    background = torch.nonzero(owner == 0).flatten()
    cells = torch.stack([torch.arange(GRID * GRID) // GRID, torch.arange(GRID * GRID) % GRID], -1)
    candidates = torch.cat([torch.tensor(centres), background])       # centres first: they are "chosen"
    extra = farthest_points(cells[candidates][None], torch.arange(len(centres))[None], count - len(centres))
    return sorted(centres + candidates[extra[0]].tolist())


def oracle_accuracy(model, processor, items, rule: str, count: int) -> dict:
    keeps = [oracle_keeps(item, rule, count) for item in items]
    from vlmprune import tokens
    method = Oracle(keeps)
    with tokens.apply(model, method):
        replies = generate_answers(model, processor, items, batch_size=1, max_new_tokens=3, progress=False)
    assert not method.queue, "one prefill per item"
    from vlmprune.eval.normalize import is_correct
    hits = [is_correct(r, i.answer, i.options) for r, i in zip(replies, items)]
    return {"accuracy": sum(hits) / len(hits), "n": len(hits), "mean_kept": sum(map(len, keeps)) / len(keeps),
            "interval": list(statistics.wilson_interval(sum(hits) / len(hits), len(hits)))}


def flops_matched(model, processor, name: str, flops: float) -> str:
    """``name`` at the smallest count whose counted FLOPs reach ``flops`` (the same prompt the harness counts)."""
    from vlmprune.measure.flops import count_flops
    from vlmprune.models import get_adapter
    from vlmprune.models.presets import Preset, default_image_size
    from vlmprune.tokens import from_spec
    sample = toyworld.test_split(toyworld.TASKS[0], 1)[0]
    inputs = model_inputs(processor, [sample.image], [sample.question], model.device, model.dtype)
    text_tokens = int((inputs["attention_mask"].bool() & ~get_adapter(model).image_token_mask(inputs["input_ids"])).sum())
    preset = Preset(getattr(model, "name_or_path", "") or "model", model.config, default_image_size(model.config))
    for count in range(1, 101):   # a few hundred ms each
        spec = f"{name}:keep={count}"
        if count_flops(preset, text_tokens, from_spec(spec)).flops.total >= flops:
            return spec
    return f"{name}:keep=100"


def single_steps() -> list[tuple[str, dict[str, str]]]:
    """IVTP+ as one selection (no ViT or LLM pruning), coordinate ascent from ``at=feature``: each step
    (setting, {label: SPEC suffix}); ``at=input`` needs ``rollout=layer`` to come near DivPrune's FLOPs."""
    return [
        ("fill", {"grid": "fill=grid", "diverse": "fill=diverse"}),
        ("relevant", {str(r): f"relevant={r}" for r in (0.1, 0.25, 0.5, 0.75)}),
        ("rollout", {"residual": "rollout=residual", "layer": "rollout=layer"}),
        ("merge", {"drop": "merge=drop", "mean": "merge=mean"}),
        ("at", {"feature": "at=feature", "input": "at=input,rollout=layer"}),
    ]


def choose_single(results: dict, keep: int) -> dict:
    """The single-selection settings with the highest validation retention among those whose counted
    FLOPs are at most DivPrune's at the same keep (a tie keeps the earlier); stops where a step has
    not run yet. Options over the budget are run and shown, never chosen."""
    cap = results["runs"].get("validation " + canonical(f"divprune:keep={keep}"))
    if cap is None:
        return {"chosen": [], "rows": [], "complete": False, "missing": [f"divprune:keep={keep}"]}
    chosen, rows = ["at=feature"], []
    for step, options in single_steps():
        def on_top(setting: str) -> list[str]:   # an option replaces the chosen settings of the same names
            names = {part.partition("=")[0] for part in setting.split(",")}
            return [s for s in chosen if s.partition("=")[0] not in names] + [setting]
        specs = {label: _spec("ivtp_plus", keep, on_top(setting)) for label, setting in options.items()}
        missing = [spec for spec in specs.values() if "validation " + canonical(spec) not in results["runs"]]
        if missing:
            return {"chosen": chosen, "rows": rows, "complete": False, "missing": missing}
        done = {label: results["runs"]["validation " + canonical(spec)] for label, spec in specs.items()}
        within = [label for label in done if done[label]["flops"]["total"] <= cap["flops"]["total"]]
        best = max(within, key=lambda label: done[label]["retention"]) if within else None
        rows += [{"step": step, "label": label, "spec": specs[label], "retention": run["retention"],
                  "gflops": run["flops"]["total"] / 1e9, "within": label in within, "chosen": label == best}
                 for label, run in done.items()]
        if best is not None:
            chosen = on_top(options[best])
    return {"chosen": chosen, "spec": _spec("ivtp_plus", keep, chosen), "rows": rows, "complete": True,
            "cap_gflops": cap["flops"]["total"] / 1e9, "cap_retention": cap["retention"]}


# ---------------------------------------------------------------- choosing on the validation split

def choose(results: dict, keep: int) -> dict:
    """The settings the sweep picks (highest validation retention; a tie keeps the earlier setting),
    and the sweep's rows; stops where a step has not run yet."""
    chosen, rows = {"ivtp": [], "ivtp_plus": []}, []
    for step, options in sweep_steps(keep):
        method = "ivtp_plus" if step in PLUS_STEPS else "ivtp"
        prefix = chosen["ivtp"] + (chosen["ivtp_plus"] if method == "ivtp_plus" else [])
        specs = {label: _spec(method, keep, prefix + [setting]) for label, setting in options.items()}
        missing = [spec for spec in specs.values() if "validation " + canonical(spec) not in results["runs"]]
        if missing:
            return {"chosen": chosen, "rows": rows, "complete": False, "missing": missing}
        done = {label: (setting, results["runs"]["validation " + canonical(specs[label])])
                for label, setting in options.items()}
        best = max(done, key=lambda label: done[label][1]["retention"])     # max keeps the first of equals
        rows += [{"step": step, "label": label, "spec": _spec(method, keep, prefix + [setting]),
                  "retention": run["retention"], "gflops": run["flops"]["total"] / 1e9, "chosen": label == best}
                 for label, (setting, run) in done.items()]
        chosen[method].append(done[best][0])   # "" (the default) is dropped when a SPEC is written
    return {"chosen": chosen, "rows": rows, "complete": True}


# ---------------------------------------------------------------- running

def run(args) -> dict:
    path = args.out / "ivtp_study.json"
    results = json.loads(path.read_text()) if path.exists() else {"runs": {}, "probes": {}}
    began, earlier = time.time(), results.get("setup", {}).get("wall_seconds", 0.0)
    model, processor = toyworld.load(args.model)
    n_visual = 100
    results["setup"] = {"model": args.model, "n_visual": n_visual, "max_new_tokens": args.max_new_tokens,
                        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                                   f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)",
                        "command": args.command, "wall_seconds": earlier}
    keep = round(CLAIM * n_visual)

    def save():
        results["setup"]["wall_seconds"] = earlier + time.time() - began
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1))

    def measure(spec: str | None, split: str = "test") -> dict:
        key = f"{split} {canonical(spec) if spec else 'dense'}"
        if key not in results["runs"]:
            started = time.time()
            result = evaluate(model, processor, tokens=spec, max_new_tokens=args.max_new_tokens, progress=False,
                              split=split)
            result["spec"], result["split"], result["seconds"] = spec, split, time.time() - started
            results["runs"][key] = result
            save()
            print(f"{split:10s} {spec or 'dense':70s} retention {result['retention'] or 100:6.2f} "
                  f"GFLOPs {result['flops']['total'] / 1e9:.3f} ({result['seconds']:.0f} s)", flush=True)
        return results["runs"][key]

    if args.part == "single":
        measure(None, "validation")
        for rival in SINGLE_RIVALS:
            measure(f"{rival}:keep={keep}", "validation")
        while not (single := choose_single(results, keep))["complete"]:
            for spec in single["missing"]:
                measure(spec, "validation")
        results["single"] = single
        measure(None)
        for spec in [single["spec"], *(f"{rival}:keep={keep}" for rival in SINGLE_RIVALS)]:
            measure(spec)           # the one test-split confirmation of the validation choice
        save()
        return results
    if args.part in ("all", "sweep"):
        measure(None, "validation")
        while not (picked := choose(results, keep))["complete"]:
            for spec in picked["missing"]:      # the first step not yet run, on top of what is chosen so far
                measure(spec, "validation")
    picked = choose(results, keep)
    results["sweep"] = picked
    if not picked["complete"]:
        save()
        return results
    chosen = picked["chosen"]
    def curve(budgets):
        if args.part in ("all", "curve"):
            measure(None)
            for budget in budgets:
                for name, spec in curve_specs(round(budget * n_visual), chosen, results.get("single")).items():
                    measure(spec)

    curve([CLAIM])
    if args.part in ("all", "corrections"):
        for table in correction_specs(keep, chosen).values():
            for spec in table.values():
                measure(spec)
        ivtp_plus = measure(curve_specs(keep, chosen)["ivtp_plus"])
        for rival in ("divprune", "cdpruner"):
            spec = flops_matched(model, processor, rival, ivtp_plus["flops"]["total"])
            results.setdefault("matched", {})[rival] = spec
            measure(spec)
        counting = toyworld.test_split("counting")
        plain = [i for i in counting if question_type(i) == "how many objects"]
        for name in PROBED:
            spec = curve_specs(keep, chosen)[name]
            if canonical(spec) not in results["probes"].get("kept_on_objects", {}):
                results["probes"].setdefault("kept_on_objects", {})[canonical(spec)] = \
                    {"name": name, "spec": spec, **kept_on_objects(model, processor, spec, counting)}
                save()
        for rule in ("objects", "all-objects", "centre+background"):
            if rule not in results["probes"].get("oracle", {}):
                results["probes"].setdefault("oracle", {})[rule] = oracle_accuracy(model, processor, plain, rule, keep)
                save()
                print(f"oracle {rule}: {results['probes']['oracle'][rule]}", flush=True)
    curve([b for b in BUDGETS if b != CLAIM])
    save()
    return results


# ---------------------------------------------------------------- report

def _run(results, spec, split="test"):
    return results["runs"].get(f"{split} {canonical(spec) if spec else 'dense'}")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _interval(run: dict) -> str:
    lo, hi = run["average_interval"]
    return f"{_pct(run['average'])} [{_pct(lo)}, {_pct(hi)}]"


def curve_grid(results: dict) -> dict[str, dict[float, dict]]:
    chosen = results["sweep"]["chosen"]
    grid: dict[str, dict[float, dict]] = {}
    for budget in BUDGETS:
        for name, spec in curve_specs(round(budget * results["setup"]["n_visual"]), chosen, results.get("single")).items():
            run = _run(results, spec)
            if run:
                grid.setdefault(name, {})[budget] = run
    return grid


def plot(results: dict, path: Path) -> None:
    curves = {name: [(r["flops"]["total"] / 1e9, r["retention"]) for r in by_budget.values()]
              for name, by_budget in curve_grid(results).items()}
    plot_tradeoff(path, curves, _run(results, None)["flops"]["total"] / 1e9, results["setup"]["model"],
                  "Retention vs counted FLOPs at 5 / 11 / 22 / 33% of the visual tokens kept",
                  "retention of dense accuracy (%), full test split", bold=("ivtp", "ivtp_plus", "ivtp_plus_single", "cdpruner", "divprune"))


def by_type(results: dict, run: dict) -> dict[str, tuple[int, int]]:
    """{question type: (correct, n)} from a run's per-item outcomes on the test split."""
    counts: dict[str, list[int]] = {}
    for task, entry in run["tasks"].items():
        for item, bit in zip(toyworld.test_split(task), entry["correct"]):
            cell = counts.setdefault(f"{task}: {question_type(item)}", [0, 0])
            cell[0] += bit == "1"
            cell[1] += 1
    return {k: tuple(v) for k, v in counts.items()}


def paired(a: dict, b: dict) -> dict:
    return statistics.compare_pooled({t: e["correct"] for t, e in a["tasks"].items()},
                                     {t: e["correct"] for t, e in b["tasks"].items()}, list(a["tasks"]))


def report(results: dict) -> str:
    setup, dense = results["setup"], _run(results, None)
    sweep, grid = results["sweep"], curve_grid(results)
    tasks = list(dense["tasks"])
    lines = ["# IVTP, IVTP+ and CDPruner on the full toy test split", "",
             f"Model `{setup['model']}`, {setup['n_visual']} visual tokens, every test item (500 per task). "
             f"Built part by part (a rerun skips what the journal has); last command: `{setup['command']}` "
             f"({setup['wall_seconds'] / 60:.0f} min in all on {setup['machine']}). "
             f"Dense: {_interval(dense)}% average, {dense['flops']['total'] / 1e9:.3f} counted GFLOPs.", "",
             "## Validation sweep (validation split, 11 tokens kept)", "",
             "Coordinate ascent in the order below, each step on top of the best so far; the highest validation "
             "retention is chosen.", "", "| step | setting | validation retention % | GFLOPs | chosen |", "|---|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['label']} | {r['retention']:.2f} | {r['gflops']:.3f} | {'yes' if r['chosen'] else ''} |"
              for r in sweep["rows"]]
    lines += ["", f"Chosen IVTP settings: `{','.join(sweep['chosen']['ivtp']) or '(the paper defaults)'}`; "
              f"IVTP+: `{','.join(sweep['chosen']['ivtp_plus'])}` on top.", "",
              "## Retention against counted FLOPs (test split)", "", "![tradeoff](ivtp_tradeoff.png)", "",
              "Retention % / average accuracy % [95% interval] / GFLOPs.", "",
              "| method | " + " | ".join(f"{round(100 * b)}%" for b in BUDGETS) + " |", "|---|" + "---|" * len(BUDGETS)]
    for name in CURVE:
        cells = [f"{grid[name][b]['retention']:.1f} / {_interval(grid[name][b])} / {grid[name][b]['flops']['total'] / 1e9:.3f}"
                 if b in grid.get(name, {}) else "-" for b in BUDGETS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Specs: " + "; ".join(f"{n} `{s}`" for n, s in curve_specs(11, sweep["chosen"], results.get("single")).items()) + ".", "",
              *([("`ivtp_plus_single`: IVTP+ as one selection, the settings `--part single` chose on the validation "
                  "split at 11% (below), the keep scaled to each budget; the other budgets were not part of that choice."), ""]
                if "ivtp_plus_single" in grid else []),
              "## Paired exact McNemar tests (all 3000 items pooled)", "",
              "b: items only A answers right; c: only B.", "",
              "| A vs B | " + " | ".join(f"{round(100 * b)}%" for b in BUDGETS) + " |", "|---|" + "---|" * len(BUDGETS)]
    for a, b in PAIRS:
        cells = []
        for budget in BUDGETS:
            if budget in grid.get(a, {}) and budget in grid.get(b, {}):
                t = paired(grid[a][budget], grid[b][budget])
                cells.append(f"{t['b']}/{t['c']}, p={statistics.format_p(t['p'])}")
            else:
                cells.append("-")
        lines.append(f"| {a} vs {b} | " + " | ".join(cells) + " |")
    if results.get("matched") and CLAIM in grid.get("ivtp_plus", {}):
        plus = grid["ivtp_plus"][CLAIM]
        lines += ["", "## IVTP+ at 11% against rivals at matched counted FLOPs", "",
                  "| rival | retention % | GFLOPs | IVTP+ vs rival (b/c, p) |", "|---|---|---|---|"]
        for spec in results["matched"].values():
            run = _run(results, spec)
            if run:
                t = paired(plus, run)
                lines.append(f"| `{spec}` | {run['retention']:.2f} | {run['flops']['total'] / 1e9:.3f} | "
                             f"{t['b']}/{t['c']}, p={statistics.format_p(t['p'])} |")
    at = {n: runs[CLAIM] for n, runs in grid.items() if CLAIM in runs}
    lines += ["", "## Per task at 11% (accuracy %, test split)", "",
              "| method | " + " | ".join(tasks) + " | retention % | GFLOPs |", "|---|" + "---|" * (len(tasks) + 2)]
    for name, run in [("dense", dense), *at.items()]:
        lines.append(f"| {name} | " + " | ".join(_pct(run["tasks"][t]["accuracy"]) for t in tasks)
                     + f" | {run['retention'] or 100:.1f} | {run['flops']['total'] / 1e9:.3f} |")
    typed = {name: by_type(results, run) for name, run in [("dense", dense), *at.items()]}
    kinds = list(typed["dense"])
    lines += ["", "## Per question type at 11% (accuracy %, items in brackets)", "",
              "| question type | " + " | ".join(typed) + " |", "|---|" + "---|" * len(typed)]
    for kind in kinds:
        lines.append(f"| {kind} ({typed['dense'][kind][1]}) | "
                     + " | ".join(_pct(c / n) for c, n in (typed[m][kind] for m in typed)) + " |")
    probes = results.get("probes", {})
    if probes.get("kept_on_objects"):
        lines += ["", "## Where the kept tokens lie (counting test items, 11 kept)", "",
                  "| method | kept tokens on object patches % | objects with a kept patch % |", "|---|---|---|"]
        lines += [f"| {p['name']} | {_pct(p['object_share'])} | {_pct(p['objects_covered'])} |"
                  for p in probes["kept_on_objects"].values()]
    if probes.get("oracle"):
        lines += ["", "## Hand-picked tokens on \"how many objects are there?\" (test items, before the LLM)", "",
                  "| kept | tokens (mean) | accuracy % [95% interval] |", "|---|---|---|"]
        names = {"objects": "11 object patches, objects in turn", "all-objects": "every object patch, no background",
                 "centre+background": "each object's centre patch, the rest background (spread)"}
        lines += [f"| {names[rule]} | {o['mean_kept']:.1f} | {_pct(o['accuracy'])} [{_pct(o['interval'][0])}, "
                  f"{_pct(o['interval'][1])}] |" for rule, o in probes["oracle"].items()]
    single = results.get("single")
    if single and single.get("complete"):
        lines += single_report(results, single)
    lines += ["", "## The instruction's effect at equal tokens into the LLM (test split, 11% kept)", ""]
    for title, table in correction_specs(11, sweep["chosen"]).items():
        done = {label: _run(results, spec) for label, spec in table.items() if _run(results, spec)}
        if not done:
            continue
        ivtp = done.get("IVTP")
        lines += [f"### {title}", "", "| variant | tokens into the LLM | retention % | accuracy % [95%] | GFLOPs | vs IVTP (b/c, p) |",
                  "|---|---|---|---|---|---|"]
        for label, run in done.items():
            spec = table[label]
            into = into_llm(spec)
            test = paired(ivtp, run) if ivtp and label != "IVTP" else None
            lines.append(f"| {label} | {into} | {run['retention']:.1f} | {_interval(run)} | "
                         f"{run['flops']['total'] / 1e9:.3f} | "
                         + (f"{test['b']}/{test['c']}, p={statistics.format_p(test['p'])}" if test else "") + " |")
        lines += [""]
    return "\n".join(lines) + "\n"


def single_report(results: dict, single: dict) -> list[str]:
    """The single-selection IVTP+ sweep (validation) and its one test-split confirmation."""
    lines = ["", "## IVTP+ as one selection, within DivPrune's counted FLOPs (11 kept)", "",
             f"Validation split; coordinate ascent from `at=feature`; only options at most DivPrune's "
             f"{single['cap_gflops']:.4f} GFLOPs (validation retention {single['cap_retention']:.2f}%) can be chosen.", "",
             "| step | setting | validation retention % | GFLOPs | within DivPrune's FLOPs | chosen |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['label']} | {r['retention']:.2f} | {r['gflops']:.4f} | {'yes' if r['within'] else 'no'} | "
              f"{'yes' if r['chosen'] else ''} |" for r in single["rows"]]
    chosen = _run(results, single["spec"])
    if chosen:
        lines += ["", f"Test split, the chosen `{single['spec']}` once against the rivals (b: items only IVTP+ "
                  "answers right; c: only the rival):", "",
                  "| method | retention % | accuracy % [95%] | GFLOPs | IVTP+ vs it (b/c, p) |", "|---|---|---|---|---|",
                  f"| IVTP+ (chosen) | {chosen['retention']:.2f} | {_interval(chosen)} | {chosen['flops']['total'] / 1e9:.4f} | |"]
        for rival in SINGLE_RIVALS:
            run = _run(results, f"{rival}:keep=11")
            if run:
                t = paired(chosen, run)
                lines.append(f"| {rival} | {run['retention']:.2f} | {_interval(run)} | {run['flops']['total'] / 1e9:.4f} | "
                             f"{t['b']}/{t['c']}, p={statistics.format_p(t['p'])} |")
    return lines


def into_llm(spec: str) -> int:
    """Visual tokens entering the first LLM layer under an IVTP spec (the ViT stage's last count)."""
    from vlmprune.tokens import from_spec, scorers
    method = from_spec(spec)
    vit_sites = len(scorers.group_ends(VISION_DEPTH, method.group))
    llm_sites = len(scorers.group_ends(method.llm_layers or 3, method.llm_group)) if method.llm else 0
    threshold = 0 if method.budget == "equal" else 128 / 576 * 100
    vit, _ = scorers.ivtp_schedule(100, method.keep, vit_sites, llm_sites, threshold)
    return vit[-1]


def write(results: dict, out: Path) -> None:
    if not results.get("sweep", {}).get("complete") or not _run(results, None):
        return
    plot(results, out / "ivtp_tradeoff.png")
    (out / "ivtp_study.md").write_text(report(results))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy-large")
    parser.add_argument("--max-new-tokens", type=int, default=3, help="toy answers are a word and </s>")
    parser.add_argument("--part", choices=("all", "sweep", "curve", "corrections", "single"), default="all")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--report-only", action="store_true", help="rewrite ivtp_study.md and the plot from the JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.command = shlex.join(["python", "benchmarks/ivtp_study.py", *(sys.argv[1:] if argv is None else argv)])
    torch.manual_seed(0)
    results = json.loads((args.out / "ivtp_study.json").read_text()) if args.report_only else run(args)
    write(results, args.out)
    print(f"wrote {args.out / 'ivtp_study.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
