"""Recipes: one YAML file that says how a model is compressed, stage by stage, in llm-compressor's style.

    description: ATV-Pruning to 50%, then IVTP keeping 16 visual tokens
    stages:
      - weights:
          method: atv            # a weight method's name or SPEC; its settings may follow as keys
          sparsity: 0.5
          targets: ['\\.mlp\\.']   # re.search on full Linear names (default: every Linear of the LLM layers)
          ignore: ['layers\\.0\\.']
          nsamples: 128          # calibration samples
      - tokens:
          method: ivtp
          keep: 16

Stages apply in the order written: at most one ``weights`` stage, then at most one ``tokens`` stage
(a model carries one token method). Reading a recipe needs neither torch nor a model, so the command
line rejects a bad one at once; every error names the file, the line and the key
(``recipe.yaml:7: stages[0].weights.sparsty: ...``), from the YAML node marks.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from .errors import SpecError, VlmpruneError
from .spec import check_known, parse_spec

STAGE_KINDS = ("weights", "tokens")
STAGE_OPTIONS = {"weights": ("targets", "ignore", "nsamples"), "tokens": ()}
TOP_KEYS = ("description", "stages")
SHIPPED = Path(__file__).with_name("recipes")
DEFAULT_NSAMPLES = 128


@dataclass(frozen=True)
class Where:
    """A place in a recipe file, for error messages."""

    source: str
    line: int
    key: str

    def error(self, problem: str) -> VlmpruneError:
        return VlmpruneError(f"{self.source}:{self.line}: {self.key}: {problem}")


@dataclass(frozen=True)
class Stage:
    """One stage: its kind (``weights``/``tokens``), the method as a SPEC, and the weight options."""

    kind: str
    spec: str
    where: Where
    targets: list[str] | None = None
    ignore: list[str] | None = None
    nsamples: int | None = None

    def build(self):
        """The configured method; a bad setting value is reported at the stage's line."""
        from . import tokens, weights

        try:
            return (weights if self.kind == "weights" else tokens).from_spec(self.spec)
        except (SpecError, VlmpruneError, ValueError) as exc:
            raise self.where.error(str(exc)) from None


@dataclass(frozen=True)
class Recipe:
    source: str
    text: str
    stages: list[Stage]
    description: str | None = None

    def stage(self, kind: str) -> Stage | None:
        return next((s for s in self.stages if s.kind == kind), None)

    def record(self) -> dict[str, str]:
        """What a saved model keeps of the recipe that made it."""
        return {"file": Path(self.source).name, "text": self.text}


def read_recipe(path: str | Path) -> Recipe:
    """Read and check a recipe file (a shipped one by bare name, e.g. ``toy-large-atv50-ivtp16``)."""
    file = Path(path)
    if not file.is_file() and (SHIPPED / f"{path}.yaml").is_file():
        file = SHIPPED / f"{path}.yaml"
    try:
        text = file.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise VlmpruneError(f"cannot read recipe {path}: {exc.strerror or exc}") from None
    return parse_recipe(text, str(path))


