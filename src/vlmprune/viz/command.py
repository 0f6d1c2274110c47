"""``vlmprune viz``: which visual tokens a method keeps, how long each survives, and ATV's drift.

``tokens`` and ``importance`` run one prefill of the model on an image with one or more questions,
with the token method wrapped by :class:`KeptTokens`, which notes the original patch indices each
pruning site keeps. One panel per question, so instruction-guided methods (IVTP) show their
question dependence side by side.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch
from PIL import Image

from ..errors import VlmpruneError
from ..tokens.base import ModelPlan, Reduction, Site, SiteContext, TokenMethod


class KeptTokens(TokenMethod):
    """Delegates to ``method`` and records, per site, the original visual-token indices it keeps."""

    def __init__(self, method: TokenMethod):
        self._method = method
        self.name = method.name
        self.kept: list[tuple[Site, torch.Tensor]] = []   # (site, (B, k) original indices), in order

    def sites(self, plan: ModelPlan) -> list[Site]:
        return self._method.sites(plan)

    def recorded_layers(self, site: Site, plan: ModelPlan) -> list[int]:
        return self._method.recorded_layers(site, plan)

    def scoring_token(self, model, inputs):
        return self._method.scoring_token(model, inputs)

    def reduce(self, ctx: SiteContext) -> Reduction:
        reduction = self._method.reduce(ctx)
        self.kept.append((ctx.site, ctx.original.gather(1, reduction.keep.long()).cpu()))
        return reduction

    def spec(self) -> str:
        return self._method.spec()


def register(subparsers) -> None:
    parser = subparsers.add_parser("viz", help="kept-token overlays, survival maps, ATV drift plots",
                                   description="Pictures of what pruning does.")
    commands = parser.add_subparsers(dest="viz_command", required=True, metavar="WHAT")

    for name, help_text, func in (
        ("tokens", "draw the patches a token method keeps over the image", run_tokens),
        ("importance", "heat map of how many pruning sites each patch survives", run_importance),
    ):
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--model", required=True, help="toy-large, toy-small or a save_pretrained directory")
        sub.add_argument("--tokens", required=True, metavar="SPEC", help="token method, e.g. ivtp:keep=16")
        sub.add_argument("--question", required=True, action="append",
                         help="question to ask (repeat for one panel per question)")
        source = sub.add_mutually_exclusive_group()
        source.add_argument("--image", default=None, metavar="PATH", help="an image file")
        source.add_argument("--seed", type=int, default=0, metavar="N", help="a toy scene drawn with this seed")
        sub.add_argument("--out", required=True, metavar="PNG")
        sub.set_defaults(func=func)

    guidance = commands.add_parser(
        "guidance", help="PGP's importance map and kept set beside SGP's, one row per question",
        description="PGP's importance map (KL on the patch grid) and pruning guidance (the kept set), "
                    "with SGP's attention scores and kept set beside them, for one image and each question.")
    guidance.add_argument("--model", required=True, help="the large model: toy-large or a save_pretrained directory")
    guidance.add_argument("--question", required=True, action="append", help="question (repeat: one row each)")
    guidance.add_argument("--keep", type=float, default=0.05, help="kept share (or count >= 1) (default: %(default)s)")
    guidance.add_argument("--pgp-guide", default=None, metavar="DIR", help="PGP guide (default: the shipped one)")
    guidance.add_argument("--sgp-guide", default=None, metavar="DIR", help="SGP's small model (default: toy-small)")
    source = guidance.add_mutually_exclusive_group()
    source.add_argument("--image", default=None, metavar="PATH", help="an image file")
    source.add_argument("--seed", type=int, default=0, metavar="N", help="a toy scene drawn with this seed")
    guidance.add_argument("--out", required=True, metavar="PNG")
    guidance.set_defaults(func=run_guidance)

    drift = commands.add_parser("drift", help="ATV's visual drift per LLM block and the tokens it selects",
                                description="Plot ATV's per-block visual drift on calibration captions.")
    drift.add_argument("--model", required=True, help="toy-large, toy-small or a save_pretrained directory")
    drift.add_argument("--nsamples", type=int, default=32, metavar="K", help="calibration samples")
    drift.add_argument("--alpha", type=float, default=1.0, help="ATV's drift threshold factor")
    drift.add_argument("--out", required=True, metavar="PNG")
    drift.set_defaults(func=run_drift)


def _check_png(out: str) -> Path:
    path = Path(out)
    if path.suffix.lower() != ".png":
        raise VlmpruneError(f"--out {out}: give a path ending in .png")
    return path


def _image(path: str | None, seed: int) -> tuple[Image.Image, str]:
    """The image to draw on and a line describing it (a toy scene's objects when drawn from a seed)."""
    if path is not None:
        try:
            with Image.open(path) as image:
                return image.convert("RGB"), path
        except (OSError, ValueError):
            raise VlmpruneError(f"cannot read the image {path}: give an existing PNG or JPEG file") from None
    from ..toyworld.scenes import MAX_OBJECTS, render, sample_scene
    rng = random.Random(seed)
    scene = sample_scene(rng, rng.randint(3, MAX_OBJECTS))
    return render(scene)[0], f"seed {seed}: {scene.describe()}"


@torch.no_grad()
def kept_per_site(model, processor, method: TokenMethod, image: Image.Image, questions: list[str]):
    """Run one prefill of ``image`` with each question (a batch) and return the
    ``[(site, (B, k) original indices)]`` the method kept, and the patch grid."""
    from .. import tokens
    from ..eval.harness import model_inputs
    from ..models import get_adapter

    inputs = model_inputs(processor, [image] * len(questions), questions, model.device, model.dtype)
    recorder = KeptTokens(method)
    with tokens.apply(model, recorder):
        model(**inputs)
    if not recorder.kept:
        raise VlmpruneError(f"{method.spec()} pruned nothing on this input")
    return recorder.kept, get_adapter(model).patch_grid(inputs)


def survival(kept: list[tuple[Site, torch.Tensor]], n_patches: int) -> torch.Tensor:
    """(B, n_patches): the share of pruning sites each original patch came through, per sample."""
    counts = torch.zeros(kept[0][1].shape[0], n_patches)
    for _, indices in kept:
        counts.scatter_add_(1, indices, torch.ones(indices.shape))
    return counts / len(kept)


def _prepare(args):
    from ..eval.harness import token_method
    from ..eval.loading import load_model

    out = _check_png(args.out)
    method = token_method(args.tokens)
    image, about = _image(args.image, args.seed)
    model, processor = load_model(args.model)
    kept, grid = kept_per_site(model, processor, method, image, args.question)
    crop = processor.image_processor.crop_size
    return out, image, about, kept, grid, (crop["width"], crop["height"])


def _panels(images: list[Image.Image], out: Path) -> None:
    width = sum(i.width for i in images) + 8 * (len(images) - 1)
    canvas = Image.new("RGB", (width, max(i.height for i in images)), "white")
    x = 0
    for image in images:
        canvas.paste(image, (x, 0))
        x += image.width + 8
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)


