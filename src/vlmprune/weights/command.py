"""``vlmprune prune``: prune a model's LLM weights and write a ``save_pretrained`` directory."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import VlmpruneError
from ..integrations.export import FORMATS, check_format
from ..outputs import check_output
from ..preflight import check_model, check_spec
from .offload import OFFLOADS, check_offload

CALIBRATION_SOURCES = ("captions",)
DTYPES = ("float16", "bfloat16", "float32")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "prune", help="weight pruning (ATV, Wanda, SparseGPT, TAMP, magnitude); writes a save_pretrained directory",
        description="Prune the LLM's Linear weights of a vision-language model and save it with its processor.")
    parser.add_argument("--model", required=True, help="toy-large, toy-small or a save_pretrained directory")
    parser.add_argument("--method", default=None,
                        help="magnitude, wanda, sparsegpt, tamp or atv, optionally with settings (atv:alpha=2)")
    parser.add_argument("--recipe", default=None, metavar="FILE",
                        help="instead of --method and its options: a YAML recipe (docs/RECIPES.md); its weight stage "
                             "is applied and saved, its token stage recorded for vp.load and eval --recipe")
    parser.add_argument("--sparsity", type=float, default=None,
                        help="fraction of weights zeroed, in [0, 1) (default 0.5, or what --pattern fixes)")
    parser.add_argument("--pattern", default=None, help="N:M semi-structured pattern, e.g. 2:4 or 4:8")
    parser.add_argument("--nsamples", type=int, default=None,
                        help="calibration samples (image + long caption; default 128, or the recipe's nsamples)")
    parser.add_argument("--calib", default="captions", choices=CALIBRATION_SOURCES,
                        help="calibration source: the toy world's caption pool")
    parser.add_argument("--targets", nargs="*", default=None, help="regexes of Linear names to prune (default: the LLM's)")
    parser.add_argument("--ignore", nargs="*", default=None, help="regexes of Linear names to leave dense")
    parser.add_argument("--device", default=None, help="compute device for one block at a time (default: the model's)")
    parser.add_argument("--offload", default=None, choices=OFFLOADS,
                        help="for a model bigger than memory: keep its weights on disk (read block by block from "
                             "--model's safetensors) or in CPU memory (cpu), compute one decoder block at a time on "
                             "--device and write each pruned block to --out as it is done; same weights as without "
                             "it, at a cost in time (docs/REAL_MODELS.md)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration draw")
    parser.add_argument("--dtype", default=None, choices=DTYPES,
                        help="dtype of the saved weights (default: the dtype --model is stored in)")
    parser.add_argument("--out", required=True,
                        help="output directory; one vlmprune wrote before is replaced once the new one is complete")
    parser.add_argument("--format", default="save_pretrained", choices=FORMATS,
                        help="output format (compressed-tensors: see docs/REAL_MODELS.md; token pruning is never "
                             "part of an export)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out even if it holds files vlmprune did not write")
    parser.set_defaults(func=run)


def method_spec(method: str, sparsity: float | None, pattern: str | None) -> str:
    """Merge ``--sparsity``/``--pattern`` into the method SPEC (the method rejects a conflict)."""
    name, _, settings = method.partition(":")
    parts = [settings] if settings.strip() else []
    if sparsity is not None:
        parts.append(f"sparsity={sparsity}")
    if pattern:
        parts.append(f"pattern={pattern}")
    return f"{name}:{','.join(parts)}"


def dense_source(name_or_dir: str, model) -> str:
    """The dense model a pruned copy of ``model`` descends from, for eval's retention: the source its own
    pruning record names when it was pruned before, else ``--model`` (a directory by absolute path)."""
    from .saving import CONFIG_KEY

    record = getattr(model.config, CONFIG_KEY, None)
    if isinstance(record, dict) and record.get("source"):
        return record["source"]
    path = Path(name_or_dir)
    return str(path.resolve()) if path.is_dir() else name_or_dir


def run(args: argparse.Namespace) -> int:
    # input errors first: they answer before the library loads, and --out before the pruning, not after it
    check_model(args.model)
    check_output(args.out, args.overwrite)
    if args.format != "save_pretrained":
        check_format(args.format)
    if args.offload:
        check_offload(args.offload)
        if args.recipe:
            raise VlmpruneError("--offload prunes with --method; it does not apply a --recipe")
    if args.recipe:
        return run_recipe(args)
    if not args.method:
        raise VlmpruneError("prune needs --method M (or --recipe FILE)")
    nsamples = 128 if args.nsamples is None else args.nsamples
    spec = method_spec(args.method, args.sparsity, args.pattern)
    check_spec(spec, "weights")

    import torch

    from .. import toyworld
    from ..eval.loading import load_model, stored_dtype
    from . import from_spec, prune
    from .saving import run_record, save_pruned

    method = from_spec(spec)
    if method.needs_calibration and nsamples < 1:
        raise VlmpruneError(f"--nsamples must be at least 1 for {method.name}: it needs calibration samples")
    torch.manual_seed(args.seed)
    if args.offload:
        return run_offloaded(args, method, nsamples)
    model, processor = load_model(args.model)
    calibration = (toyworld.calibration(processor, n=nsamples, seed=args.seed)
                   if method.needs_calibration else None)
    report = prune(model, method, calibration=calibration, targets=args.targets, ignore=args.ignore,
                   device=args.device)
    record = run_record(report, dense_source(args.model, model), args.targets, args.ignore, args.calib,
                        len(calibration) if calibration else 0)
    model.to(getattr(torch, args.dtype) if args.dtype else stored_dtype(args.model) or model.dtype)
    save_pruned(model, processor, args.out, record, overwrite=args.overwrite)
    print(f"pruned {len(report.layer_sparsity)} layers of {args.model} with {method.name} to "
          f"{report.sparsity:.2%} sparsity in {report.total_seconds:.1f} s; saved to {args.out}")
    return 0


def run_offloaded(args: argparse.Namespace, method, nsamples: int) -> int:
    """``--offload``: the model is never loaded whole (:func:`vlmprune.weights.offload.prune_offloaded`)."""
    from types import SimpleNamespace

    import torch
    from transformers import AutoConfig, AutoProcessor

    from .. import toyworld
    from ..eval.loading import model_dir, stored_dtype
    from .offload import prune_offloaded
    from .saving import run_record

    directory = model_dir(args.model)
    processor = AutoProcessor.from_pretrained(directory)
    calibration = (toyworld.calibration(processor, n=nsamples, seed=args.seed)
                   if method.needs_calibration else None)
    source = dense_source(args.model, SimpleNamespace(config=AutoConfig.from_pretrained(directory)))

    def record(report) -> dict:
        return {**run_record(report, source, args.targets, args.ignore, args.calib,
                             len(calibration) if calibration else 0), "offload": args.offload}

    report = prune_offloaded(directory, method, calibration, args.out, offload=args.offload, record=record,
                             processor=processor, targets=args.targets, ignore=args.ignore, device=args.device,
                             dtype=getattr(torch, args.dtype) if args.dtype else stored_dtype(args.model),
                             overwrite=args.overwrite)
    print(f"pruned {len(report.layer_sparsity)} layers of {args.model} with {method.name} to "
          f"{report.sparsity:.2%} sparsity in {report.total_seconds:.1f} s, offloaded to {args.offload}; "
          f"saved to {args.out}")
    return 0


def run_recipe(args: argparse.Namespace) -> int:
    """``--recipe FILE``: the recipe is read and checked before the library loads; its weight stage is applied
    and the model saved whole (:func:`vlmprune.compressed.prune_to_directory`)."""
    from ..preflight import check_at_least
    from ..recipes import read_recipe

    given = [flag for flag, value in (("--method", args.method), ("--sparsity", args.sparsity),
                                      ("--pattern", args.pattern), ("--targets", args.targets),
                                      ("--ignore", args.ignore)) if value is not None]
    if given:
        raise VlmpruneError(f"--recipe sets the method and its options: drop {given[0]}, or edit the recipe")
    recipe = read_recipe(args.recipe)
    check_at_least(args.nsamples, 1, "--nsamples")

    import torch

    from ..compressed import prune_to_directory

    applied = prune_to_directory(args.model, recipe, args.out, nsamples=args.nsamples, seed=args.seed,
                                 device=args.device, dtype=getattr(torch, args.dtype) if args.dtype else None,
                                 overwrite=args.overwrite)
    token_stage = recipe.stage("tokens")
    done = [f"weights {applied.report.method['method']} to {applied.report.sparsity:.2%} sparsity"
            if applied.report else "no weight stage",
            f"token method {token_stage.spec} recorded" if token_stage else "no token stage"]
    print(f"applied {args.recipe} to {args.model}: {'; '.join(done)}; saved to {args.out}")
    return 0
