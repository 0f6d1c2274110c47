"""Visual-token pruning on the toy world: retention against counted FLOPs for every method at 50, 25,
11 and 3% of the visual tokens; IVTP's ablations; IVTP's FLOPs by part; the toy CLIP's threshold.

    .venv/bin/python benchmarks/token_results.py [--model toy-large] [--limit 100] [--part all] [--out DIR]

Results go to ``DIR/tokens.json`` (default ``docs/results``) as they arrive (a rerun with the same
model, item count and answer length skips what is there), then to ``DIR/tokens.md`` and
``DIR/tokens_tradeoff.png``. The dense model is evaluated once and is the reference of every run;
settings that name the same configuration (``ivtp:keep=11`` and ``ivtp:keep=11,rollout=residual``)
share one evaluation and one FLOP count.
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
from pathlib import Path

import torch

from vlmprune import toyworld
from vlmprune.eval.harness import evaluate
from vlmprune.models import get_adapter
from vlmprune.tokens.methods.ivtp import TAU_TOY_CLIP

BUDGETS = (0.5, 0.25, 0.11, 0.03)
ABLATION_KEEP = 0.11
OUT = Path(__file__).resolve().parent.parent / "docs" / "results"
TAUS = (-0.3, -0.2, -0.11, 0.0, 0.1, 0.3)
GROUPS = (2, 3, 4, 6, "all")
LLM_DEPTHS = (1, 2, 3, 4, 6)


def method_specs(keep: int, vision_layers: int) -> dict[str, str]:
    """Every method at a final count of ``keep`` visual tokens (vision methods prune after every one
    of the ``vision_layers`` tower layers up to the one the LLM reads, as in IVTP's comparisons)."""
    random_layers = "/".join(str(layer) for layer in range(1, vision_layers + 1))
    return {
        "random": f"random:keep={keep},where=vision,layers={random_layers}",
        "topk": f"topk:keep={keep}",
        "pooling": f"pooling:keep={keep}",
        "downsample": f"downsample:keep={keep}",
        "evit": f"evit:keep={keep}",
        "tome": f"tome:keep={keep}",
        "fastv": f"fastv:layer=2,keep={keep}",
        "fastervlm": f"fastervlm:keep={keep}",
        "visionzip": f"visionzip:keep={keep}",
        "divprune": f"divprune:keep={keep}",
        "pyramiddrop": f"pyramiddrop:keep={keep}",
        "ivtp": f"ivtp:keep={keep}",
    }


def ablation_specs(keep: int, vision_layers: int, llm_layers: int) -> dict[str, dict[str, str]]:
    """IVTP's ablation tables (the paper's Tables 4-8 and supplementary Tables 4, 6, 7), each row
    labelled with the layers it prunes after where that is what changes. ``vision_layers``: the
    tower layers up to the one the LLM reads; ``llm_layers``: the decoder's depth."""
    from vlmprune.tokens.scorers import group_ends

    base = f"ivtp:keep={keep}"

    def after(last: int, every: int) -> str:
        return "/".join(str(layer) for layer in group_ends(last, every))

    return {
        "attention source (group of 3)": {"rollout": base, "single layer (the group's last)": f"{base},rollout=layer",
                                          "group mean": f"{base},rollout=group-mean"},
        "rollout aggregation": {v: f"{base},rollout={v}" for v in ("residual", "mean", "max", "multiply")},
        "group size (ViT layers per pruning step)": {
            f"{g} (prunes after ViT layer {after(vision_layers, vision_layers if g == 'all' else g)})":
                f"{base},group={g}" for g in GROUPS},
        "instruction components": {"vision only (IVTP-V)": f"{base},llm=false", "OTT": f"{base},instruction=ott",
                                   "OTT+RT": f"{base},instruction=ott+rt", "OTT+TE+RT": base},
        "pseudo-[CLS]": {"LLM embeddings": base, "CLIP text embeddings": f"{base},pcls=clip",
                         "hybrid visual+text": f"{base},pcls=hybrid", "visual [CLS] only": f"{base},pcls=visual",
                         "LLM embeddings, kept as a real token": f"{base},real_pcls=true"},
        "relevance threshold tau": {f"{t}{' (toy default)' if t == TAU_TOY_CLIP else ''}": f"{base},tau={t}"
                                    for t in TAUS},
        "LLM pruning layers (groups of 3)": {
            f"{n} (prunes after LLM layer {after(n, 3)})": f"{base},llm_layers={n}"
            for n in LLM_DEPTHS if n < llm_layers},
    }


def calibrate_tau(limit: int) -> dict:
    """Relevance (Eq. 6) of the toy CLIP's tokens in test questions: words naming a colour, shape,
    size or digit against every other word; the threshold with the best balanced accuracy."""
    from vlmprune.tokens.text_relevance import clip_token_relevance
    from vlmprune.toyworld.processor import build_image_processor
    from vlmprune.toyworld.scenes import COLOURS, GLYPHS, SHAPES, SIZES

    clip, tokenizer = toyworld.load_clip()
    images = build_image_processor()
    concepts = set(COLOURS) | set(SHAPES) | set(SIZES) | set(GLYPHS)
    scores: dict[str, list[float]] = {"concept": [], "other": []}
    for task in toyworld.TASKS:
        items = list(toyworld.test_split(task, limit))
        pixels = images(images=[item.image for item in items], return_tensors="pt")["pixel_values"]
        texts = [item.question.lower() + " assistant:" for item in items]  # what IVTP scores: the turn's text
        for text, (offsets, relevance) in zip(texts, clip_token_relevance(clip, tokenizer, pixels, texts)):
            for (start, end), value in zip(offsets, relevance.tolist()):
                word_start = text.rfind(" ", 0, start) + 1
                word_end = text.find(" ", end) if " " in text[end:] else len(text)
                word = text[word_start:word_end].strip("?:,.")
                scores["concept" if word in concepts else "other"].append(value)

    def balanced(tau: float) -> float:
        hits = sum(v >= tau for v in scores["concept"]) / len(scores["concept"])
        rejects = sum(v < tau for v in scores["other"]) / len(scores["other"])
        return (hits + rejects) / 2

    accuracy, tau = max((balanced(t / 100), t / 100) for t in range(-50, 81))
    summary = {k: {"n": len(v), "mean": statistics.mean(v), "median": statistics.median(v)} for k, v in scores.items()}
    return {"tau": tau, "balanced_accuracy": accuracy, "by_kind": summary, "items_per_task": limit}


def jobs(n_visual: int, vision_layers: int, llm_layers: int) -> list[tuple[str, str, str]]:
    """(section, label, spec) in the order they run: the comparison at 11% first (the claim to
    check), then the other budgets, then the ablations; a run cut short still reports the first."""
    order = (ABLATION_KEEP, 0.25, 0.03, 0.5)
    first = ("ivtp", "topk", "random", "tome", "fastv")
    queue = []
    for budget in order:
        specs = method_specs(max(1, round(budget * n_visual)), vision_layers)
        names = sorted(specs, key=lambda name: first.index(name) if name in first else len(first))
        queue += [("main", f"{name}@{budget}", specs[name]) for name in names]
    for title, table in ablation_specs(round(ABLATION_KEEP * n_visual), vision_layers, llm_layers).items():
        queue += [(title, label, spec) for label, spec in table.items()]
    return queue


def canonical(spec: str) -> str:
    """The method's own SPEC, every setting spelled out: one key per distinct configuration (a key,
    not always parseable back: list settings print as lists)."""
    from vlmprune.tokens import from_spec
    return from_spec(spec).spec()


def run(args, on_result) -> dict:
    from vlmprune.measure.flops import count_flops
    from vlmprune.models.presets import Preset, default_image_size
    from vlmprune.tokens import from_spec

    began = time.time()
    path = args.out / "tokens.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    setup = results.get("setup", {})
    if (setup.get("model"), setup.get("limit_per_task"), setup.get("max_new_tokens")) != \
            (args.model, args.limit, args.max_new_tokens):
        results = {}                      # a different model, item count or answer length: start afresh
    earlier_seconds = results.get("setup", {}).get("wall_seconds", 0.0)
    invocations = results.get("setup", {}).get("invocations", 0) + 1
    results.setdefault("runs", {})
    model, processor = toyworld.load(args.model)
    adapter = get_adapter(model)
    rows, cols = adapter.patch_grid({})
    preset = Preset(args.model, model.config, default_image_size(model.config))
    question = toyworld.test_split(toyworld.TASKS[0], 1)[0].question
    prompt = processor.tokenizer(toyworld.build_prompt(processor, question))["input_ids"]
    text_tokens = len(prompt) - prompt.count(model.config.image_token_id) + 1   # the prompt's text, one image
    results["setup"] = {"model": args.model, "limit_per_task": args.limit, "n_visual": rows * cols,
                        "text_tokens": text_tokens, "max_new_tokens": args.max_new_tokens,
                        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                                   f"torch {torch.__version__}",
                        "command": args.command, "wall_seconds": earlier_seconds, "invocations": invocations}

    def save() -> None:
        results["setup"]["wall_seconds"] = earlier_seconds + time.time() - began
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1))
        on_result(results)

    def measure(key: str, spec: str | None) -> None:
        if key in results["runs"]:
            return
        started = time.time()
        reference = results["runs"]["dense"]["tasks"] if spec else None
        result = evaluate(model, processor, tokens=spec, limit=args.limit, max_new_tokens=args.max_new_tokens,
                          reference=reference, measure=False, progress=False)
        result["flops"] = count_flops(preset, text_tokens, from_spec(spec) if spec else None).flops.as_dict()
        result["seconds"] = time.time() - started
        results["runs"][key] = result
        save()
        print(f"{spec or 'dense':60s} avg {result['average']:.3f} retention {result['retention'] or 100:.1f} "
              f"GFLOPs {result['flops']['total'] / 1e9:.3f} ({result['seconds']:.0f} s)", flush=True)

    if args.part in ("all", "calibrate") and "calibration" not in results:
        results["calibration"] = calibrate_tau(args.calibration_items)
        results["calibration"]["text_encoder_flops"] = text_encoder_flops(question)
        save()
    measure("dense", None)
    results["tables"] = {}                # every table, so that a partial rerun still reports them all
    queue = jobs(rows * cols, adapter.vision_feature_layer + 1, model.config.text_config.num_hidden_layers)
    for section, label, spec in queue:
        results["tables"].setdefault(section, {})[label] = canonical(spec)
    for section, label, spec in queue:
        if args.part in ("all", "main" if section == "main" else "ablations"):
            measure(results["tables"][section][label], spec)
    save()
    return results