def run_tokens(args) -> int:
    from .overlay import kept_overlay, model_view

    out, image, about, kept, grid, size = _prepare(args)
    view = model_view(image, size)
    final = kept[-1][1]
    panels = [kept_overlay(view, grid, final[i].tolist(), title=f"{question} ({final.shape[1]} kept)")
              for i, question in enumerate(args.question)]
    _panels(panels, out)
    print(f"{args.tokens}: kept {final.shape[1]} of {grid[0] * grid[1]} visual tokens; {about}; wrote {out}")
    return 0


def run_importance(args) -> int:
    from .overlay import heat_overlay, model_view

    out, image, about, kept, grid, size = _prepare(args)
    view = model_view(image, size)
    shares = survival(kept, grid[0] * grid[1])
    panels = [heat_overlay(view, grid, shares[i].tolist(), title=f"{question} ({len(kept)} sites)")
              for i, question in enumerate(args.question)]
    _panels(panels, out)
    sites = ", ".join(f"{site.where}:{site.layer}" for site, _ in kept)
    print(f"{args.tokens}: sites survived per patch over {sites}; {about}; wrote {out}")
    return 0


def run_guidance(args) -> int:
    from ..eval.loading import load_model
    from ..models import get_adapter
    from .guidance import guidance_figure, guidance_scores

    out = _check_png(args.out)
    keep = int(args.keep) if args.keep >= 1 else args.keep
    if not keep > 0:
        raise VlmpruneError(f"--keep {args.keep}: give a share in (0, 1) or a count >= 1")
    image, about = _image(args.image, args.seed)
    model, processor = load_model(args.model)
    guidance = guidance_scores(model, processor, image, args.question, keep, args.pgp_guide, args.sgp_guide)
    crop = processor.image_processor.crop_size
    figure = guidance_figure(image, (crop["width"], crop["height"]), get_adapter(model).patch_grid({}),
                             args.question, guidance)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.save(out)
    print(f"PGP and SGP, {guidance.count} of {guidance.pgp.shape[1]} visual tokens kept; {about}; wrote {out}")
    return 0


def run_drift(args) -> int:
    from .. import toyworld
    from ..eval.loading import load_model
    from .drift import plot_drift

    out = _check_png(args.out)
    if args.nsamples < 1:
        raise VlmpruneError(f"--nsamples must be at least 1, got {args.nsamples}")
    model, processor = load_model(args.model)
    profile = plot_drift(model, toyworld.calibration(processor, n=args.nsamples), out, alpha=args.alpha)
    print(f"visual drift over {len(profile)} blocks on {args.nsamples} captions; wrote {out}")
    return 0
