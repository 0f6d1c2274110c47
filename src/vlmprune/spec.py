"""Parsing of SPEC strings shared by token and weight methods: ``name:key=value,key=value``.

Values are typed by their look: ints, floats, booleans (``true``/``false``), ``none``, and
``a/b/c`` lists; everything else stays a string. Registries map names to classes whose
constructor keywords are the keys, so every SPEC the CLI accepts is a constructor call.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, Sequence

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


def check_known(name: str, kwargs: dict[str, Any], settings_of: Mapping[str, Sequence[str] | None],
                kind: str) -> None:
    """One-line SpecError unless ``name`` is in ``settings_of`` and every key of ``kwargs`` is among its
    settings (``None``: the method takes any keyword)."""
    if name not in settings_of:
        raise SpecError(f"unknown {kind} {name!r}; choose one of: {', '.join(sorted(settings_of))}")
    allowed = settings_of[name]
    if allowed is not None:
        unknown = sorted(set(kwargs) - set(allowed))
        if unknown:
            raise SpecError(f"{kind} {name!r} has no setting {unknown[0]!r}; its settings are: {', '.join(allowed)}")


def build_from_spec(spec: str, registry: dict[str, Callable[..., Any]], kind: str) -> Any:
    """Instantiate ``registry[name](**kwargs)`` with a one-line error for unknown names or keys."""
    name, kwargs = parse_spec(spec)
    if name in registry:
        params = inspect.signature(registry[name]).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        settings_of = {name: None if takes_any else [p for p in params if p != "self"]}
    else:
        settings_of = {known: None for known in registry}
    check_known(name, kwargs, settings_of, kind)
    factory = registry[name]
    try:
        return factory(**kwargs)
    except TypeError as exc:  # wrong value types surface as one line
        raise SpecError(f"bad settings for {kind} {name!r}: {exc}") from None
