"""``vlmprune toy train``: retrain the toy models from scratch, seeded."""
from __future__ import annotations

import argparse
import json

from ..errors import VlmpruneError
from .train import LVLMS, STAGES, train


def _stages(text: str) -> tuple[str, ...]:
    stages = tuple(s.strip() for s in text.split(",") if s.strip())
    if text == "all":
        return STAGES
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        raise VlmpruneError(f"--stage must be 'all' or a comma list of {', '.join(STAGES)}; got {text!r}")
    return stages


def _run(args: argparse.Namespace) -> int:
    if args.minutes is not None and args.minutes <= 0:
        raise VlmpruneError(f"--minutes must be positive, got {args.minutes}")
    if args.threads < 1:
        raise VlmpruneError(f"--threads must be at least 1, got {args.threads}")
    lvlms = LVLMS if args.model == "both" else (args.model,)
    timings = train(args.out, _stages(args.stage), minutes=args.minutes, seed=args.seed, lvlms=lvlms,
                    threads=args.threads, bf16=args.bf16)
    print(json.dumps({stage: round(seconds, 1) for stage, seconds in timings.items()}))
    return 0


def _run_pgp(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from ..tokens.guidance.train_pgp import RECIPES, train_pgp
    if args.threads < 1:
        raise VlmpruneError(f"--threads must be at least 1, got {args.threads}")
    given = {key: value for key, value in (("steps", args.steps), ("batch", args.batch), ("lr", args.lr))
             if value is not None}
    train_pgp(args.out, training=replace(RECIPES[args.recipe], **given), seed=args.seed, threads=args.threads)
    return 0


def register(subparsers) -> None:
    toy = subparsers.add_parser("toy", help="the toy world")
    toy_commands = toy.add_subparsers(dest="toy_command", required=True, metavar="TOY_COMMAND")
    parser = toy_commands.add_parser("train", help="retrain toy-clip, toy-large and toy-small from scratch")
    parser.add_argument("--out", default="toy-checkpoints", help="directory for the checkpoints (default: %(default)s)")
    parser.add_argument("--stage", default="all", help=f"'all' or a comma list of {', '.join(STAGES)}")
    parser.add_argument("--model", default="both", choices=("both",) + LVLMS, help="LVLM(s) the later stages train")
    parser.add_argument("--minutes", type=float, default=None, help="wall-time cap per stage")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (faster only on an idle CPU)")
    parser.set_defaults(func=_run)
    pgp = toy_commands.add_parser("train-pgp", help="train PGP's guide (LoRA + bottleneck) on toy-small")
    pgp.add_argument("--out", default="toy-checkpoints/toy-small-pgp", help="directory for the guide (default: %(default)s)")
    pgp.add_argument("--recipe", choices=("shipped", "uncollapsed"), default="shipped",
                     help="shipped: the shipped guide's 400 steps; uncollapsed: 2000 steps with a beta=0 "
                          "warm-up, a data-initialised prior and the visual tokens apart (default: %(default)s)")
    pgp.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the recipe's)")
    pgp.add_argument("--batch", type=int, default=None, help="items per step (default: the recipe's, 16)")
    pgp.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default: the recipe's, 1e-3)")
    pgp.add_argument("--seed", type=int, default=0)
    pgp.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    pgp.set_defaults(func=_run_pgp)
