"""Parsing of SPEC strings shared by token and weight methods: ``name:key=value,key=value``.

Values are typed by their look: ints, floats, booleans (``true``/``false``), ``none``, and
``a/b/c`` lists; everything else stays a string. Registries map names to classes whose
constructor keywords are the keys, so every SPEC the CLI accepts is a constructor call.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

from .errors import SpecError


def _parse_value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "yes"):
        return True
    if low in ("false", "no"):
        return False
    if low == "none":
        return None
    if "/" in text:
        return [_parse_value(part) for part in text.split("/")]
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split ``"fastv:layer=2,keep=0.5"`` into ``("fastv", {"layer": 2, "keep": 0.5})``."""
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError("empty SPEC: write NAME or NAME:key=value,... (for example fastv:layer=2,keep=0.5)")
    name, _, rest = spec.strip().partition(":")
    name = name.strip().lower()
    if not name.replace("-", "").replace("_", "").isalnum():
        raise SpecError(f"bad method name {name!r} in SPEC {spec!r}: write NAME:key=value,...")
    kwargs: dict[str, Any] = {}
    if rest.strip():
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            key = key.strip().replace("-", "_")
            if not eq or not key or not value.strip():
                raise SpecError(f"cannot parse {item!r} in SPEC {spec!r}: each setting must be key=value")
            kwargs[key] = _parse_value(value.strip())
    return name, kwargs


def build_from_spec(spec: str, registry: dict[str, Callable[..., Any]], kind: str) -> Any:
    """Instantiate ``registry[name](**kwargs)`` with a one-line error for unknown names or keys."""
    name, kwargs = parse_spec(spec)
    if name not in registry:
        known = ", ".join(sorted(registry))
        raise SpecError(f"unknown {kind} {name!r}; choose one of: {known}")
    factory = registry[name]
    params = inspect.signature(factory).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            allowed = ", ".join(p for p in params if p != "self")
            raise SpecError(f"{kind} {name!r} has no setting {unknown[0]!r}; its settings are: {allowed}")
    try:
        return factory(**kwargs)
    except TypeError as exc:  # wrong value types surface as one line
        raise SpecError(f"bad settings for {kind} {name!r}: {exc}") from None
