"""Write docs/METHODS_GUIDE.md from the method classes themselves: every registered token and weight
method, its SPEC name, its docstring and its constructor's settings with their defaults.

    .venv/bin/python tools/methods_guide.py > docs/METHODS_GUIDE.md
"""
from __future__ import annotations

import inspect

from vlmprune.tokens.methods import REGISTRY as TOKENS
from vlmprune.weights import REGISTRY as WEIGHTS

# family -> (where it acts, the token method names in it); every registered name appears once
TOKEN_FAMILIES = {
    "IVTP (instruction-guided, inside the vision encoder and the LLM)": ("ivtp", "ivtp_plus"),
    "Small-model guidance (SGP, PGP)": ("sgp", "pgp"),
    "Inside the LLM (attention of the last token)": ("fastv", "pyramiddrop"),
    "Between the encoder and the LLM": ("fastervlm", "visionzip", "divprune", "cdpruner", "topk", "random",
                                        "pooling", "downsample"),
    "Inside the vision encoder": ("evit", "tome"),
}


def settings(cls) -> list[str]:
    rows = []
    for name, parameter in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        default = "required" if parameter.default is parameter.empty else f"`{parameter.default!r}`"
        rows.append(f"| `{name}` | {default} |")
    return rows


def section(name: str, cls) -> list[str]:
    doc = inspect.getdoc(cls) or "(no docstring)"
    lines = [f"### `{name}` ({cls.__module__}.{cls.__name__})", "", doc, ""]
    rows = settings(cls)
    if rows:
        lines += ["| setting | default |", "|---|---|", *rows, ""]
    return lines


def main() -> None:
    listed = [name for names in TOKEN_FAMILIES.values() for name in names]
    missing = sorted(set(TOKENS) - set(listed))
    families = {**TOKEN_FAMILIES, **({"Other": tuple(missing)} if missing else {})}
    out = ["# Methods guide: every method's settings and defaults", "",
           "Generated from the method classes (their docstrings and constructor signatures) by "
           "`.venv/bin/python tools/methods_guide.py > docs/METHODS_GUIDE.md`; the specs behind them are in "
           "METHODS.md of the design notes. A setting is given in a SPEC as `name:key=value,...` "
           "(`vlmprune eval --tokens`, `vlmprune prune --method`) or as keys of a recipe stage (docs/RECIPES.md). "
           "`keep` is a count when an integer >= 1 and a fraction of the visual tokens below 1.", "",
           "# Token methods", ""]
    for family, names in families.items():
        out += [f"## {family}", ""]
        for name in names:
            out += section(name, TOKENS[name])
    out += ["# Weight methods", "",
            "All prune the `nn.Linear` weights of the LLM decoder layers, one block at a time "
            "(`vlmprune prune`, docs/RECIPES.md for `targets`/`ignore`).", ""]
    for name, cls in sorted(WEIGHTS.items()):
        out += section(name, cls)
    print("\n".join(out).rstrip())


if __name__ == "__main__":
    main()
