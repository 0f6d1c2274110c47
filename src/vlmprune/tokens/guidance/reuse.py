"""One vision tower for a guided pair: when the guide's tower holds the large model's weights (the
toy pair shares toy-clip's tower), the guide takes the output the large model's tower computed for
the same ``pixel_values`` instead of running the tower again.

Decisions: sharing is decided by comparing the two towers' weights (parameters and buffers, name by
name), never by names or configs, and a model without weights (``meta``) never shares unless the
real pair did (:func:`same_weights`). The large tower's output is kept only while ``active()`` says
the guided method is attached, for the same ``pixel_values`` tensor (same object, not modified in
place since) and the same call arguments, and it is handed over once, then let go.
"""
from __future__ import annotations

import copy
import functools
from typing import Any, Callable

import torch
from torch import nn

from ...models import get_adapter


def same_tower(small: nn.Module, large: nn.Module) -> bool:
    """Whether the two models' vision towers hold equal weights and their LLMs read the same output."""
    if any(getattr(small.config, key, None) != getattr(large.config, key, None) for key in FEATURE_KEYS):
        return False
    return same_weights(get_adapter(small).vision_tower, get_adapter(large).vision_tower)


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    """Whether two modules hold equal parameters and buffers under the same names (``meta``: never)."""
    left, right = a.state_dict(), b.state_dict()
    if left.keys() != right.keys():
        return False
    for name, x in left.items():
        y = right[name]
        if x.is_meta or y.is_meta or x.shape != y.shape or x.dtype != y.dtype or not torch.equal(x, y.to(x.device)):
            return False
    return True


# Call arguments that do not change what the pair reads from a tower's output: a guide's forward
# passes use_cache and its own output_hidden_states / output_attentions down, and both models read
# the same feature layer's hidden states.
_NO_EFFECT = ("use_cache", "output_hidden_states", "output_attentions")
# The config entries that say which tower output the LLM reads (LLaVA's; absent elsewhere).
FEATURE_KEYS = ("vision_feature_layer", "vision_feature_select_strategy")


def _same_call(a: tuple, b: tuple) -> bool:
    """Whether two (args, kwargs) calls pass the same objects (tensors by identity, the rest by ==)."""
    (args_a, kwargs_a), (args_b, kwargs_b) = a, b
    kwargs_a, kwargs_b = ({k: v for k, v in kw.items() if k not in _NO_EFFECT} for kw in (kwargs_a, kwargs_b))
    if len(args_a) != len(args_b) or kwargs_a.keys() != kwargs_b.keys():
        return False
    pairs = [*zip(args_a, args_b), *((kwargs_a[k], kwargs_b[k]) for k in kwargs_a)]
    return all(x is y if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor) else x == y for x, y in pairs)


class TowerReuse:
    """Hands ``large``'s vision-tower output to ``small``'s tower (see the module docstring).

    ``follow(large)`` points it at the large model in use (a FLOP count runs a fresh ``meta`` copy)."""

    def __init__(self, small: nn.Module, active: Callable[[nn.Module], bool]):
        self.active = active
        self.large: nn.Module | None = None
        self._hook = None
        self._last: tuple | None = None     # (pixel_values, its version, rest of the call, output)
        tower = get_adapter(small).vision_tower
        compute = tower.forward

        @functools.wraps(compute)
        def forward(*args, **kwargs):
            last, self._last = self._last, None
            if (last is not None and args and args[0] is last[0] and args[0]._version == last[1]
                    and _same_call((args[1:], kwargs), last[2])):
                return last[3]
            return compute(*args, **kwargs)

        tower.forward = forward

    def follow(self, large: nn.Module) -> None:
        """Keep ``large``'s tower outputs from now on (the earlier large model is let go)."""
        if large is self.large:
            return
        if self._hook is not None:
            self._hook.remove()
        self.large, self._last = large, None
        self._hook = get_adapter(large).vision_tower.register_forward_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs, output) -> None:
        self._last = None
        if args and self.active(self.large):
            # a copy: the caller goes on to set fields of the output it got (Qwen splits pooler_output)
            self._last = (args[0], args[0]._version, (args[1:], dict(kwargs)), copy.copy(output))


def is_applied(large: nn.Module, method: Any) -> bool:
    """Whether ``method`` is the token method attached to ``large`` now."""
    engine = getattr(large, "_vlmprune_engine", None)
    return engine is not None and engine.method is method


def share_tower(reuses: dict[int, TowerReuse], small: nn.Module, large: nn.Module, method: Any) -> None:
    """Let ``small`` (a guide of ``method``, whose tower holds ``large``'s weights) take ``large``'s
    tower output; ``reuses`` keeps one :class:`TowerReuse` per guide model."""
    reuse = reuses.get(id(small))
    if reuse is None:
        reuse = reuses[id(small)] = TowerReuse(small, lambda model: is_applied(model, method))
    reuse.follow(large)