def parse_recipe(text: str, source: str = "<recipe>") -> Recipe:
    """Check a recipe's YAML text; ``source`` names it in errors."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        raise VlmpruneError(f"{source}:{line}: not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
    if root is None:
        raise VlmpruneError(f"{source}:1: the recipe is empty: it needs a 'stages' list")
    top = _mapping(root, Where(source, root.start_mark.line + 1, "(top level)"), TOP_KEYS)
    if "stages" not in top:
        raise Where(source, root.start_mark.line + 1, "stages").error("missing: list the stages to apply")
    stages_node = top["stages"][1]
    where = Where(source, stages_node.start_mark.line + 1, "stages")
    if not isinstance(stages_node, yaml.SequenceNode) or not stages_node.value:
        raise where.error("must be a non-empty list of '- weights: {...}' / '- tokens: {...}' items")
    stages = [_stage(node, Where(source, node.start_mark.line + 1, f"stages[{i}]"))
              for i, node in enumerate(stages_node.value)]
    kinds = [s.kind for s in stages]
    for kind in STAGE_KINDS:
        if kinds.count(kind) > 1:
            second = [s for s in stages if s.kind == kind][1]
            raise second.where.error(f"a second {kind} stage: a recipe holds at most one of each kind")
    if kinds == ["tokens", "weights"]:
        raise stages[0].where.error("the tokens stage must come after the weights stage (weights are "
                                    "calibrated on the unpruned token sequence)")
    description = _value(top["description"][1]) if "description" in top else None
    return Recipe(source, text, stages, None if description is None else str(description))


def _mapping(node, where: Where, allowed: Sequence[str] | None) -> dict[str, tuple[Where, Any]]:
    """``{key: (where, value node)}`` of a mapping node; unknown keys (when ``allowed``) are errors."""
    if not isinstance(node, yaml.MappingNode):
        raise where.error("must be a mapping of key: value")
    entries: dict[str, tuple[Where, Any]] = {}
    for key_node, value_node in node.value:
        key = str(key_node.value)
        here = Where(where.source, key_node.start_mark.line + 1,
                     key if where.key == "(top level)" else f"{where.key}.{key}")
        if allowed is not None and key not in allowed:
            raise here.error(f"unknown key; expected one of: {', '.join(allowed)}")
        if key in entries:
            raise here.error("given twice")
        entries[key] = (here, value_node)
    return entries


def _value(node) -> Any:
    return yaml.SafeLoader("").construct_object(node, deep=True)


def _stage(node, where: Where) -> Stage:
    items = _mapping(node, where, STAGE_KINDS)
    if len(items) != 1:
        raise where.error("each stage is one 'weights:' or 'tokens:' mapping")
    (kind, (here, body)), = items.items()
    entries = _mapping(body, here, None)
    if "method" not in entries:
        raise here.error("missing 'method': name the method (or give its SPEC)")
    method_where, method_node = entries.pop("method")
    method = _value(method_node)
    if not isinstance(method, str):
        raise method_where.error("must be a method name or SPEC string")
    try:
        name, settings = parse_spec(method)
    except SpecError as exc:
        raise method_where.error(str(exc)) from None
    options: dict[str, Any] = {}
    for key, (key_where, value_node) in entries.items():
        value = _value(value_node)
        if key in STAGE_OPTIONS[kind]:
            options[key] = _option(key, value, key_where)
            continue
        if key in settings:
            raise key_where.error(f"also set in the method SPEC {method!r}")
        settings[key] = value
    settings_of = _catalogue()[kind]
    label = "token method" if kind == "tokens" else "weight method"
    try:
        check_known(name, parse_spec(method)[1], settings_of, label)      # the name, and keys inside the SPEC
    except SpecError as exc:
        raise method_where.error(str(exc)) from None
    for key, (key_where, _) in entries.items():
        if key not in STAGE_OPTIONS[kind]:
            try:
                check_known(name, {key: None}, settings_of, label)
            except SpecError as exc:
                raise key_where.error(f"{exc}{_options_hint(kind)}") from None
    spec = _spec(name, settings, here)
    return Stage(kind, spec, here, **options)


def _options_hint(kind: str) -> str:
    return f"; stage options: method, {', '.join(STAGE_OPTIONS[kind])}" if STAGE_OPTIONS[kind] else ""


def _option(key: str, value: Any, where: Where) -> Any:
    if key == "nsamples":
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise where.error(f"must be an integer >= 1, got {value!r}")
        return value
    patterns = [value] if isinstance(value, str) else value
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise where.error("must be a regex or a list of regexes (quote them: '\\.mlp\\.')")
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise where.error(f"bad regex {pattern!r}: {exc}") from None
    return patterns or None


def _spec(name: str, settings: dict[str, Any], where: Where) -> str:
    """The SPEC string that ``from_spec`` parses back into exactly ``settings``."""
    def text(value):
        if isinstance(value, bool) or value is None:
            return str(value).lower()
        if isinstance(value, list):
            return "/".join(text(v) for v in value)
        return str(value)

    body = ",".join(f"{key}={text(value)}" for key, value in settings.items())
    spec = f"{name}:{body}" if body else name
    if parse_spec(spec) != (name, settings):
        raise where.error(f"settings {settings} cannot be written as a SPEC (no ',' or '=' inside values)")
    return spec


def _catalogue() -> dict:
    from .preflight import catalogue

    return catalogue()


@dataclass
class AppliedRecipe:
    """What :func:`apply_recipe` did: the weight pruning report and the token pruning handle, if any."""

    recipe: Recipe
    report: Any = None                       # vlmprune.weights.PruneReport
    handle: Any = None                       # vlmprune.tokens.TokenPruningHandle
    nsamples: int = 0


def apply_recipe(model, recipe: Recipe | str | Path,
                 calibration: Sequence[Any] | Callable[[int], Sequence[Any]] | None = None, *, device=None,
                 tokens: bool = True) -> AppliedRecipe:
    """Apply ``recipe`` to ``model`` in order: prune the weights in place, then attach the token method.

    ``calibration``: processor outputs (batch 1 each), of which a stage's ``nsamples`` first are used,
    or a function ``n -> samples``. ``tokens=False`` skips attaching the token stage (to save the model).
    Every method is built before any work starts, so a bad setting costs no pruning time.
    """
    from .weights import prune

    recipe = recipe if isinstance(recipe, Recipe) else read_recipe(recipe)
    weight_stage, token_stage = recipe.stage("weights"), recipe.stage("tokens")
    weight_method = weight_stage.build() if weight_stage else None
    token_method = token_stage.build() if token_stage else None
    applied = AppliedRecipe(recipe)
    if weight_method is not None:
        samples = None
        if weight_method.needs_calibration:
            samples = _calibration(calibration, weight_stage)
            applied.nsamples = len(samples)
        applied.report = prune(model, weight_method, calibration=samples, targets=weight_stage.targets,
                               ignore=weight_stage.ignore, device=device)
    if token_method is not None and tokens:
        from . import tokens as token_api

        applied.handle = token_api.apply(model, token_method)
    return applied


def _calibration(calibration, stage: Stage) -> list:
    if calibration is None:
        raise stage.where.error(f"{stage.spec} needs calibration samples: pass calibration=[processor outputs]")
    if callable(calibration):
        return list(calibration(stage.nsamples or DEFAULT_NSAMPLES))
    samples = list(calibration)
    if stage.nsamples is not None:
        if len(samples) < stage.nsamples:
            raise stage.where.error(f"nsamples is {stage.nsamples} but only {len(samples)} calibration samples "
                                    "were given")
        samples = samples[:stage.nsamples]
    return samples


def recipe_token_spec(path: str | Path, tokens: str | None = None) -> str:
    """``vlmprune eval --recipe``: the SPEC of the recipe's tokens stage (its weights stage is what
    ``vlmprune prune --recipe`` applies); ``tokens`` is a ``--tokens`` given as well, which is refused."""
    if tokens:
        raise VlmpruneError("give --tokens or --recipe, not both")
    stage = read_recipe(path).stage("tokens")
    if stage is None:
        raise VlmpruneError(f"{path} has no tokens stage: nothing for eval to attach")
    return stage.spec
