"""Visual-token pruning on the toy world: retention against counted FLOPs for every method at 50, 25,
11 and 3% of the visual tokens; IVTP's ablations; IVTP's FLOPs by part; the toy CLIP's threshold.

    .venv/bin/python benchmarks/token_results.py [--model toy-large] [--limit 100] [--part all]

Results go to ``docs/results/tokens.json`` as they arrive (a rerun skips what is there), then to
``docs/results/tokens.md`` and ``docs/results/tokens_tradeoff.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vlmprune import toyworld
from vlmprune.eval.harness import evaluate
from vlmprune.models import get_adapter

BUDGETS = (0.5, 0.25, 0.11, 0.03)
ABLATION_KEEP = 0.11
OUT = Path(__file__).resolve().parent.parent / "docs" / "results"


def method_specs(keep: int, feature_layer: int) -> dict[str, str]:
    """Every method at a final count of ``keep`` visual tokens (vision methods prune at every layer
    up to the one the LLM reads, as in IVTP's comparisons)."""
    vision_layers = "/".join(str(layer) for layer in range(1, feature_layer + 2))
    return {
        "random": f"random:keep={keep},where=vision,layers={vision_layers}",
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


def ablation_specs(keep: int) -> dict[str, dict[str, str]]:
    """IVTP's ablation tables (the paper's Tables 4-8 and supplementary Tables 4, 6, 7)."""
    base = f"ivtp:keep={keep}"
    return {
        "attention source and aggregation": {v: f"{base},rollout={v}" for v in
                                             ("residual", "layer", "group-mean", "mean", "max", "multiply")},
        "group size (ViT layers per pruning step)": {str(g): f"{base},group={g}" for g in (2, 3, 4, "all")},
        "instruction components": {"vision only (IVTP-V)": f"{base},llm=false", "OTT": f"{base},instruction=ott",
                                   "OTT+RT": f"{base},instruction=ott+rt", "OTT+TE+RT": base},
        "pseudo-[CLS]": {"LLM embeddings": base, "CLIP text embeddings": f"{base},pcls=clip",
                         "hybrid visual+text": f"{base},pcls=hybrid", "visual [CLS] only": f"{base},pcls=visual"},
        "relevance threshold tau": {str(t): f"{base},tau={t}" for t in (-0.1, 0.0, 0.07, 0.2, 0.3)},
        "LLM pruning layers": {str(n): f"{base},llm_layers={n}" for n in (1, 2, 3, 4, 6)},
    }


def calibrate_tau(limit: int) -> dict:
    """Relevance (Eq. 6) of the toy CLIP's tokens in test questions: words naming a colour, shape,
    size or digit against every other word; the threshold with the best balanced accuracy."""
    from vlmprune.toyworld.processor import build_image_processor
    from vlmprune.toyworld.scenes import COLOURS, GLYPHS, SHAPES, SIZES

    clip, tokenizer = toyworld.load_clip()
    images = build_image_processor()
    concepts = set(COLOURS) | set(SHAPES) | set(SIZES) | set(GLYPHS)
    scores: dict[str, list[float]] = {"concept": [], "other": []}
    for task in toyworld.TASKS:
        items = list(toyworld.test_split(task, limit))
        pixels = images(images=[item.image for item in items], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            embeds = clip.get_image_features(pixel_values=pixels).pooler_output
            for item, embed in zip(items, embeds):
                text = item.question.lower() + " assistant:"
                encoded = tokenizer(text, return_offsets_mapping=True, return_tensors="pt")
                tokens = clip.text_projection(clip.text_model(input_ids=encoded["input_ids"]).last_hidden_state[0])
                relevance = F.cosine_similarity(tokens, embed[None], dim=-1)
                for (start, end), value in zip(encoded["offset_mapping"][0].tolist(), relevance.tolist()):
                    if end > start:
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


def run(args) -> dict:
    path = OUT / "tokens.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    if results.get("setup", {}).get("model") != args.model or results["setup"].get("limit_per_task") != args.limit:
        results = {}                      # a different model or item count: start afresh
    results.setdefault("runs", {})
    model, processor = toyworld.load(args.model)
    torch.manual_seed(0)
    adapter = get_adapter(model)
    n_visual = adapter.patch_grid({})[0] * adapter.patch_grid({})[1]

    def save() -> None:
        OUT.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1))

    def measure(spec: str | None) -> dict:
        key = spec or "dense"
        if key not in results["runs"]:
            began = time.time()
            result = evaluate(model, processor, tokens=spec, limit=args.limit, progress=False)
            result["seconds"] = time.time() - began
            results["runs"][key] = result
            save()
            print(f"{key:60s} avg {result['average']:.3f} retention {result['retention'] or 100:.1f} "
                  f"flops {result['flops']['total'] / 1e9:.3f} G ({result['seconds']:.0f} s)", flush=True)
        return results["runs"][key]

    results["setup"] = {"model": args.model, "limit_per_task": args.limit, "n_visual": n_visual,
                        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                                   f"torch {torch.__version__}",
                        "command": " ".join([Path(sys.executable).name, *sys.argv])}
    if args.part in ("all", "calibrate") and "calibration" not in results:
        results["calibration"] = calibrate_tau(args.calibration_items)
        save()
    measure(None)
    if args.part in ("all", "main"):
        results["main"] = {}
        for budget in BUDGETS:
            keep = max(1, round(budget * n_visual))
            for name, spec in method_specs(keep, adapter.vision_feature_layer).items():
                measure(spec)
                results["main"].setdefault(name, {})[str(budget)] = spec
        save()
    if args.part in ("all", "ablations"):
        keep = round(ABLATION_KEEP * n_visual)
        results["ablations"] = ablation_specs(keep)
        for table in results["ablations"].values():
            for spec in table.values():
                measure(spec)
        save()
    return results


# ---------------------------------------------------------------- report

def _row(result: dict) -> str:
    flops = result["flops"]
    return (f"{100 * result['average']:.1f} | {result['retention'] or 100.0:.1f} | {flops['total'] / 1e9:.3f} | "
            f"{result['prefill_ms']:.1f}")


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for name, by_budget in results.get("main", {}).items():
        points = sorted((runs[spec]["flops"]["total"] / 1e9, runs[spec]["retention"] or 0.0)
                        for spec in by_budget.values() if spec in runs)
        style = dict(linewidth=2.5, color="tab:blue") if name == "ivtp" else dict(linewidth=1, alpha=0.8)
        ax.plot(*zip(*points), marker="o", label=name, **style)
    dense = runs["dense"]["flops"]["total"] / 1e9
    ax.axvline(dense, color="grey", linestyle=":", label="dense FLOPs")
    ax.axhline(100, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("counted GFLOPs per prefill (toy-large)")
    ax.set_ylabel("retention of dense accuracy (%)")
    ax.set_title("Retention vs FLOPs at 50 / 25 / 11 / 3% of the visual tokens")
    ax.legend(ncol=2, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(results: dict) -> str:
    runs, setup = results["runs"], results["setup"]
    dense = runs["dense"]
    lines = ["# Visual-token pruning on the toy world", "",
             f"Model `{setup['model']}` ({setup['n_visual']} visual tokens), {setup['limit_per_task']} test items "
             f"per task, greedy answers; retention = mean over tasks of pruned / dense accuracy. FLOPs are "
             f"counted on a meta copy for one prefill (METHODS.md section 4); `extra` is the scoring cost.",
             f"Machine: {setup['machine']}. Command: `{setup['command']}`.", "",
             f"Dense: average accuracy {100 * dense['average']:.1f}%, "
             f"{dense['flops']['total'] / 1e9:.3f} GFLOPs, prefill {dense['prefill_ms']:.1f} ms.", ""]
    if "calibration" in results:
        cal = results["calibration"]
        lines += ["## Toy CLIP relevance threshold", "",
                  f"Relevance (Eq. 6) of CLIP tokens in {cal['items_per_task']} questions per task: words naming "
                  f"a colour, shape, size or digit have mean {cal['by_kind']['concept']['mean']:.3f} "
                  f"(median {cal['by_kind']['concept']['median']:.3f}), all other words "
                  f"{cal['by_kind']['other']['mean']:.3f} (median {cal['by_kind']['other']['median']:.3f}). "
                  f"The best balanced accuracy ({100 * cal['balanced_accuracy']:.1f}%) is at tau = {cal['tau']:.2f}; "
                  "IVTP's toy default is this value (0.2 stays the default for real CLIP).", ""]
    if results.get("main"):
        lines += ["## Retention against FLOPs", "", "![tradeoff](tokens_tradeoff.png)", "",
                  "| method | " + " | ".join(f"{int(100 * b)}%: retention / GFLOPs" for b in BUDGETS) + " |",
                  "|---|" + "---|" * len(BUDGETS)]
        for name, by_budget in results["main"].items():
            cells = []
            for budget in BUDGETS:
                run = runs.get(by_budget.get(str(budget), ""))
                cells.append("-" if run is None else f"{run['retention'] or 0:.1f} / {run['flops']['total'] / 1e9:.3f}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += [""]
    if results.get("ablations"):
        lines += [f"## IVTP ablations (keep {int(100 * ABLATION_KEEP)}%)", ""]
        for title, table in results["ablations"].items():
            lines += [f"### {title}", "", "| setting | accuracy % | retention % | GFLOPs | prefill ms |", "|---|---|---|---|---|"]
            lines += [f"| {label} | {_row(runs[spec])} |" for label, spec in table.items() if spec in runs]
            lines += [""]
    lines += ["## FLOPs by part (keep 11%)", "", "| run | vision | projector | llm | extra | total |", "|---|---|---|---|---|---|"]
    picks = {"dense": "dense"}
    for name in ("ivtp", "topk", "tome", "fastv", "random"):
        spec = results.get("main", {}).get(name, {}).get(str(ABLATION_KEEP))
        if spec:
            picks[name] = spec
    ivtp_v = results.get("ablations", {}).get("instruction components", {}).get("vision only (IVTP-V)")
    if ivtp_v:
        picks["ivtp-v"] = ivtp_v
    for label, spec in picks.items():
        if spec in runs:
            f = runs[spec]["flops"]
            lines.append(f"| {label} | " + " | ".join(f"{f[p] / 1e9:.4f}" for p in
                                                    ("vision", "projector", "llm", "extra", "total")) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy-large")
    parser.add_argument("--limit", type=int, default=100, help="test items per task")
    parser.add_argument("--calibration-items", type=int, default=40, help="questions per task for tau")
    parser.add_argument("--part", choices=("all", "main", "ablations", "calibrate"), default="all")
    args = parser.parse_args(argv)
    results = run(args)
    if results.get("main"):
        plot(results, OUT / "tokens_tradeoff.png")
    (OUT / "tokens.md").write_text(report(results))
    print(f"wrote {OUT / 'tokens.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
