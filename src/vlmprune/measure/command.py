"""``vlmprune flops``: FLOPs by part of one prefill, analytic and counted side by side."""
from __future__ import annotations

import argparse
import json

from ..errors import VlmpruneError
from ..models.presets import get_preset, preset_names
from .flops import PARTS, analytic_flops, count_flops

DEFAULT_TEXT_TOKENS = 128


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "flops", help="FLOPs by part (vision, projector, llm, extra, total), no weights needed",
        description="FLOPs of one prefill (one image and --text-tokens text tokens), by the closed formula "
                    "and counted with torch's FlopCounterMode on a meta-device model. Presets: "
                    + ", ".join(preset_names()))
    parser.add_argument("--model", required=True, metavar="PRESET_OR_DIR",
                        help="a preset name or a directory with a config.json")
    parser.add_argument("--tokens", metavar="SPEC", help="a token method, e.g. fastv:layer=2,keep=0.5")
    parser.add_argument("--text-tokens", type=int, default=DEFAULT_TEXT_TOKENS, metavar="N",
                        help=f"text tokens in the prompt (default {DEFAULT_TEXT_TOKENS})")
    parser.add_argument("--json", action="store_true", help="print {analytic, counted} in FLOPs as JSON")
    parser.set_defaults(func=run)


def flops_report(model: str, tokens: str | None = None, text_tokens: int = DEFAULT_TEXT_TOKENS) -> dict:
    """``{"analytic": {part: FLOPs}, "counted": {part: FLOPs}}`` for a preset or directory."""
    if text_tokens <= 0:
        raise VlmpruneError(f"--text-tokens {text_tokens}: give a positive number of text tokens")
    preset = get_preset(model)
    method = None
    if tokens is not None:
        from .. import tokens as token_api
        method = token_api.from_spec(tokens)
    counted = count_flops(preset, text_tokens, method)
    analytic = analytic_flops(preset, text_tokens, counted.schedule if method is not None else None)
    return {"analytic": analytic.as_dict(), "counted": counted.flops.as_dict()}


def format_flops(value: float) -> str:
    for scale, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3f} {unit}"
    return f"{value:.0f}"


def table(report: dict) -> str:
    lines = ["| part | analytic | counted | counted/analytic |", "|---|---:|---:|---:|"]
    for part in PARTS:
        analytic, counted = report["analytic"][part], report["counted"][part]
        ratio = f"{counted / analytic:.4f}" if analytic else "-"
        lines.append(f"| {part} | {format_flops(analytic)} | {format_flops(counted)} | {ratio} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    report = flops_report(args.model, args.tokens, args.text_tokens)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{args.model}, {args.text_tokens} text tokens, tokens: {args.tokens or 'dense'} (FLOPs of one prefill)")
        print(table(report))
    return 0
