"""What transformers passes to a model's, its LLM's and a decoder layer's forward, read robustly.

Releases rename keyword arguments: since 5.24 the KV cache arrives as ``cache=`` where 5.23 passed
``past_key_values=``. A hook that looked it up by name silently took the prefill path at decode time.
So the cache is found by its type (``transformers.Cache``), in a forward's arguments and in the output
a model returns. The other values a hook reads or replaces keep their names across the supported
releases; :func:`check_signature` verifies those names once, when a hook is installed, and
:func:`required` at run time, so a future rename fails with one line that names the installed and the
supported transformers versions instead of computing something else.

Read by name, checked (the documented parameters of the forward that receives them):

* model forward: ``input_ids``, ``pixel_values``, ``attention_mask``;
* LLM (decoder stack) forward: ``inputs_embeds``, ``position_ids``;
* decoder layer forward: ``hidden_states`` (or the first positional argument), ``attention_mask``,
  ``position_ids``, ``position_embeddings`` (the rotary cos/sin the stack computed once).
"""
from __future__ import annotations

import functools
import inspect
from importlib import metadata
from typing import Any, Iterable

import torch
import transformers
from transformers import Cache

from ..errors import VlmpruneError

MODEL_ARGS = ("input_ids", "pixel_values", "attention_mask")
LLM_ARGS = ("inputs_embeds", "position_ids")
LAYER_ARGS = ("hidden_states", "attention_mask", "position_ids", "position_embeddings")


@functools.cache
def supported_transformers() -> str:
    """The transformers range this installation of vlmprune declares (e.g. ``>=5.23,<6``)."""
    try:
        requirements = metadata.requires("vlmprune") or []
    except metadata.PackageNotFoundError:
        return "see pyproject.toml"
    for requirement in requirements:
        name = requirement.split(";")[0].strip()
        if name.lower().startswith("transformers"):
            return name[len("transformers"):].strip() or "any"
    return "any"


def version_error(what: str) -> VlmpruneError:
    """One line naming what was not found and both versions, for a release that moved something."""
    return VlmpruneError(f"{what}: transformers {transformers.__version__} is installed; vlmprune supports "
                         f"transformers {supported_transformers()} (install with `make setup`, which uses the "
                         "tested constraints)")


def find_cache(*containers: dict[str, Any] | Iterable[Any]) -> Cache | None:
    """The first ``Cache`` among the values of ``containers`` (kwargs dicts, args tuples, model outputs)."""
    for container in containers:
        values = container.values() if isinstance(container, dict) else container
        for value in values:
            if isinstance(value, Cache):
                return value
    return None


def output_cache(outputs: Any) -> Cache:
    """The KV cache a model returned (``outputs.past_key_values`` or ``outputs.cache``, by type)."""
    cache = find_cache(outputs)
    if cache is None:
        raise version_error(f"{type(outputs).__name__} holds no KV cache (was use_cache=True passed?)")
    return cache


def without_cache(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` less the KV cache (whatever its keyword) and ``use_cache``: for replaying a layer."""
    return {key: value for key, value in kwargs.items() if not isinstance(value, Cache) and key != "use_cache"}


def layer_hidden(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    """The hidden states a layer was called with: first positional argument or ``hidden_states=``."""
    if args:
        return args[0]
    return required(kwargs, "hidden_states", "a layer's forward")


def required(kwargs: dict[str, Any], name: str, where: str) -> Any:
    """``kwargs[name]``, or a one-line version error if this release does not pass it."""
    if kwargs.get(name) is None:
        raise version_error(f"{where} was called without '{name}'")
    return kwargs[name]


def check_signature(module: torch.nn.Module, names: Iterable[str]) -> None:
    """Fail now, in one line, if ``module.forward`` has no parameter for one of ``names``."""
    parameters = inspect.signature(module.forward).parameters
    missing = [name for name in names if name not in parameters]
    if missing:
        raise version_error(f"{type(module).__name__}.forward takes no {', '.join(repr(m) for m in missing)}")
