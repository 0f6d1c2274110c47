"""Weight pruning on the toy world: every method at 50%, 60%, 2:4 and 4:8 (seed 002, Tables A1-A2
analogue) with SparseGPT on ATV-selected calibration, Wanda on the text-only pool and TAMP with DAS;
calibration pools (Table A3); token-selection ablation (A5) with each row's mean K; the modality-gap
probe; Wanda calibrated on question-answer samples; pruning time; ATV's drift profile (Fig. A1); on
request ATV's alpha sweep and the MoT probe. Each row keeps its per-item outcomes, and weights.md
gives every average with its 95% interval and the paired exact McNemar tests of the claims.

    .venv/bin/python benchmarks/weights_results.py [--model toy-large] [--limit N] [--nsamples 64] \
        [--part main50,main60,selection,pools,probe,qa,time,drift,alpha,mot] [--out DIR] [--quick]

Without ``--limit`` every row is evaluated on the full test split (500 items per task).
Rows go to ``DIR/weights.json`` (default ``docs/results``) as they arrive; a rerun with the same
model, limit and calibration skips rows already there, then ``DIR/weights.md`` is rewritten from
everything in the JSON. ``--quick`` is a smoke run (2 items per task, 4 calibration samples, one
timing repeat) written to a temporary directory unless ``--out`` is given.

The run is kept cheap: the dense model is loaded, evaluated and run up to LLM block 0 on the
calibration samples once; each row prunes a copy of it from that capture; a SPEC that several
tables share (ATV at 50% is in four of them) is pruned and evaluated once. Only the timing rows
prune from scratch, capture included, since that is the cost they measure.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vlmprune import toyworld, weights
from vlmprune.toyworld.tasks import validation_split
from vlmprune.eval.harness import evaluate
from vlmprune.eval.statistics import compare_pooled, format_p

OUT = Path(__file__).resolve().parent.parent / "docs" / "results"
QUICK_OUT = Path(tempfile.gettempdir()) / "vlmprune_weights_quick"
METHODS = ("atv", "wanda", "sparsegpt", "tamp", "magnitude")
SETTINGS = {"50%": "sparsity=0.5", "60%": "sparsity=0.6", "2:4": "pattern=2:4", "4:8": "pattern=4:8"}
# Rows beside the five methods, label -> SPEC prefix: ATV-selected calibration for SparseGPT's Hessian,
# Wanda on the text-only pool (the modality-gap remedy), TAMP with DAS (unstructured only: N:M fixes
# every layer's sparsity, so DAS has nothing to allocate there).
VARIANTS = {"sparsegpt pool=atv": ("sparsegpt:pool=atv", tuple(SETTINGS)),
            "wanda pool=text": ("wanda:pool=text", tuple(SETTINGS)),
            "tamp das=1": ("tamp:das=1", ("50%", "60%"))}
# Paired comparisons (A, B) in every setting, pooled over tasks: the claims the tables make.
CLAIMS = (("atv", "wanda"), ("atv", "wanda pool=text"), ("atv", "tamp"), ("atv", "sparsegpt"), ("magnitude", "wanda"),
          ("sparsegpt pool=atv", "sparsegpt"), ("wanda pool=text", "wanda"), ("wanda pool=text", "magnitude"),
          ("tamp das=1", "tamp"))
# In vlmprune.weights.pools "all" and "mixed" are one pool (every token of the image-text samples).
POOLS = {"all tokens = mixed (Wanda's default)": "wanda:sparsity=0.5,pool=mixed",
         "text-only": "wanda:sparsity=0.5,pool=text", "visual-only": "wanda:sparsity=0.5,pool=visual",
         "ATV-Pruning (all text + drifting visual)": "atv:sparsity=0.5"}
SELECTION = {"drift TopK (ATV)": "atv:sparsity=0.5", "ABS (attention, relative scale)": "atv:sparsity=0.5,saliency=attention",
             "ABS literal (attention-literal)": "atv:sparsity=0.5,saliency=attention-literal",
             "DBS (diversity, max-min)": "atv:sparsity=0.5,saliency=diversity",
             "random visual tokens": "atv:sparsity=0.5,select=random",
             "fixed budget (16 per sample)": "atv:sparsity=0.5,budget=16"}
ALPHAS = (0, 0.5, 1, 2, 4, 8)
MOT_PATHWAYS, MOT_POOLS = ("text", "visual"), ("text", "visual", "mixed")
PARTS = ("main50", "main60", "selection", "pools", "probe", "qa", "time", "drift", "alpha", "mot")
SAME_RUN = ("model", "limit", "nsamples", "mot_sparsity")        # rows cached under other values are not reused


def qa_calibration(processor, n: int) -> list:
    """``n`` question-answer samples (batch 1) from the validation split, tasks in turn: an image, a
    question and its answer, the form of the test prompts (the validation split shares no scene
    with the test split). Calibration whose text is where answers are produced, against the
    modality gap of the caption pool."""
    per_task = {task: validation_split(task, -(-n // len(toyworld.TASKS))) for task in toyworld.TASKS}
    items = [per_task[task][i] for i in range(-(-n // len(toyworld.TASKS))) for task in toyworld.TASKS][:n]
    samples = []
    for item in items:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": item.question}]},
                    {"role": "assistant", "content": [{"type": "text", "text": item.answer}]}]
        samples.append(processor(images=[item.image], text=[processor.apply_chat_template(messages)],
                                 return_tensors="pt"))
    return samples


class Results:
    """Rows persisted to JSON as they arrive, keyed by (part, label)."""

    def __init__(self, path: Path, config: dict):
        self.path = path
        previous = json.loads(path.read_text()) if path.exists() else None
        same = previous is not None and all(previous["config"].get(k) == config[k] for k in SAME_RUN)
        self.data = previous if same else {"config": config, "rows": {}}

    def get(self, part: str, label: str):
        return self.data["rows"].get(f"{part}|{label}")

    def with_spec(self, spec: str, calibration: str = "captions"):
        """An evaluated row of any table pruned with ``spec`` (the same method and settings, whatever
        the order of its keys) on the same calibration set, to share instead of recomputing."""
        wanted = weights.from_spec(spec).describe()
        return next((row for row in self.data["rows"].values() if "tasks" in row
                     and row.get("calibration", "captions") == calibration and row.get("spec", "").split(":")[0]
                     in weights.REGISTRY and weights.from_spec(row["spec"]).describe() == wanted), None)

    def put(self, part: str, label: str, row: dict) -> None:
        self.data["rows"][f"{part}|{label}"] = row
        self.path.write_text(json.dumps(self.data, indent=1))


class Bench:
    """The dense model, its evaluation and its calibration capture, shared by every row."""

    def __init__(self, args, results: Results):
        self.args, self.results = args, results
        self.model, self.processor = toyworld.load(args.model)
        self.calibration = toyworld.calibration(self.processor, n=args.nsamples)
        self.captured = weights.capture(self.model, self.calibration)
        self._qa = None
        dense = results.get("dense", "dense")
        if dense is None:
            dense = self.evaluated(self.model)
            results.put("dense", "dense", dense)
        self.dense_tasks = dense["tasks"]

    def evaluated(self, model, reference=None) -> dict:
        """Per task: accuracy, n, 95% interval and the per-item outcomes the paired tests read."""
        result = evaluate(model, self.processor, limit=self.args.limit, reference=reference, measure=False,
                          progress=False)
        return {"tasks": result["tasks"], "average": result["average"],
                "average_interval": result["average_interval"], "retention": result["retention"]}

    def qa(self) -> tuple[list, object]:
        """The question-answer calibration set and its block-0 capture, built on first use."""
        if self._qa is None:
            samples = qa_calibration(self.processor, self.args.nsamples)
            self._qa = samples, weights.capture(self.model, samples)
        return self._qa

    def pruned(self, spec: str, calibration: str = "captions") -> dict:
        """Prune a copy of the dense model with ``spec`` and evaluate it (once per SPEC and calibration
        set: ``captions``, the toy caption pool, or ``qa``, see :func:`qa_calibration`)."""
        shared = self.results.with_spec(spec, calibration)
        if shared is not None:
            return shared
        samples, captured = (self.calibration, self.captured) if calibration == "captions" else self.qa()
        model = copy.deepcopy(self.model)
        method = weights.from_spec(spec)
        report = weights.prune(model, method, calibration=samples, captured=captured)
        row = {"spec": spec, "calibration": calibration, "prune_seconds": report.total_seconds,
               "sparsity": report.sparsity}
        history = getattr(method, "history", None)
        if history:     # ATV variants: visual tokens selected per sample, per block
            row["visual_tokens"] = [h["visual_tokens"] for h in history]
        return {**row, **self.evaluated(model, self.dense_tasks)}

    def probe(self, calibration: str = "captions") -> dict:
        """The modality gap behind magnitude beating Wanda (see vlmprune.weights.modality_gap)."""
        from vlmprune.weights.modality_gap import modality_gap

        items = [item for task in toyworld.TASKS for item in toyworld.test_split(task, self.args.probe_items)]
        prompts = [self.processor(images=[item.image], text=[toyworld.build_prompt(self.processor, item.question)],
                                  return_tensors="pt") for item in items]
        samples = self.calibration if calibration == "captions" else self.qa()[0]
        return {"items": len(items), "calibration": calibration, "blocks": modality_gap(self.model, samples, prompts)}

    def mot(self, pathway: str, pool: str) -> dict:
        from vlmprune.weights.mot import to_mot

        model = copy.deepcopy(self.model)
        method = f"wanda:sparsity={self.args.mot_sparsity},pool={pool}"
        report = to_mot(model).prune(pathway, weights.from_spec(method), self.calibration, captured=self.captured)
        return {"spec": f"MoT {pathway} pathway, {method}", "sparsity": report.sparsity,
                **self.evaluated(model, self.dense_tasks)}

    def timing(self, spec: str) -> dict:
        """Median over repeats of wall and process-CPU seconds of a whole prune, capture included
        (the CPU is shared, so CPU time is the steadier of the two)."""
        walls, cpus = [], []
        for _ in range(self.args.repeats):
            model = copy.deepcopy(self.model)
            cpu = time.process_time()
            report = weights.prune(model, weights.from_spec(spec), calibration=self.calibration)
            cpus.append(time.process_time() - cpu)
            walls.append(report.total_seconds)
        return {"spec": spec, "wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus),
                "walls": walls, "cpus": cpus}


def jobs_of(part: str, bench: Bench) -> tuple[str, dict]:
    """The table a ``--part`` fills and its rows, label -> how to compute the row."""
    if part in ("main50", "main60"):
        keys = ("50%", "2:4") if part == "main50" else ("60%", "4:8")
        specs = {f"{m} {k}": f"{m}:{SETTINGS[k]}" for k in keys for m in METHODS}
        specs.update({f"{label} {k}": f"{prefix},{SETTINGS[k]}" for label, (prefix, settings) in VARIANTS.items()
                      for k in keys if k in settings})
        return "main", {label: (lambda s=s: bench.pruned(s)) for label, s in specs.items()}
    if part == "probe":
        return "probe", {"modality gap": bench.probe, "modality gap, qa calibration": lambda: bench.probe("qa")}
    if part == "qa":
        return "qa", {f"wanda pool={pool} {k}": (lambda s=f"wanda:pool={pool},{SETTINGS[k]}": bench.pruned(s, "qa"))
                      for pool in ("text", "mixed") for k in SETTINGS}
    if part == "pools":
        return "pools", {k: (lambda s=s: bench.pruned(s)) for k, s in POOLS.items()}
    if part == "selection":
        return "selection", {k: (lambda s=s: bench.pruned(s)) for k, s in SELECTION.items()}
    if part == "alpha":
        return "alpha", {f"alpha={a}": (lambda s=f"atv:sparsity=0.5,alpha={a}": bench.pruned(s)) for a in ALPHAS}
    if part == "mot":
        return "mot", {f"{p} / {q}": (lambda p=p, q=q: bench.mot(p, q)) for p in MOT_PATHWAYS for q in MOT_POOLS}
    if part == "time":
        return "time", {m: (lambda s=f"{m}:sparsity=0.5": bench.timing(s)) for m in METHODS}
    raise ValueError(f"unknown part {part!r}; choose from {', '.join(PARTS)}")


def run(args) -> Path:
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = {"model": args.model, "limit": args.limit, "nsamples": args.nsamples, "mot_sparsity": args.mot_sparsity,
              "repeats": args.repeats, "threads": torch.get_num_threads(),
              "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}"}
    results = Results(out_dir / "weights.json", config)
    bench = Bench(args, results)
    for part in args.part:
        if part == "drift":
            from vlmprune.viz.drift import plot_drift

            if results.get("drift", "profile") is None:
                profile = plot_drift(bench.model, bench.calibration, out_dir / "weights_drift.png")
                results.put("drift", "profile", {"profile": profile})
            continue
        table, jobs = jobs_of(part, bench)
        for label, job in jobs.items():
            if results.get(table, label) is None:
                print(f"[{table}] {label}", flush=True)
                results.put(table, label, job())
    (out_dir / "weights.md").write_text(markdown(results.data))
    return out_dir


def _pct(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def _with_interval(row: dict) -> str:
    low, high = row["average_interval"]
    return f"{100 * row['average']:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def _mean_k(row: dict) -> str:
    counts = row.get("visual_tokens")
    return "-" if not counts else f"{sum(counts) / len(counts):.1f}"


def _task_table(rows: list[tuple[str, dict]], first: str, mean_k: bool = False) -> list[str]:
    tasks = list(toyworld.TASKS)
    extra = " mean K per block |" if mean_k else ""
    lines = [f"| {first} | " + " | ".join(tasks) + f" | average [95% CI] | retention % |{extra}",
             "|---" * (len(tasks) + 3 + mean_k) + "|"]
    for label, row in rows:
        accs = [_pct(100 * row["tasks"][t]["accuracy"]) if t in row["tasks"] else "-" for t in tasks]
        cell = f" {_mean_k(row)} |" if mean_k else ""
        lines.append(f"| {label} | " + " | ".join(accs) + f" | {_with_interval(row)} | {_pct(row.get('retention'))} |{cell}")
    return lines


def _main_methods(main: dict) -> list[str]:
    return [m for m in (*METHODS, *VARIANTS) if any(f"{m} {k}" in main for k in SETTINGS)]


def _retention_summary(main: dict) -> list[str]:
    """Methods by setting, average accuracy with its interval: the headline comparison in one table."""
    lines = ["| method | " + " | ".join(SETTINGS) + " |", "|---" * (len(SETTINGS) + 1) + "|"]
    for m in _main_methods(main):
        cells = [_with_interval(main[f"{m} {k}"]) if f"{m} {k}" in main else "-" for k in SETTINGS]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def paired(row_a: dict, row_b: dict) -> dict:
    """Exact McNemar over every item of every task (vlmprune.eval.statistics), A against B."""
    names = [t for t in toyworld.TASKS if t in row_a["tasks"] and t in row_b["tasks"]]
    return compare_pooled({t: row_a["tasks"][t]["correct"] for t in names},
                          {t: row_b["tasks"][t]["correct"] for t in names}, names)


def _paired_lines(pairs: list[tuple[str, str, dict, dict]]) -> list[str]:
    lines = ["| setting | A | B | A % | B % | b (only A right) | c (only B right) | exact McNemar p | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for setting, (name_a, name_b), row_a, row_b in pairs:
        c = paired(row_a, row_b)
        lines.append(f"| {setting} | {name_a} | {name_b} | {100 * c['accuracy_a']:.1f} | {100 * c['accuracy_b']:.1f} | "
                     f"{c['b']} | {c['c']} | {format_p(c['p'])} | {c['verdict'].split(' (')[0]} |")
    return lines


def _probe_lines(probe: dict) -> list[str]:
    lines = ["| block | corr(visual, text energy) | visual share of Wanda's sum x^2 | "
             "corr(answer, mixed pool) | corr(answer, text pool) | corr(answer, visual pool) |",
             "|---|---|---|---|---|---|"]
    blocks = probe["blocks"]
    for b in [*blocks, None]:
        row = b or {key: sum(x[key] for x in blocks) / len(blocks) for key in ("visual_text_correlation", "visual_share")}
        if b is None:
            row["answer_correlation"] = {k: sum(x["answer_correlation"][k] for x in blocks) / len(blocks)
                                         for k in blocks[0]["answer_correlation"]}
        a = row["answer_correlation"]
        lines.append(f"| {'mean' if b is None else b['block']} | {row['visual_text_correlation']:.3f} | "
                     f"{100 * row['visual_share']:.1f}% | {a['mixed']:.3f} | {a['text']:.3f} | {a['visual']:.3f} |")
    return lines


def markdown(data: dict) -> str:
    rows = data["rows"]
    cfg = data["config"]

    def part(name):
        return [(k.split("|", 1)[1], v) for k, v in rows.items() if k.startswith(name + "|")]

    limit = "" if cfg["limit"] is None else f" --limit {cfg['limit']}"
    command = f"`.venv/bin/python benchmarks/weights_results.py --model {cfg['model']}{limit} --nsamples {cfg['nsamples']}`"
    items = "the full test split (500 items per task)" if cfg["limit"] is None else f"{cfg['limit']} test items per task"
    out = ["# Weight pruning results (toy world)", "",
           f"Model `{cfg['model']}`; {items}; {cfg['nsamples']} calibration samples "
           f"(toy caption pool: image + long caption); accuracy in %, average [95% interval] over tasks (Wilson, "
           f"see `vlmprune.eval.statistics`), retention = mean over tasks of pruned / dense accuracy. Per-item "
           f"outcomes are kept in `weights.json`. Machine: {cfg['machine']}, {cfg['threads']} threads, CPU shared "
           "with other jobs.",
           f"Every table is produced by {command} (`--part` picks tables; rows are cached in `weights.json`). "
           "Every row prunes a copy of the same dense model with the same calibration samples; a setting that "
           "several tables share (ATV at 50%, Wanda with the mixed pool) is one run shown in each.",
           "Paired tests: exact two-sided McNemar on the discordant items of all tasks pooled (b: items only A "
           "answers correctly, c: only B), verdict at p < 0.05; the same test as `vlmprune eval --compare A.json B.json`. "
           "The p-values are not corrected for the number of comparisons in these tables; with a Bonferroni "
           "correction over them a p-value must be below 0.05 / (number of rows in the paired tables).",
           ""]
    dense = rows.get("dense|dense")
    if dense:
        out += ["## Dense", ""] + _task_table([("dense", dense)], "model") + [""]
    main = dict(part("main"))
    if main:
        out += ["## Average accuracy by method and sparsity (% [95% interval])", ""] + _retention_summary(main) + [""]
        pairs = [(k, claim, main[f"{claim[0]} {k}"], main[f"{claim[1]} {k}"]) for claim in CLAIMS for k in SETTINGS
                 if f"{claim[0]} {k}" in main and f"{claim[1]} {k}" in main]
        if pairs:
            out += ["## Paired comparisons (all tasks pooled)", ""] + _paired_lines(pairs) + [""]
    for setting in SETTINGS:
        chosen = [(m, main[f"{m} {setting}"]) for m in _main_methods(main) if f"{m} {setting}" in main]
        if chosen:
            out += [f"## {setting} {'unstructured' if '%' in setting else 'semi-structured'} sparsity", ""]
            out += _task_table(chosen, "method") + [""]
    titles = {"pools": "## Calibration pools at 50%: Wanda under each pool, and ATV-Pruning (seed 002 Table A3)",
              "selection": "## Visual-token selection for ATV's calibration (50%; seed 002 A5)",
              "alpha": "## ATV alpha sweep (50%)",
              "mot": f"## MoT probe: one pathway pruned with Wanda at {cfg['mot_sparsity']:.0%}, by calibration pool"}
    for name, title in titles.items():
        if part(name):
            out += [title, ""] + _task_table(part(name), "pathway / pool" if name == "mot" else "setting",
                                             mean_k=name in ("selection", "alpha")) + [""]
        if name == "selection" and part(name):
            chosen = dict(part(name))
            text = rows.get("pools|text-only")
            reference = chosen.get("drift TopK (ATV)")
            pairs = [("50%", (label, "drift TopK (ATV)"), row, reference) for label, row in chosen.items()
                     if reference is not None and row is not reference]
            pairs += [("50%", (label, "Wanda text-only pool"), row, text) for label, row in chosen.items()
                      if text is not None and label.startswith("ABS")]
            out += ["Mean K per block: visual tokens selected per calibration sample, averaged over samples and "
                    "blocks (0 means the pool is text-only Wanda's).", ""] + _paired_lines(pairs) + [""]
    for label, probe in part("probe"):
        source = ("the question-answer calibration (`qa_calibration`)" if probe.get("calibration") == "qa"
                  else "the caption calibration")
        out += [f"## Modality gap: why magnitude beats Wanda (dense model; {source} and "
                f"{probe['items']} test prompts)", "",
                "Per block, averaged over its target Linears (`vlmprune.weights.modality_gap`): Spearman correlation "
                "over input channels of the mean per-token energy x^2 of visual and of text tokens; the share of "
                "Wanda's statistic sum_t x_tj^2 (all channels) that visual tokens supply; Spearman correlation of "
                "each calibration pool's statistic with x_j^2 at the answer position (last prompt token) of test "
                "prompts.", ""] + _probe_lines(probe) + [""]
    qa = dict(part("qa"))
    if qa:
        out += ["## Remedy: Wanda calibrated on question-answer samples (validation split; same count)", "",
                "| calibration / pool | " + " | ".join(SETTINGS) + " |", "|---" * (len(SETTINGS) + 1) + "|"]
        for pool in ("text", "mixed"):
            cells = [_with_interval(qa[f"wanda pool={pool} {k}"]) if f"wanda pool={pool} {k}" in qa else "-"
                     for k in SETTINGS]
            out.append(f"| question-answer / {pool} | " + " | ".join(cells) + " |")
        out.append("")
        pairs = [(k, (f"wanda qa pool={pool}", other), qa[f"wanda pool={pool} {k}"], main[f"{other} {k}"])
                 for pool in ("text", "mixed") for other in ("wanda", "magnitude", "wanda pool=text") for k in SETTINGS
                 if f"wanda pool={pool} {k}" in qa and f"{other} {k}" in main]
        out += _paired_lines(pairs) + [""]
    timing = part("time")
    if timing:
        wanda = dict(timing).get("wanda")
        out += [f"## Pruning time (50%; same model and calibration; a whole prune, capture included; "
                f"median of {cfg['repeats']})", "",
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
    parser.add_argument("--limit", type=int, default=None, help="test items per task (default: the full split, 500)")
    parser.add_argument("--nsamples", type=int, default=None, help="calibration samples (default 64)")
    parser.add_argument("--repeats", type=int, default=None, help="timing repeats per method (default 3)")
    parser.add_argument("--mot-sparsity", type=float, default=0.6)
    parser.add_argument("--probe-items", type=int, default=50, help="test items per task the modality-gap probe reads")
    parser.add_argument("--part", type=lambda s: s.split(","), default=list(PARTS[:8]),
                        help=f"tables to fill, from {','.join(PARTS)} (default: all but alpha and mot)")
    parser.add_argument("--out", default=None, help=f"directory for weights.json, weights.md and the plot (default {OUT})")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: 2 items per task, 4 calibration samples, 1 timing repeat, into {QUICK_OUT}")
    args = parser.parse_args()
    quick = {"limit": 2, "nsamples": 4, "repeats": 1, "out": QUICK_OUT, "probe_items": 2}
    full = {"limit": None, "nsamples": 64, "repeats": 3, "out": OUT}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    print(f"wrote {run(args) / 'weights.md'}")


if __name__ == "__main__":
    main()