def text_encoder_flops(question: str) -> float:
    """FLOPs of the toy CLIP text encoder and projection on one real question (what IVTP's relevance
    costs per sample; the meta-copy count runs on placeholder text)."""
    from torch.utils.flop_counter import FlopCounterMode

    clip, tokenizer = toyworld.load_clip()
    ids = tokenizer(question.lower() + " assistant:", return_tensors="pt")["input_ids"]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        clip.text_projection(clip.text_model(input_ids=ids).last_hidden_state)
    return float(counter.get_total_flops())


# ---------------------------------------------------------------- report

def _main_grid(results: dict) -> dict[str, dict[float, dict]]:
    """{method: {budget: run}} for the runs of the main comparison that finished."""
    grid: dict[str, dict[float, dict]] = {}
    for label, spec in results.get("tables", {}).get("main", {}).items():
        name, budget = label.split("@")
        if spec in results["runs"]:
            grid.setdefault(name, {})[float(budget)] = results["runs"][spec]
    return grid


def plot_tradeoff(path: Path, curves: dict[str, list[tuple[float, float]]], dense_gflops: float, model: str,
                  title: str, ylabel: str, bold: tuple[str, ...]) -> None:
    """Retention against counted GFLOPs, one line per method (``curves``: name -> (GFLOPs, retention)
    points), the ``bold`` methods drawn heavier, the dense model's FLOPs and 100% as guides."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for name, points in curves.items():
        style = dict(linewidth=2.5, zorder=5) if name in bold else dict(linewidth=1, alpha=0.8)
        ax.plot(*zip(*sorted(points)), marker="o", label=name, **style)
    ax.axvline(dense_gflops, color="grey", linestyle=":", label="dense")
    ax.axhline(100, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel(f"counted GFLOPs per prefill ({model})")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(ncol=2, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot(results: dict, path: Path) -> None:
    curves = {name: [(run["flops"]["total"] / 1e9, run["retention"] or 0.0) for run in by_budget.values()]
              for name, by_budget in _main_grid(results).items()}
    plot_tradeoff(path, curves, results["runs"]["dense"]["flops"]["total"] / 1e9, results["setup"]["model"],
                  "Retention vs FLOPs at 50 / 25 / 11 / 3% of the visual tokens", "retention of dense accuracy (%)",
                  bold=("ivtp",))


IMPLEMENTATION_NOTES = """## How the methods are implemented

