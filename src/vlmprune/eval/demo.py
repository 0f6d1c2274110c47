"""The demo: toy-large dense, with every token method and with every weight method, in one report.

Token methods run at fixed budgets (fractions of the visual tokens); weight methods at 50%
unstructured and 2:4. Each row is evaluated on the same items; retention is against the dense row.
A method that fails becomes a row with its one-line error, so one broken method never hides the rest.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from .. import toyworld
from ..viz import plots
from .harness import evaluate
from .report import markdown_table, write_json, write_text

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


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _chosen(registry: dict, names: tuple[str, ...] | None) -> list[str]:
    return sorted(registry) if names is None else [n for n in names if n in registry]


def _row(kind: str, label: str, run: Callable[[], dict]) -> dict:
    start = time.perf_counter()
    try:
        result, error = run(), None
    except Exception as exc:  # a failing method is a row of the report, not the end of the demo
        result, error = None, _one_line(exc)
    return {"kind": kind, "label": label, "result": result, "error": error,
            "seconds": round(time.perf_counter() - start, 2)}


def token_specs(plan: Plan) -> list[str]:
    from ..tokens import REGISTRY
    return [f"{name}:keep={budget}" for name in _chosen(REGISTRY, plan.token_methods)
            for budget in plan.token_budgets]


def weight_specs(plan: Plan) -> list[str]:
    from ..weights import REGISTRY
    return [f"{name}:{settings}" for name in _chosen(REGISTRY, plan.weight_methods)
            for settings in plan.weight_specs]


def _weight_pruned(spec: str, plan: Plan, reference: dict) -> dict:
    from .. import weights
    method = weights.from_spec(spec)
    model, processor = toyworld.load(MODEL)
    calibration = toyworld.calibration(processor, n=plan.calibration)
    weights.prune(model, method, calibration=calibration)
    return evaluate(model, processor, limit=plan.limit, reference=reference, progress=False,
                    model_name=f"{MODEL} + {spec}")


def run_demo(out: str | Path, quick: bool = False, progress: bool = True) -> dict:
    """Run the demo, write ``report.md``, ``results.json`` and the plots into ``out``; return the results."""
    plan = QUICK if quick else FULL
    model, processor = toyworld.load(MODEL)
    token_list, weight_list = token_specs(plan), weight_specs(plan)
    bar = tqdm(total=1 + len(token_list) + len(weight_list), desc="demo", unit="run", disable=not progress)

    def step(kind: str, label: str, run: Callable[[], dict]) -> dict:
        bar.set_postfix_str(label)
        row = _row(kind, label, run)
        bar.update()
        return row

    start = time.perf_counter()
    dense = evaluate(model, processor, limit=plan.limit, progress=False, model_name=MODEL)
    rows = [{"kind": "dense", "label": "dense", "result": dense, "error": None,
             "seconds": round(time.perf_counter() - start, 2)}]
    bar.update()
    for spec in token_list:
        rows.append(step("tokens", spec, lambda spec=spec: evaluate(
            model, processor, tokens=spec, limit=plan.limit, reference=dense["tasks"], progress=False,
            model_name=MODEL)))
    for spec in weight_list:
        rows.append(step("weights", spec, lambda spec=spec: _weight_pruned(spec, plan, dense["tasks"])))
    bar.close()

    results = {"model": MODEL, "quick": quick, "limit": plan.limit, "rows": rows}
    table = markdown_table(rows)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots.accuracy_vs_flops([r for r in rows if r["kind"] in ("dense", "tokens")], out / "tokens_accuracy_flops.png")
    plots.retention_bars([r for r in rows if r["kind"] == "weights"], out / "weights_retention.png")
    write_text(out / "report.md", _report(plan, quick, table))
    write_json(out / "results.json", results)
    print(table, end="")
    return results


def _report(plan: Plan, quick: bool, table: str) -> str:
    return (
        f"# vlmprune demo on {MODEL}{' (quick)' if quick else ''}\n\n"
        f"{plan.limit} items per toy task; accuracy in % (exact match, lmms-eval rules); retention = mean "
        "over tasks of pruned / dense accuracy, in %; GFLOPs counted for one sample at batch 1; prefill "
        "latency is the median of several runs at batch 1.\n\n"
        f"Token methods keep {', '.join(f'{b:.0%}' for b in plan.token_budgets)} of the visual tokens; "
        f"weight methods are pruned with {', '.join(plan.weight_specs)} on {plan.calibration} caption "
        "samples.\n\n"
        f"{table}\n"
        "![accuracy against FLOPs](tokens_accuracy_flops.png)\n\n"
        "![retention of weight methods](weights_retention.png)\n"
    )
