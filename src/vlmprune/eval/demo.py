"""The demo: toy-large dense, with every token method and with every weight method, in one report.

Token methods run at fixed budgets (fractions of the visual tokens); weight methods at 50%
unstructured and 2:4. Each row is evaluated on the same items; retention is against the dense row.
Each finished row is journaled in ``rows.jsonl`` (see :mod:`.rows`), so Ctrl-C leaves a partial report
and ``--resume`` finishes it. A method that fails becomes a row with its one-line error, marked in the
report and on the plots with its traceback in ``errors.log``, so one broken method never hides the rest.
"""
from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path


from .. import toyworld
from ..progress import progress as report_progress
from ..viz import plots
from .harness import evaluate
from .report import markdown_table, write_json, write_text
from .rows import ERRORS, RowLog, write_errors

MODEL = "toy-large"


@dataclass(frozen=True)
class Plan:
    """How much of the demo to run."""

    limit: int                      # items per task
    token_budgets: tuple[float, ...]
    weight_specs: tuple[str, ...]   # settings appended to each weight method's name
    calibration: int                # calibration samples for weight methods
    token_methods: tuple[str, ...] | None = None    # None: every registered method
    weight_methods: tuple[str, ...] | None = None


FULL = Plan(limit=50, token_budgets=(0.25, 0.11), weight_specs=("sparsity=0.5", "sparsity=0.5,pattern=2:4"),
            calibration=64)
QUICK = Plan(limit=12, token_budgets=(0.11,), weight_specs=("sparsity=0.5",), calibration=16,
             token_methods=("ivtp", "fastv", "random"), weight_methods=("wanda", "magnitude"))


def _chosen(registry: dict, names: tuple[str, ...] | None) -> list[str]:
    return sorted(registry) if names is None else [n for n in names if n in registry]


def token_specs(plan: Plan) -> list[str]:
    from ..tokens import REGISTRY
    return [f"{name}:keep={budget}" for name in _chosen(REGISTRY, plan.token_methods)
            for budget in plan.token_budgets]


def weight_specs(plan: Plan) -> list[str]:
    from ..weights import REGISTRY
    return [f"{name}:{settings}" for name in _chosen(REGISTRY, plan.weight_methods)
            for settings in plan.weight_specs]


def _weight_pruned(spec: str, plan: Plan, reference: dict | None) -> dict:
    from .. import weights
    method = weights.from_spec(spec)
    model, processor = toyworld.load(MODEL)
    calibration = toyworld.calibration(processor, n=plan.calibration)
    weights.prune(model, method, calibration=calibration)
    return evaluate(model, processor, limit=plan.limit, reference=reference, progress=False,
                    model_name=f"{MODEL} + {spec}")


def run_row(kind: str, spec: str, plan: Plan, model, processor, reference: dict | None) -> dict:
    """The eval result of one row: the dense model, a token SPEC on it, or a weight SPEC on a fresh copy."""
    if kind == "dense":
        return evaluate(model, processor, limit=plan.limit, progress=False, model_name=MODEL)
    if kind == "tokens":
        return evaluate(model, processor, tokens=spec, limit=plan.limit, reference=reference, progress=False,
                        model_name=MODEL)
    return _weight_pruned(spec, plan, reference)


def _resume_command(out: str | Path, quick: bool) -> str:
    return f"vlmprune demo{' --quick' if quick else ''} --out {shlex.quote(str(out))} --resume"


def run_demo(out: str | Path, quick: bool = False, progress: bool = True, resume: bool = False) -> dict:
    """Run the demo, write ``report.md``, ``results.json`` and the plots into ``out``; return the results.

    On KeyboardInterrupt the report is written from the rows finished so far, marked partial, and the
    interrupt is raised again."""
    plan = QUICK if quick else FULL
    # what a recorded row must match to be reused on resume
    settings = {"model": MODEL, "limit": plan.limit, "calibration": plan.calibration}
    log = RowLog(out, resume=resume)
    planned = [("dense", "dense"), *(("tokens", s) for s in token_specs(plan)),
               *(("weights", s) for s in weight_specs(plan))]
    model, processor = toyworld.load(MODEL)
    rows: list[dict] = []
    try:
        for kind, label in report_progress(planned, desc="demo", unit="run", enabled=progress,
                                           label=lambda run: run[1]):
            reference = (rows[0]["result"] or {}).get("tasks") if rows else None
            rows.append(log.run(label, settings, lambda kind=kind, label=label, reference=reference: run_row(
                kind, label, plan, model, processor, reference), kind=kind, label=label))
    except KeyboardInterrupt:
        _write_outputs(out, plan, quick, rows, len(planned))
        print(f"vlmprune: demo interrupted after {len(rows)} of {len(planned)} runs; partial report in "
              f"{Path(out) / 'report.md'}; resume with: {_resume_command(out, quick)}", file=sys.stderr)
        raise
    results = _write_outputs(out, plan, quick, rows, len(planned))
    print(markdown_table(rows), end="")
    return results


def _write_outputs(out: str | Path, plan: Plan, quick: bool, rows: list[dict], planned: int) -> dict:
    """report.md, results.json, errors.log and the plots from ``rows``, the finished rows of ``planned``."""
    out = Path(out)
    write_errors(out, rows)
    rows = [{key: row[key] for key in ("kind", "label", "result", "error", "seconds")} for row in rows]
    results = {"model": MODEL, "quick": quick, "limit": plan.limit, "partial": len(rows) < planned,
               "planned": planned, "rows": rows}
    plots.accuracy_vs_flops([r for r in rows if r["kind"] in ("dense", "tokens")], out / "tokens_accuracy_flops.png")
    plots.retention_bars([r for r in rows if r["kind"] == "weights"], out / "weights_retention.png")
    write_text(out / "report.md", _report(plan, quick, rows, planned, out))
    write_json(out / "results.json", results)
    return results


def _report(plan: Plan, quick: bool, rows: list[dict], planned: int, out: Path) -> str:
    failed = [row for row in rows if row["error"] is not None]
    notices = []
    if len(rows) < planned:
        notices.append(f"**Partial report: {len(rows)} of {planned} runs finished** (the demo was interrupted). "
                       f"Resume with `{_resume_command(out, quick)}`: finished runs are kept, the rest run.\n\n")
    if failed:
        notices.append(f"**{len(failed)} of {len(rows)} runs failed** ({', '.join(r['label'] for r in failed)}): "
                       f"marked in the table and the plots; full tracebacks in [{ERRORS}]({ERRORS}).\n\n")
    return (
        f"# vlmprune demo on {MODEL}{' (quick)' if quick else ''}\n\n"
        f"{''.join(notices)}"
        f"{plan.limit} items per toy task; accuracy in % (exact match, lmms-eval rules); retention = mean "
        "over tasks of pruned / dense accuracy, in %; GFLOPs counted for one sample at batch 1; prefill "
        "latency is the median of several runs at batch 1.\n\n"
        f"Token methods keep {', '.join(f'{b:.0%}' for b in plan.token_budgets)} of the visual tokens; "
        f"weight methods are pruned with {', '.join(plan.weight_specs)} on {plan.calibration} caption "
        "samples.\n\n"
        f"{markdown_table(rows)}\n"
        "![accuracy against FLOPs](tokens_accuracy_flops.png)\n\n"
        "![retention of weight methods](weights_retention.png)\n"
    )