All methods run on the same engine (`vlmprune.tokens.apply`), one file each in
`src/vlmprune/tokens/methods/`, with the shared math in `src/vlmprune/tokens/scorers.py`.

- **IVTP** (`ivtp`): GTP in the vision tower after every 3 layers up to the layer LLaVA reads (toy: sites
  after layers 3 and 5), residual rollout with rows renormalised, ATS significance with the group's last
  value norms; then a pseudo-[CLS] (mean LLM input embedding of the instruction tokens whose aligned CLIP
  relevance passes tau; fallback: the tower's [CLS] through the projector) inserted after the visual tokens,
  masked as a key, and GTP on its rollout row in the first 12/32 of the LLM layers in groups of 3 (toy:
  one step after LLM layer 3). 2n rule with 128/576 of the visual tokens as threshold. `x_cls^V` is the
  pruned tower's [CLS] run through the remaining CLIP layers, post-norm and projection (no second vision
  pass). Towers without [CLS] (SigLIP, Qwen2-VL): no vision stage, the LLM stage takes the whole budget and
  the pseudo-[CLS] is the mean of the instruction (OTT). Not supported: keeping the pseudo-[CLS] as a real
  token (the engine always masks and drops a scoring token).
- **Scoring cost**: the engine keeps SDPA, so every attention map a method reads is recomputed from the
  recorded layer input (q/k/v projections included); IVTP's rollout reads full maps of each group's earlier
  layers and the query row of the last, which is why its `extra` is larger than in the paper (which reads
  eager attention maps for free).
