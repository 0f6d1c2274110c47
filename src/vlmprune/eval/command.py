"""``vlmprune eval``: toy-task accuracy, retention, FLOPs and latency of one model and token method."""
from __future__ import annotations

import json
import sys

from ..errors import VlmpruneError
from ..preflight import check_at_least, check_model, check_spec, check_tasks


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="accuracy per toy task, retention, FLOPs and prefill latency",
        description="Evaluate a model on the toy tasks, optionally with a token-pruning method attached.")
    parser.add_argument("--model", default=None, help="toy-large, toy-small or a save_pretrained directory")
    parser.add_argument("--tokens", default=None, metavar="SPEC", help="token method, e.g. ivtp:keep=16")
    parser.add_argument("--recipe", default=None, metavar="FILE",
                        help="instead of --tokens: the tokens stage of a YAML recipe (its weights stage is applied "
                             "by vlmprune prune --recipe)")
    parser.add_argument("--tasks", default=None, metavar="LIST", help="comma-separated toy tasks (default: all)")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="first N items of each task")
    parser.add_argument("--batch-size", type=int, default=32, metavar="B")
    parser.add_argument("--reference", default=None, metavar="JSON",
                        help="an eval --json of the dense model to compute retention against (default: for a "
                             "directory vlmprune prune wrote, the model it was pruned from; else, with --tokens, "
                             "the same model without them)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the result as JSON")
    parser.add_argument("--md", default=None, metavar="PATH", help="write the result as a Markdown table")
    parser.add_argument("--compare", nargs=2, default=None, metavar=("A.json", "B.json"),
                        help="instead of evaluating: compare two eval --json results item by item (95%% intervals, "
                             "exact McNemar test on the same items); with --json, write the comparison there")
    parser.set_defaults(func=run)


def _reference_tasks(path: str) -> dict:
    try:
        with open(path) as handle:
            return json.load(handle)["tasks"]
    except (OSError, ValueError, KeyError, TypeError):
        raise VlmpruneError(f"--reference {path} is not a readable eval --json result") from None


def row_label(model, tokens: str | None) -> str:
    """What the table row measured: the weight-pruning recipe a saved model carries, the token SPEC, or dense."""
    from ..weights.saving import pruning_spec

    return " + ".join(part for part in (pruning_spec(model), tokens) if part) or "dense"


def run(args) -> int:
    if args.compare:
        from .compare import run_compare

        return run_compare(*args.compare, json_out=args.json)
    if not args.model:
        raise VlmpruneError("eval needs --model NAME_OR_DIR (or --compare A.json B.json)")
    check_model(args.model)        # input errors first: they answer before the library loads
    check_at_least(args.limit, 1, "--limit")
    check_at_least(args.batch_size, 1, "--batch-size")
    tasks = check_tasks(args.tasks)
    if args.recipe:
        from ..recipes import recipe_token_spec

        args.tokens = recipe_token_spec(args.recipe, args.tokens)
    if args.tokens:
        check_spec(args.tokens, "tokens")
    reference = _reference_tasks(args.reference) if args.reference else None

    from .harness import evaluate, token_method
    from .loading import load_model
    from .report import markdown_table, write_json, write_text
    from .source_reference import source_reference

    method = token_method(args.tokens)
    if reference is None:        # before loading the pruned model, so the two are never in memory together
        reference, why = source_reference(args.model, tasks, args.limit, args.batch_size)
        if why:
            print(f"vlmprune: no retention against the dense model: {why}; give --reference", file=sys.stderr)
    model, processor = load_model(args.model)
    result = evaluate(model, processor, tokens=method, tasks=tasks, limit=args.limit,
                      batch_size=args.batch_size, reference=reference, model_name=args.model)
    if args.tokens:
        result["tokens"] = args.tokens
    table = markdown_table([{"label": row_label(model, args.tokens), "result": result}])
    if args.json:
        write_json(args.json, result)
    if args.md:
        write_text(args.md, table)
    print(table, end="")
    return 0
