"""The token-method API: a method names its pruning sites and, at each, scores and selects.

The engine (``engine.py``) owns hooks, shapes, positions, masks and the KV cache; a method installs
no hooks and reaches the model only through the adapter in its context. At every site the engine hands the method a :class:`SiteContext` and applies the
:class:`Reduction` it returns.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch

Where = Literal["vision", "llm"]


@dataclass(frozen=True)
class Site:
    """Prune on the *input* of ``layer``: ``Site("vision", 3)`` runs after vision layers 0..2;
    ``Site("llm", 0)`` is "before the LLM" (after the projector and any packing/merger)."""

    where: Where
    layer: int


@dataclass
class ModelPlan:
    """What a method may know about the model before the forward, to place its sites."""

    family: str
    n_vision_layers: int          # 0 when in-encoder sites are unsupported for this family
    vision_feature_layer: int     # non-negative index of the encoder layer whose output the LLM reads
    n_llm_layers: int
    has_cls: bool


@dataclass
class Reduction:
    """What a method returns at a site.

    ``keep``: (B, k) indices into the current visual tokens (``SiteContext.visual``), any order;
    the engine sorts them. ``hidden``: optional (B, k, D) replacement states for the kept tokens
    (merging methods: EViT, ToMe, VisionZip). ``sizes``: optional (B, k) token sizes for
    proportional attention (ToMe).
    """

    keep: torch.Tensor
    hidden: torch.Tensor | None = None
    sizes: torch.Tensor | None = None


@dataclass
class SiteContext:
    """Everything a scorer may read at one site, for the current batch.

    ``hidden``: (B, N, D) the sequence at the site (vision: [CLS] + patches; LLM: the whole prompt).
    ``visual``: (B, V) positions of the current visual tokens in ``hidden``.
    ``original``: (B, V) original visual-token index of each (0..n_visual-1), for overlays and grids.
    ``n_visual``: visual tokens before any pruning. ``cls``: index of [CLS] in ``hidden`` or None.
    ``query``: (B,) index of the row a scorer ranks by in the LLM (the last prompt token, or the
    scoring-only token when the method inserted one).
    ``attention(layer, rows=None)``: head-mean attention probabilities (B, R, N) of an earlier
    layer recorded since the previous site, computed from that layer's q and k (SDPA stays on).
    ``values(layer)`` / ``keys(layer)``: (B, N, H*d) value / key vectors of that layer.
    ``inputs``: the model inputs of this forward (``input_ids``, ``attention_mask``, ...).
    ``state``: a dict the method may use to carry results from one site to the next.
    ``adapter``: the model's :class:`~vlmprune.models.ModelAdapter`, for a method that must run one
    of the model's own modules (downsample re-embeds the image with the tower's patch embedding).
    """

    site: Site
    hidden: torch.Tensor
    visual: torch.Tensor
    original: torch.Tensor
    n_visual: int
    cls: int | None
    query: torch.Tensor | None
    attention: Callable[..., torch.Tensor]
    values: Callable[[int], torch.Tensor]
    keys: Callable[[int], torch.Tensor]
    inputs: dict[str, Any]
    state: dict[str, Any] = field(default_factory=dict)
    sizes: torch.Tensor | None = None
    adapter: Any = None


class TokenMethod(ABC):
    """Base class: subclasses set ``name`` and implement :meth:`sites` and :meth:`reduce` (a class
    that lacks either cannot be instantiated).

    ``keep`` follows the project convention: an int >= 1 is a count of visual tokens kept at the
    end, a float in (0, 1) a fraction of the visual tokens present.
    """

    name: str = ""

    @abstractmethod
    def sites(self, plan: ModelPlan) -> list[Site]:
        """Where this method prunes on a model of this ``plan``."""

    def recorded_layers(self, site: Site, plan: ModelPlan) -> list[int]:
        """Layers (same tower as ``site``) whose q/k/v the engine must record before ``site``."""
        return []

    @abstractmethod
    def reduce(self, ctx: SiteContext) -> Reduction:
        """Which visual tokens go on from ``ctx.site`` (and, for merging methods, their new states)."""

    def prefill_starts(self, model: Any, inputs: dict[str, Any]) -> None:
        """Optional: called as each prefill of ``model`` starts, before its vision tower runs (a guided
        method points its guide at the tower output it will reuse)."""

    def scoring_token(self, model: Any, inputs: dict[str, Any]) -> torch.Tensor | None:
        """Optional (B, D) LLM-space embedding of a scoring token (IVTP's pseudo-[CLS]).

        The engine places it right after the visual tokens with the position of the first text
        token. Unless :meth:`scoring_token_is_real`, it only scores: it is masked as a key for
        every other token and dropped after the last LLM site."""
        return None

    def scoring_token_is_real(self) -> bool:
        """True: the scoring token is an ordinary token of the sequence (every later token sees it
        and it stays to the end); IVTP's "w/ pseudo CLS" variant."""
        return False

    def spec(self) -> str:
        """The SPEC string that rebuilds this method (used in reports)."""
        settings = ",".join(f"{k}={v}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{self.name}:{settings}" if settings else self.name