- **TopK / EViT / ToMe / Random**: prune after every vision layer up to the one LLaVA reads, the same number
  each time. ToMe matches on the previous layer's keys with heads concatenated (the engine exposes keys
  as H*d; ToMe uses their head mean), merges by size-weighted mean and passes sizes for proportional attention.
- **FasterVLM / VisionZip**: [CLS] attention of the feature layer, once, before the projector; VisionZip
  keeps 54/64 dominant and merges the rest into 10/64 contextual tokens by key similarity.
- **Spatial pooling / image downsampling**: square grids only (`round(sqrt(keep))**2` tokens). Downsampling
  replaces the patch tokens at the tower input by those of the image resized to that grid (antialiased
  bilinear, interpolated position embeddings): exactly what the tower computes for a smaller image.
- **DivPrune** (projector outputs, max-min cosine distance), **FastV** (layer 2), **PyramidDrop** (1/4, 1/2,
  3/4 depth; with `keep` the per-stage ratio is `(keep/n)^(1/3)`) prune inside or before the LLM.
"""


def _flops(run: dict) -> str:
    return f"{run['flops']['total'] / 1e9:.3f}"


def report(results: dict) -> str:
    runs, setup = results["runs"], results["setup"]
    dense = runs["dense"]
    lines = ["# Visual-token pruning on the toy world", "",
             f"Model `{setup['model']}` ({setup['n_visual']} visual tokens, prompts of about {setup['text_tokens']} "
             f"text tokens), the first {setup['limit_per_task']} test items of each task, greedy answers of at most "
             f"{setup['max_new_tokens']} tokens. Retention = mean over tasks of pruned / dense accuracy on the same "
             "items. FLOPs are counted for one prefill on a meta copy of the model (METHODS.md section 4); "
             "`extra` is what scoring costs (attention reads, rollout, similarity, the CLIP text encoder).",
             f"Machine: {setup['machine']}.", "",
             f"Command: `{setup['command']}`; wall time {setup.get('wall_seconds', 0) / 60:.1f} min"
             + (f" over {setup['invocations']} invocations (a rerun resumes from `tokens.json`)"
                if setup.get("invocations", 1) > 1 else "") + ".", "",
             f"Dense: average accuracy {100 * dense['average']:.1f}%, {_flops(dense)} GFLOPs "
             f"(vision {dense['flops']['vision'] / 1e9:.3f}, LLM {dense['flops']['llm'] / 1e9:.3f}).", "",
             IMPLEMENTATION_NOTES]
    if "calibration" in results:
        cal = results["calibration"]
        lines += ["## Toy CLIP relevance threshold", "",
                  f"Relevance (Eq. 6) of the toy CLIP's text tokens in {cal['items_per_task']} questions per task: "
                  f"words naming a colour, shape, size or digit have mean {cal['by_kind']['concept']['mean']:.3f} "
                  f"(median {cal['by_kind']['concept']['median']:.3f}, n={cal['by_kind']['concept']['n']}), all other "
                  f"words {cal['by_kind']['other']['mean']:.3f} (median {cal['by_kind']['other']['median']:.3f}, "
                  f"n={cal['by_kind']['other']['n']}). The best balanced accuracy of `c >= tau` "
                  f"({100 * cal['balanced_accuracy']:.1f}%) is at tau = {cal['tau']:.2f}. Every IVTP run here uses the "
                  f"toy default tau = {TAU_TOY_CLIP}, from the same calibration on 100 questions per task "
                  "(`--part calibrate --calibration-items 100`; balanced accuracy is flat near its best, so the "
                  "argmax moves with the sample); 0.2 stays the default for real CLIP. The text encoder costs "
                  f"{cal['text_encoder_flops'] / 1e6:.1f} MFLOPs on a real question; the FLOPs counts below run it on "
                  "the placeholder prompt of the meta copy, whose text is only special tokens (so ~0 there).", ""]
    grid = _main_grid(results)
    if grid:
        lines += ["## Retention against FLOPs", "", "![tradeoff](tokens_tradeoff.png)", "",
                  "Retention % / counted GFLOPs at each share of the visual tokens (- = not run).", "",
                  "| method | " + " | ".join(f"{int(100 * b)}%" for b in BUDGETS) + " |", "|---|" + "---|" * len(BUDGETS)]
        for name, by_budget in grid.items():
            cells = [f"{by_budget[b]['retention'] or 0:.1f} / {_flops(by_budget[b])}" if b in by_budget else "-"
                     for b in BUDGETS]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += [""]
    at_claim = {name: runs_[ABLATION_KEEP] for name, runs_ in grid.items() if ABLATION_KEEP in runs_}
    if "ivtp" in at_claim:
        ivtp = at_claim["ivtp"]["retention"] or 0.0
        rivals = {n: at_claim[n]["retention"] or 0.0 for n in ("topk", "random", "tome", "fastv") if n in at_claim}
        beaten = [n for n, r in rivals.items() if ivtp > r]
        missed = sorted(set(rivals) - set(beaten))
        verdict = (f"it beats all of {', '.join(beaten)}" if not missed else
                   f"it beats {', '.join(beaten) or 'none of them'} and not {', '.join(missed)}")
        lines += ["## The claim at 11% of the visual tokens", "",
                  f"IVTP keeps {ivtp:.1f}% of dense accuracy (target: >= 97%); {verdict} "
                  f"({', '.join(f'{n} {r:.1f}%' for n, r in rivals.items())}). With "
                  f"{setup['limit_per_task']} items per task one answer moves a task's accuracy by "
                  f"{100 / setup['limit_per_task']:g} percentage points, and on tasks where dense is near chance the "
                  "ratio compares chance with chance.", ""]
    for title, table in results.get("tables", {}).items():
        done = {label: runs[spec] for label, spec in table.items() if spec in runs}
        if title == "main" or not done:
            continue
        lines += [f"## IVTP ablation: {title} (keep {int(100 * ABLATION_KEEP)}%)", "",
                  "| setting | accuracy % | retention % | GFLOPs |", "|---|---|---|---|"]
        lines += [f"| {label} | {100 * run['average']:.1f} | {run['retention'] or 0:.1f} | {_flops(run)} |"
                  for label, run in done.items()]
        lines += [""]
    picks = {"dense": dense,
             **{f"ivtp {int(100 * b)}%": grid["ivtp"][b] for b in BUDGETS if b in grid.get("ivtp", {})},
             **{f"{name} {int(100 * ABLATION_KEEP)}%": grid[name][ABLATION_KEEP]
                for name in ("topk", "tome", "fastv", "random") if ABLATION_KEEP in grid.get(name, {})}}
    lines += ["## FLOPs by part (GFLOPs)", "",
              "IVTP at every budget, then the rivals of the claim at 11%. `extra`: scoring (attention reads, "
              "rollout, the CLIP text encoder on the placeholder prompt).", "",
              "| run | vision | projector | llm | extra | total |", "|---|---|---|---|---|---|"]
    lines += [f"| {label} | " + " | ".join(f"{run['flops'][p] / 1e9:.4f}" for p in
                                         ("vision", "projector", "llm", "extra", "total")) + " |"
              for label, run in picks.items()]
    return "\n".join(lines) + "\n"


def write(results: dict, out: Path) -> None:
    if "dense" not in results["runs"]:
        return
    if _main_grid(results):
        plot(results, out / "tokens_tradeoff.png")
    (out / "tokens.md").write_text(report(results))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy-large")
    parser.add_argument("--limit", type=int, default=100, help="test items per task")
    parser.add_argument("--max-new-tokens", type=int, default=3, help="toy answers are a word and </s>")
    parser.add_argument("--calibration-items", type=int, default=40, help="questions per task for tau")
    parser.add_argument("--part", choices=("all", "main", "ablations", "calibrate"), default="all")
    parser.add_argument("--out", type=Path, default=OUT, help="directory for tokens.json, tokens.md and the plot")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 is fastest on a CPU shared with other jobs)")
    parser.add_argument("--report-only", action="store_true", help="rewrite tokens.md from tokens.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.command = shlex.join(["python", "benchmarks/token_results.py", *(sys.argv[1:] if argv is None else argv)])
    torch.manual_seed(0)
    if args.report_only:
        write(json.loads((args.out / "tokens.json").read_text()), args.out)
    else:
        run(args, on_result=lambda results: write(results, args.out))
    print(f"wrote {args.out / 'tokens.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
