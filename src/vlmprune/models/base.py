"""The adapter contract: where a model family keeps its parts, so that nothing else needs to know.

Every family answers the same questions (see docs/ARCHITECTURE.md); the token engine and the weight
engine only talk to a :class:`ModelAdapter`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from ..errors import VlmpruneError


class ModelAdapter(ABC):
    """Base adapter: family modules fill in the module paths in ``__init__``."""

    family: str = ""
    has_cls: bool = False

    def __init__(self, model: nn.Module):
        self.model = model
        self.core = model.model                     # the *Model that owns get_image_features
        self.llm = self.core.language_model
        self.llm_layers: nn.ModuleList = self.llm.layers
        self.lm_head: nn.Module = model.lm_head
        self.vision_tower: nn.Module = None
        self.projector: nn.Module = None
        self.vision_layers: nn.ModuleList | None = None
        self.vision_feature_layer: int | None = None
        self.image_token_id: int = model.config.image_token_id

    # -- tokens in the LLM sequence -------------------------------------------------------
    def image_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) bool, True at visual-token positions."""
        return input_ids == self.image_token_id

    def image_spans(self, input_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
        """Per sample, the ``(start, end)`` runs of visual tokens (end exclusive)."""
        spans = []
        for row in self.image_token_mask(input_ids).tolist():
            runs, start = [], None
            for i, flag in enumerate(row + [False]):
                if flag and start is None:
                    start = i
                elif not flag and start is not None:
                    runs.append((start, i))
                    start = None
            spans.append(runs)
        return spans

    @abstractmethod
    def patch_grid(self, inputs: dict[str, Any]) -> tuple[int, int]:
        """(rows, cols) of the base image's visual tokens, for overlays."""

    # -- what the token engine needs ------------------------------------------------------
    @property
    def llm_rotary(self) -> nn.Module:
        return self.llm.rotary_emb

    def image_feature_counts(self, image_outputs: Any) -> list[int]:
        """Visual tokens per image in the LLM sequence, read from the features' shapes."""
        return [int(f.shape[0]) for f in image_outputs.pooler_output]

    def attention_projections(self, tower: str, layer: int) -> tuple[nn.Module, nn.Module, nn.Module]:
        """The q, k and v Linears of ``layer`` in ``tower`` ("llm" or "vision"): the token engine
        hooks them to read the projections the model computes instead of computing them again."""
        attn = (self.llm_layers if tower == "llm" else self.vision_layers)[layer].self_attn
        return attn.q_proj, attn.k_proj, attn.v_proj

    def llm_qkv(self, layer: int, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                projected: tuple | None = None):
        """Query, key and value heads (B, H, N, d) that LLM ``layer`` computes from its input
        ``hidden``: RoPE applied to q and k, grouped kv heads repeated to H. ``projected``: the
        layer's own q/k/v projection outputs for ``hidden``, when already at hand."""
        block = self.llm_layers[layer]
        attn = block.self_attn
        b, n, _ = hidden.shape
        if projected is None:
            h = block.input_layernorm(hidden)
            projected = (attn.q_proj(h), attn.k_proj(h), attn.v_proj(h))
        q, k, v = (p.view(b, n, -1, attn.head_dim).transpose(1, 2) for p in projected)
        k_raw = k
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        return (q, *(_repeat_heads(x, q.shape[1] // k.shape[1]) for x in (k, v, k_raw)), attn.scaling)

    def llm_token_projections(self, layer: int) -> dict[str, tuple[nn.Module, str]]:
        """The Linears of LLM ``layer`` that act on each token on its own (q/k/v and the FFN), as
        ``{role: (parent module, attribute)}`` so that a caller can replace them."""
        block = self.llm_layers[layer]
        attn, mlp = block.self_attn, block.mlp
        return {role: (parent, role) for parent, roles in ((attn, ("q_proj", "k_proj", "v_proj")),
                                                          (mlp, ("gate_proj", "up_proj", "down_proj")))
                for role in roles}

    def vision_qkv(self, layer: int, hidden: torch.Tensor, projected: tuple | None = None):
        """Query, key and value heads (B, H, N, d) of vision ``layer`` for its input ``hidden``
        (``projected``: the layer's own q/k/v projection outputs, when at hand)."""
        raise VlmpruneError(f"{self.family}: pruning inside the vision encoder is not supported; "
                            "use Site('llm', 0) or later")


def _repeat_heads(x: torch.Tensor, times: int) -> torch.Tensor:
    """Grouped kv heads (B, H_kv, N, d) repeated to the query heads; no copy without grouping."""
    return x if times == 1 else x.repeat_interleave(times, 1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class ClipTowerMixin:
    """Vision towers of the CLIP/SigLIP kind: ``vision_model.encoder.layers`` with ``layer_norm1``."""

    @property
    def has_cls(self) -> bool:
        return self.vision_tower.config.model_type == "clip_vision_model"

    @property
    def vision_transformer(self) -> nn.Module:
        """The tower's transformer (embeddings, pre-norm, encoder), unwrapped from ``*VisionModel``."""
        return getattr(self.vision_tower, "vision_model", self.vision_tower)

    def _tower_layers(self) -> nn.ModuleList:
        return self.vision_transformer.encoder.layers

    def _feature_layer_index(self) -> int:
        """Non-negative index of the (deepest) encoder layer whose output the LLM reads."""
        layers = self.model.config.vision_feature_layer
        n = len(self._tower_layers())
        # hidden_states[j] is the output of layer j-1
        return max(layer - 1 if layer > 0 else n + layer for layer in (layers if isinstance(layers, list) else [layers]))

    def _prunable_tower_layers(self) -> nn.ModuleList | None:
        """The encoder layers, when the LLM reads a single layer's patch tokens without [CLS]."""
        config = self.model.config
        single = isinstance(config.vision_feature_layer, int)
        return self._tower_layers() if single and config.vision_feature_select_strategy == "default" else None

    def vision_qkv(self, layer: int, hidden: torch.Tensor, projected: tuple | None = None):
        block = self._tower_layers()[layer]
        attn = block.self_attn
        b, n, _ = hidden.shape
        if projected is None:
            h = block.layer_norm1(hidden)
            projected = (attn.q_proj(h), attn.k_proj(h), attn.v_proj(h))
        heads = [p.view(b, n, attn.num_heads, attn.head_dim).transpose(1, 2) for p in projected]
        return heads[0], heads[1], heads[2], heads[1], attn.scale
