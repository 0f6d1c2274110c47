"""The token-method registry: every module in this package is imported and each ``TokenMethod``
subclass with a ``name`` is registered under it, so adding a method means adding one file."""
from __future__ import annotations

import importlib
import inspect
import pkgutil

from ..base import TokenMethod

REGISTRY: dict[str, type[TokenMethod]] = {}


def register(cls: type[TokenMethod]) -> type[TokenMethod]:
    """Register ``cls`` under ``cls.name`` (usable as a decorator for methods defined elsewhere)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty `name` to be registered")
    REGISTRY[cls.name] = cls
    return cls


for _info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name):
    _module = importlib.import_module(f"{__name__}.{_info.name}")
    for _cls in vars(_module).values():
        if inspect.isclass(_cls) and issubclass(_cls, TokenMethod) and _cls.name and _cls.__module__ == _module.__name__:
            register(_cls)
