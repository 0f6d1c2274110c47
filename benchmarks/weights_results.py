"""Weight pruning on the toy world: retention of every method at 50%, 60%, 2:4 and 4:8 (seed 002,
Tables A1-A2 analogue), calibration pools (Table A3), ATV's alpha sweep, token-selection ablation
(A5), the MoT probe (pathway x pool), pruning time per method, and ATV's drift profile (Fig. A1).

    .venv/bin/python benchmarks/weights_results.py [--model toy-large] [--limit 50] [--nsamples 64] \
        [--part main50,time,pools,selection,alpha,mot,main60,drift]

Rows go to ``docs/results/weights.json`` as they arrive (a rerun skips rows already there), then
``docs/results/weights.md`` is rewritten from everything in the JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from vlmprune import toyworld, weights
from vlmprune.eval.harness import evaluate

OUT = Path(__file__).resolve().parent.parent / "docs" / "results"
METHODS = ("atv", "wanda", "sparsegpt", "tamp", "magnitude")
SETTINGS = {"50%": "sparsity=0.5", "60%": "sparsity=0.6", "2:4": "pattern=2:4", "4:8": "pattern=4:8"}
POOLS = {"mixed (default)": "wanda:sparsity=0.5,pool=mixed", "text-only": "wanda:sparsity=0.5,pool=text",
         "visual-only": "wanda:sparsity=0.5,pool=visual", "ATV-Pruning": "atv:sparsity=0.5"}
SELECTION = {"drift TopK (ATV)": "atv:sparsity=0.5", "ABS (attention)": "atv:sparsity=0.5,saliency=attention",
             "DBS (diversity, max-min)": "atv:sparsity=0.5,saliency=diversity",
             "random visual tokens": "atv:sparsity=0.5,select=random",
             "fixed budget (16 per sample)": "atv:sparsity=0.5,budget=16"}
ALPHAS = (0, 0.5, 1, 2, 4, 8)
PARTS = ("main50", "time", "pools", "selection", "alpha", "mot", "main60", "drift")


class Results:
    """Rows persisted to JSON as they arrive, keyed by (part, label)."""

    def __init__(self, path: Path, config: dict):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {"config": config, "rows": {}}

    def get(self, part: str, label: str):
        return self.data["rows"].get(f"{part}|{label}")

    def put(self, part: str, label: str, row: dict) -> None:
        self.data["rows"][f"{part}|{label}"] = row
        self.path.write_text(json.dumps(self.data, indent=1))


def evaluated(model, processor, args, dense) -> dict:
    result = evaluate(model, processor, limit=args.limit, reference=dense, measure=False, progress=False)
    return {"tasks": result["tasks"], "average": result["average"], "retention": result["retention"]}


def prune_and_eval(spec: str, args, calibration, dense) -> dict:
    model, processor = toyworld.load(args.model)
    report = weights.prune(model, weights.from_spec(spec), calibration=calibration)
    return {"spec": spec, "prune_seconds": report.total_seconds, "sparsity": report.sparsity,
            **evaluated(model, processor, args, dense)}


def mot_row(pathway: str, pool: str, args, calibration, dense) -> dict:
    from vlmprune.weights.mot import to_mot

    model, processor = toyworld.load(args.model)
    report = to_mot(model).prune(pathway, weights.from_spec(f"wanda:sparsity={args.mot_sparsity},pool={pool}"),
                                 calibration)
    return {"spec": f"MoT {pathway} pathway, wanda:sparsity={args.mot_sparsity},pool={pool}",
            "sparsity": report.sparsity, **evaluated(model, processor, args, dense)}


def timing_row(spec: str, args, calibration) -> dict:
    """Median over repeats of wall and process-CPU seconds (the CPU is shared, so CPU time is the
    steadier of the two)."""
    walls, cpus = [], []
    for _ in range(args.repeats):
        model, _ = toyworld.load(args.model)
        cpu = time.process_time()
        report = weights.prune(model, weights.from_spec(spec), calibration=calibration)
        cpus.append(time.process_time() - cpu)
        walls.append(report.total_seconds)
    return {"spec": spec, "wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus),
            "walls": walls, "cpus": cpus}


def run(args) -> None:
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = {"model": args.model, "limit": args.limit, "nsamples": args.nsamples, "threads": torch.get_num_threads(),
              "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}"}
    results = Results(out_dir / "weights.json", config)
    model, processor = toyworld.load(args.model)
    calibration = toyworld.calibration(processor, n=args.nsamples)
    dense_row = results.get("dense", "dense")
    if dense_row is None:
        dense_row = evaluated(model, processor, args, None)
        results.put("dense", "dense", dense_row)
    dense = dense_row["tasks"]

    def rows(part: str, jobs: dict):
        for label, job in jobs.items():
            if results.get(part, label) is None:
                print(f"[{part}] {label}", flush=True)
                results.put(part, label, job())

    for part in args.part:
        if part in ("main50", "main60"):
            keys = ("50%", "2:4") if part == "main50" else ("60%", "4:8")
            rows("main", {f"{m} {k}": (lambda s=f"{m}:{SETTINGS[k]}": prune_and_eval(s, args, calibration, dense))
                          for k in keys for m in METHODS})
        elif part == "pools":
            rows("pools", {k: (lambda s=s: prune_and_eval(s, args, calibration, dense)) for k, s in POOLS.items()})
        elif part == "selection":
            rows("selection", {k: (lambda s=s: prune_and_eval(s, args, calibration, dense))
                               for k, s in SELECTION.items()})
        elif part == "alpha":
            rows("alpha", {f"alpha={a}": (lambda s=f"atv:sparsity=0.5,alpha={a}": prune_and_eval(s, args, calibration, dense))
                           for a in ALPHAS})
        elif part == "mot":
            rows("mot", {f"{p} / {q}": (lambda p=p, q=q: mot_row(p, q, args, calibration, dense))
                         for p in ("text", "visual") for q in ("text", "visual", "mixed")})
        elif part == "time":
            rows("time", {m: (lambda s=f"{m}:sparsity=0.5": timing_row(s, args, calibration)) for m in METHODS})
        elif part == "drift":
            from vlmprune.viz.drift import plot_drift

            if results.get("drift", "profile") is None:
                profile = plot_drift(model, calibration, out_dir / "weights_drift.png")
                results.put("drift", "profile", {"profile": profile})
    (out_dir / "weights.md").write_text(markdown(results.data, args))


def _pct(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def _task_table(rows: list[tuple[str, dict]], first: str) -> list[str]:
    tasks = list(toyworld.TASKS)
    lines = [f"| {first} | " + " | ".join(tasks) + " | average | retention % |",
             "|---" * (len(tasks) + 3) + "|"]
    for label, row in rows:
        accs = [_pct(100 * row["tasks"][t]["accuracy"]) if t in row["tasks"] else "-" for t in tasks]
        lines.append(f"| {label} | " + " | ".join(accs) + f" | {_pct(100 * row['average'])} | {_pct(row.get('retention'))} |")
    return lines


def markdown(data: dict, args) -> str:
    rows = data["rows"]
    cfg = data["config"]

    def part(name):
        return [(k.split("|", 1)[1], v) for k, v in rows.items() if k.startswith(name + "|")]

    command = "`.venv/bin/python benchmarks/weights_results.py --model {model} --limit {limit} --nsamples {nsamples}`".format(**cfg)
    out = ["# Weight pruning results (toy world)", "",
           f"Model `{cfg['model']}`; {cfg['limit']} test items per task; {cfg['nsamples']} calibration samples "
           f"(toy caption pool: image + long caption); accuracy in %, retention = mean over tasks of pruned / dense "
           f"accuracy. Machine: {cfg['machine']}, {cfg['threads']} threads, CPU shared with other jobs.",
           f"Every table is produced by {command} (`--part` picks tables; rows are cached in `weights.json`).", ""]
    dense = rows.get("dense|dense")
    if dense:
        out += ["## Dense", ""] + _task_table([("dense", dense)], "model") + [""]
    main = dict(part("main"))
    for setting in SETTINGS:
        chosen = [(m, main[f"{m} {setting}"]) for m in METHODS if f"{m} {setting}" in main]
        if chosen:
            out += [f"## {setting} {'unstructured' if '%' in setting else 'semi-structured'} sparsity", ""]
            out += _task_table(chosen, "method") + [""]
    titles = {"pools": "## Calibration pools (Wanda at 50%; seed 002 Table A3)",
              "selection": "## Visual-token selection for ATV's calibration (50%; seed 002 A5)",
              "alpha": "## ATV alpha sweep (50%)",
              "mot": f"## MoT probe: one pathway pruned with Wanda at {args.mot_sparsity:.0%}, by calibration pool"}
    for name, title in titles.items():
        if part(name):
            out += [title, ""] + _task_table(part(name), "pathway / pool" if name == "mot" else "setting") + [""]
    timing = part("time")
    if timing:
        wanda = dict(timing).get("wanda")
        out += ["## Pruning time (50%, same calibration)", "",
                "| method | wall s (median) | CPU s (median) | CPU / Wanda |", "|---|---|---|---|"]
        for label, row in timing:
            ratio = f"{row['cpu_s'] / wanda['cpu_s']:.2f}" if wanda else "-"
            out.append(f"| {label} | {row['wall_s']:.2f} | {row['cpu_s']:.2f} | {ratio} |")
        out.append("")
    drift = rows.get("drift|profile")
    if drift:
        out += ["## ATV drift profile (alpha = 1; seed 002 Fig. A1)", "", "![drift](weights_drift.png)", "",
                "| block | mean visual drift | visual tokens selected per sample |", "|---|---|---|"]
        out += [f"| {p['block']} | {p['saliency']:.4f} | {p['visual_tokens']:.1f} |" for p in drift["profile"]]
        out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toy-large")
    parser.add_argument("--limit", type=int, default=50, help="test items per task")
    parser.add_argument("--nsamples", type=int, default=64, help="calibration samples")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats per method")
    parser.add_argument("--mot-sparsity", type=float, default=0.6)
    parser.add_argument("--part", type=lambda s: s.split(","), default=list(PARTS))
    parser.add_argument("--out", default=str(OUT), help="directory for weights.json, weights.md and the plot")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
