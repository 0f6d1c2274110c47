"""The token-pruning engine: hooks that shorten the visual part of the sequence at a method's sites.

How it works (docs/ENGINE.md has the full story):

* A forward pre-hook on the model starts a *prefill* when ``pixel_values`` arrive, a *decode* step
  when a cache from an earlier prefill comes back, and stays out of text-only calls.
* Vision sites (CLIP-family towers) prune the encoder's token sequence; the wrapped
  ``get_image_features`` then scatters the kept features back into their original slots, so the
  model's placeholder check passes, and the dropped slots leave at the first LLM layer.
* LLM sites are forward pre-hooks with kwargs on the decoder layers. Each layer gets the engine's
  own 4-D additive mask (causal by original token order, padding and a scoring-only token masked
  as keys) and the rotary cos/sin gathered at each kept token's original position, so SDPA stays
  on and kept tokens keep their positions (``positions="compact"`` renumbers them instead).
* The KV cache then holds a different length per layer; at decode steps each layer's mask is its
  prefill key validity plus ones for the tokens generated since.

Nothing here reads tensor values into Python, so a ``meta``-device model runs through it too.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ..errors import VlmpruneError
from ..models import ModelAdapter, get_adapter
from ..models.forward_args import (LAYER_ARGS, LLM_ARGS, MODEL_ARGS, check_signature, find_cache, layer_hidden,
                                   required)
from .base import ModelPlan, Reduction, Site, SiteContext, TokenMethod

Positions = Literal["original", "compact"]
# most per-head attention scores (floats) one read-out holds at once: 64 MB; larger maps go in row blocks
SCORE_BLOCK = 2 ** 24


def _first_true(mask: torch.Tensor, count: int) -> torch.Tensor:
    """(B, N) bool -> (B, count) positions of the first ``count`` True entries, ascending (shape-only)."""
    return torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :count]


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of (B, N, ...) ``x`` at (B, K) ``index``."""
    expanded = index.view(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:])
    return x.gather(1, expanded)


def _detached(heads: tuple) -> tuple:
    """The heads without autograd history: the captured projections of a training forward carry a
    graph, and a head returned as a view of one (kv heads not repeated) would keep it alive."""
    return tuple(x.detach() if isinstance(x, torch.Tensor) else x for x in heads)


def _size_bias(sizes: torch.Tensor, dtype: torch.dtype, cls: bool = False) -> torch.Tensor:
    """log(size) per token (ToMe's proportional attention); a leading 0 for [CLS] when ``cls``."""
    bias = sizes.to(dtype).log()
    return torch.cat([bias.new_zeros(bias.shape[0], 1), bias], dim=1) if cls else bias


@dataclass
class _Sequence:
    """The LLM sequence as the current layer sees it. ``src``: index into the full prompt whose rotary
    position a token uses; ``order``: causal rank (2 x prompt index; odd for the scoring token);
    ``valid``: may be attended to as a key; ``is_visual``: holds an image feature."""

    hidden: torch.Tensor
    src: torch.Tensor
    order: torch.Tensor
    valid: torch.Tensor
    is_visual: torch.Tensor
    visual: torch.Tensor
    original: torch.Tensor
    sizes: torch.Tensor | None = None
    scoring: torch.Tensor | None = None     # (B,) position of the scoring-only token while present


@dataclass
class _VisionStage:
    """One call of ``get_image_features``: the visual-token count and what the encoder sites kept.
    ``generate`` encodes images before the first forward, so this outlives the call."""

    inputs: dict[str, Any]
    method_state: dict[str, Any]
    n_visual: int | None = None
    n_images: int = 0
    original: torch.Tensor | None = None     # (B, k) original patch indices still present
    sizes: torch.Tensor | None = None
    pruned: bool = False
    pending: bool = False                     # encoded outside a forward (generate), not yet used by a prefill


@dataclass
class _ForwardState:
    """Everything one prefill learns, kept for the decode steps that follow it."""

    inputs: dict[str, Any]
    vision: _VisionStage | None = None
    scoring_embedding: torch.Tensor | None = None
    seq: _Sequence | None = None
    full_cos: torch.Tensor | None = None
    full_sin: torch.Tensor | None = None
    prompt_positions: torch.Tensor | None = None     # (B, L) or (3, B, L) position ids of the prompt
    dropped_before: torch.Tensor | None = None       # (B, L) prompt tokens dropped before each one
    layer_keys: dict[int, tuple] = field(default_factory=dict)    # (valid, size bias) of each layer's keys
    layer_shift: dict[int, torch.Tensor] = field(default_factory=dict)
    built: tuple = ()                                # (mask, cos, sin) of the current sequence
    method_state: dict[str, Any] = field(default_factory=dict)
    prompt_length: int = 0
    decoded: int = 0


class TokenPruningHandle:
    """Returned by :func:`apply`; ``remove()`` takes every hook and wrapper off the model."""

    def __init__(self, engine: "_Engine"):
        self._engine = engine

    def remove(self) -> None:
        self._engine.remove()

    def __enter__(self) -> "TokenPruningHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def apply(model: nn.Module, method: TokenMethod | str, positions: Positions = "original") -> TokenPruningHandle:
    """Install ``method`` (or a SPEC string) on ``model`` (a supported ``*ForConditionalGeneration``);
    plain forward and ``generate`` then prune. ``positions="compact"`` renumbers the kept tokens'
    rotary positions."""
    if isinstance(method, str):
        from . import from_spec  # the registry imports every method module, which import this one's package
        method = from_spec(method)
    if not isinstance(method, TokenMethod):
        raise VlmpruneError(f"apply() needs a TokenMethod or a SPEC string, not {type(method).__name__}")
    if positions not in ("original", "compact"):
        raise VlmpruneError(f"positions={positions!r}: choose 'original' or 'compact'")
    if getattr(model, "_vlmprune_engine", None) is not None:
        raise VlmpruneError("a token method is already applied to this model: call handle.remove() first")
    return TokenPruningHandle(_Engine(model, method, positions))


class _Engine:
    def __init__(self, model: nn.Module, method: TokenMethod, positions: Positions):
        self.model = model
        self.method = method
        self.positions = positions
        self.adapter: ModelAdapter = get_adapter(model)
        self.plan = self._plan()
        self.vision_sites, self.llm_sites = self._sites()
        self.last_llm_site = max(self.llm_sites, default=0)
        self.record_vision: set[int] = set()
        self.record_llm: set[int] = set()
        for site in [*self.vision_sites.values(), *self.llm_sites.values()]:
            layers = set(method.recorded_layers(site, self.plan))
            limit = len(self.adapter.vision_layers) if site.where == "vision" else self.plan.n_llm_layers
            if any(not 0 <= layer < min(limit, site.layer) for layer in layers):
                raise VlmpruneError(f"{method.name}: recorded layers {sorted(layers)} must come before {site}")
            (self.record_vision if site.where == "vision" else self.record_llm).update(layers)
        self.state: _ForwardState | None = None
        self.vision_stage: _VisionStage | None = None
        self.records: dict[tuple[str, int], tuple] = {}
        self.mode: str = "off"
        self._in_forward = False
        self._encoding = False
        self._hooks: list[Any] = []
        self._install()
        model._vlmprune_engine = self

    # -- set-up ---------------------------------------------------------------------------
    def _plan(self) -> ModelPlan:
        a = self.adapter
        return ModelPlan(family=a.family, n_vision_layers=len(a.vision_layers) if a.vision_layers is not None else 0,
                         vision_feature_layer=a.vision_feature_layer, n_llm_layers=len(a.llm_layers),
                         has_cls=a.has_cls)

    def _sites(self) -> tuple[dict[int, Site], dict[int, Site]]:
        vision, llm = {}, {}
        for site in self.method.sites(self.plan):
            if site.where == "vision":
                if self.adapter.vision_layers is None:
                    raise VlmpruneError(f"{self.method.name}: this {self.plan.family} model has no in-encoder pruning "
                                        "sites (they need a CLIP tower read at one layer without [CLS]); "
                                        "use Site('llm', 0) (before the LLM) or later")
                last = self.plan.vision_feature_layer + 1
                if not 0 <= site.layer <= last:
                    raise VlmpruneError(f"{self.method.name}: {site} is out of range; vision sites go from 0 to "
                                        f"{last} (the input of the layer after the one the LLM reads)")
                vision[site.layer] = site
            elif site.where == "llm":
                if not 0 <= site.layer < self.plan.n_llm_layers:
                    raise VlmpruneError(f"{self.method.name}: {site} is out of range; the LLM has layers "
                                        f"0..{self.plan.n_llm_layers - 1}")
                llm[site.layer] = site
            else:
                raise VlmpruneError(f"{self.method.name}: unknown site kind {site.where!r}; use 'vision' or 'llm'")
        return vision, llm

    def _install(self) -> None:
        a = self.adapter
        check_signature(self.model, MODEL_ARGS)
        check_signature(a.llm, LLM_ARGS)
        for layer in a.llm_layers:
            check_signature(layer, LAYER_ARGS)
        self._hooks.append(self.model.register_forward_pre_hook(self._on_model, with_kwargs=True))
        self._hooks.append(self.model.register_forward_hook(self._after_model, always_call=True))
        self._hooks.append(a.llm.register_forward_pre_hook(self._on_llm, with_kwargs=True))
        for index, layer in enumerate(a.llm_layers):
            self._hooks.append(layer.register_forward_pre_hook(self._llm_layer_hook(index), with_kwargs=True))
        for tower, layers in (("llm", self.record_llm), ("vision", self.record_vision)):
            for index in layers:
                for role, projection in zip("qkv", a.attention_projections(tower, index)):
                    self._hooks.append(projection.register_forward_hook(self._projection_hook(tower, index, role)))
        if a.vision_layers is not None and (self.vision_sites or self.record_vision):
            for index in self.record_vision:
                self._hooks.append(a.vision_layers[index].register_forward_pre_hook(self._vision_record_hook(index)))
            for index in self.vision_sites:
                if index == 0:
                    self._hooks.append(a.vision_layers[0].register_forward_pre_hook(self._vision_pre_site_hook))
                else:
                    hook = a.vision_layers[index - 1].register_forward_hook(self._vision_site_hook(index), prepend=True)
                    self._hooks.append(hook)
            for index in range(min(self.vision_sites, default=len(a.vision_layers)), len(a.vision_layers)):
                self._hooks.append(a.vision_layers[index].register_forward_pre_hook(self._vision_sizes_hook))
        original = a.core.get_image_features

        @functools.wraps(original)  # generate() reads the signature to pre-encode images
        def get_image_features(*args, **kwargs):
            return self._encode_images(original, args, kwargs)

        a.core.get_image_features = get_image_features

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self.adapter.core.__dict__.pop("get_image_features", None)
        self.state = self.vision_stage = None
        self.records = {}
        self.model.__dict__.pop("_vlmprune_engine", None)

    # -- model-level hooks ----------------------------------------------------------------
    def _on_model(self, module, args, kwargs):
        self._in_forward = True
        inputs = dict(kwargs)
        if args:
            inputs.setdefault("input_ids", args[0])
        cache = find_cache(inputs)
        filled = cache is not None and cache.get_seq_length(self.plan.n_llm_layers - 1) > 0
        # generate() encodes the images first and hands the features (under a release-specific keyword)
        # to the prefill that follows: that prefill is the first forward with an empty cache
        images = inputs.get("pixel_values") is not None
        encoded = not images and not filled and self.vision_stage is not None and self.vision_stage.pending
        if images or encoded:
            if inputs.get("input_ids") is None:
                raise VlmpruneError("token pruning needs input_ids (to find the image tokens), not inputs_embeds")
            self.mode = "prefill"
            self.records = {}
            stage = self.vision_stage if encoded else None
            if stage is not None:
                stage.pending = False
                inputs = {**stage.inputs, **inputs}
            self.state = _ForwardState(inputs=inputs, vision=stage,
                                       method_state=stage.method_state if stage is not None else {})
            self.method.prefill_starts(self.model, inputs)
            self.state.scoring_embedding = self.method.scoring_token(self.model, inputs)
        elif self.state is not None and filled:
            self.mode = "decode"
        else:
            self.mode = "off"
            self.state = None
        return None

    def _after_model(self, module, args, output):
        """Lets go of the prefill's activations; decode steps only need masks and positions."""
        self._in_forward = False
        self.records = {}
        if self.mode == "prefill" and self.state is not None:
            self.state.seq, self.state.built, self.state.full_cos, self.state.full_sin = None, (), None, None

    def _on_llm(self, module, args, kwargs):
        """Keeps the prompt's position ids (prefill) and gives decode steps their original positions."""
        if self.mode == "off":
            return None
        st = self.state
        position_ids = kwargs.get("position_ids")
        embeds = required(kwargs, "inputs_embeds", "the LLM's forward")
        if self.mode == "prefill":
            st.prompt_length = embeds.shape[1]
            if position_ids is None:
                position_ids = torch.arange(embeds.shape[1], device=embeds.device).expand(embeds.shape[0], -1)
            st.prompt_positions = position_ids[-3:] if position_ids.dim() == 3 else position_ids
            return None
        step = embeds.shape[1]
        st.decoded += step
        if position_ids is None:  # the LLM would count the (shorter) first layer's cache
            start = st.prompt_length + st.decoded - step
            kwargs["position_ids"] = torch.arange(start, start + step, device=embeds.device)[None]
            return args, kwargs
        return None

    # -- images and the vision tower --------------------------------------------------------
    def _encode_images(self, original, args, kwargs):
        """Runs ``get_image_features`` with the vision sites armed; after in-encoder pruning the kept
        features go back to their original slots (zeros elsewhere) so the placeholder count holds."""
        in_forward = self._in_forward and self.mode == "prefill"
        stage = _VisionStage(inputs={"pixel_values": args[0] if args else kwargs.get("pixel_values"), **kwargs},
                             method_state=self.state.method_state if in_forward else {}, pending=not in_forward)
        self.vision_stage = stage
        if not in_forward:  # generate() encoding ahead of its prefill: the prefill starts here
            self.method.prefill_starts(self.model, stage.inputs)
        self.records = {key: value for key, value in self.records.items() if key[0] != "vision"}
        self._encoding = True
        try:
            outputs = original(*args, **kwargs)
        finally:
            self._encoding = False
        features = list(outputs.pooler_output)
        counts = self.adapter.image_feature_counts(outputs)
        stage.n_images = len(counts)
        if stage.pruned:
            scattered = [row.new_zeros(stage.n_visual, row.shape[-1]).index_copy(0, kept, row)
                         for row, kept in zip(features, stage.original)]
            outputs.pooler_output = tuple(scattered) if isinstance(outputs.pooler_output, tuple) else scattered
        else:
            if len(set(counts)) != 1:
                raise VlmpruneError(f"images in this batch give different visual-token counts {sorted(set(counts))}: "
                                    "batch images of the same size together")
            stage.n_visual = counts[0]
        if in_forward:
            self.state.vision = stage
        return outputs

    def _vision_sizes_hook(self, module, args):
        """Proportional attention after merges: a token of size s counts s times as a key."""
        sizes = self.vision_stage.sizes if self._encoding else None
        if sizes is None:
            return None
        return (args[0], _size_bias(sizes, args[0].dtype, cls=True)[:, None, None, :], *args[2:])

    def _vision_record_hook(self, index: int):
        def hook(module, args):
            if self._encoding:
                self.records[("vision", index)] = (args[0], {})
        return hook

    def _projection_hook(self, tower: str, index: int, role: str):
        """Keeps a recorded layer's q, k or v projection as the model computes it, so that a scorer
        reads attention without projecting the layer's input again."""
        def hook(module, args, output):
            record = self.records.get((tower, index))
            if record is not None and role not in record[-1] and output.shape[:2] == record[0].shape[:2]:
                record[-1][role] = output
        return hook

    def _vision_pre_site_hook(self, module, args):
        if self._encoding:
            return (self._vision_site(self.vision_sites[0], args[0]), *args[1:])
        return None

    def _vision_site_hook(self, index: int):
        def hook(module, args, output):
            if self._encoding:
                return self._vision_site(self.vision_sites[index], output)
            return None
        return hook

    def _vision_site(self, site: Site, hidden: torch.Tensor) -> torch.Tensor:
        stage = self.vision_stage
        batch, length = hidden.shape[0], hidden.shape[1] - 1
        device = hidden.device
        if stage.original is None:
            stage.n_visual = length
            stage.original = torch.arange(length, device=device).expand(batch, -1)
        visual = torch.arange(1, length + 1, device=device).expand(batch, -1)
        ctx = self._context(site, hidden, visual, stage.original, stage.n_visual, cls=0, query=None,
                            sizes=stage.sizes, tower="vision", inputs=stage.inputs, state=stage.method_state)
        keep, merged, sizes = self._checked(self.method.reduce(ctx), site, length, batch)
        positions = torch.cat([torch.zeros(batch, 1, dtype=torch.long, device=device), keep + 1], dim=1)
        hidden = _gather(hidden, positions)
        if merged is not None:
            hidden = torch.cat([hidden[:, :1], merged.to(hidden.dtype)], dim=1)
        stage.original = stage.original.gather(1, keep)
        if sizes is None and stage.sizes is not None:
            sizes = stage.sizes.gather(1, keep)
        stage.sizes = sizes
        stage.pruned = True
        self.records = {key: value for key, value in self.records.items() if key[0] != "vision"}
        return hidden

    # -- LLM layers -------------------------------------------------------------------------
    def _llm_layer_hook(self, index: int):
        def hook(module, args, kwargs):
            if self.mode == "off":
                return None
            hidden = layer_hidden(args, kwargs)
            if self.mode == "prefill":
                hidden, mask, cos, sin = self._prefill_layer(index, hidden, kwargs)
            else:
                mask, cos, sin = self._decode_layer(index, hidden, args, kwargs)
            kwargs = {**kwargs, "attention_mask": mask, "position_embeddings": (cos, sin), "position_ids": None}
            if args:
                return (hidden, *args[1:]), kwargs
            kwargs["hidden_states"] = hidden
            return args, kwargs
        return hook

    def _start_sequence(self, hidden: torch.Tensor, kwargs: dict) -> _Sequence:
        st = self.state
        stage = st.vision
        batch, length = hidden.shape[:2]
        device = hidden.device
        if stage is None or stage.n_images == 0 or batch % stage.n_images:
            raise VlmpruneError(f"token pruning supports one image per sample; got "
                                f"{0 if stage is None else stage.n_images} images for {batch} samples")
        copies = batch // stage.n_images    # generate(num_beams=..., num_return_sequences=...) repeats samples
        cos, sin = required(kwargs, "position_embeddings", "a decoder layer's forward")
        st.full_cos, st.full_sin = cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)
        index = torch.arange(length, device=device).expand(batch, -1)
        mask = st.inputs.get("attention_mask")
        valid = torch.ones_like(index, dtype=torch.bool) if mask is None else mask.to(device=device, dtype=torch.bool)
        is_visual = self.adapter.image_token_mask(st.inputs["input_ids"].to(device))
        if not is_visual.is_meta and not bool((is_visual.sum(1) == stage.n_visual).all()):
            raise VlmpruneError(f"every sample needs exactly {stage.n_visual} image tokens (one image each); "
                                "put text-only prompts in a separate batch")
        visual = _first_true(is_visual, stage.n_visual)
        original = torch.arange(stage.n_visual, device=device).expand(batch, -1)
        st.dropped_before = torch.zeros(batch, length, dtype=torch.long, device=device)
        seq = _Sequence(hidden, index, 2 * index, valid, is_visual, visual, original)
        if stage.pruned:  # encoder token sizes stay in the encoder: the LLM attends to merged tokens plainly
            seq = self._keep_visual(seq, stage.original.to(device).repeat_interleave(copies, 0), None, None)
        if st.scoring_embedding is not None:
            seq = self._insert_scoring(seq, st.scoring_embedding)
        return seq

    def _prefill_layer(self, index: int, hidden: torch.Tensor, kwargs: dict):
        st = self.state
        if index == 0:
            st.seq = self._start_sequence(hidden, kwargs)
        seq = st.seq
        seq.hidden = hidden if index > 0 else seq.hidden
        if index in self.llm_sites:
            seq = self._llm_site(self.llm_sites[index], seq)
        if seq.scoring is not None and index >= self.last_llm_site and not self.method.scoring_token_is_real():
            seq = self._drop_scoring(seq)
        # plain causal: the model found no padding (its own mask is None) and no key is masked or biased
        plain = kwargs.get("attention_mask") is None and seq.sizes is None and (
            seq.scoring is None or self.method.scoring_token_is_real())
        if seq is not st.seq or index == 0:  # layers between sites share one mask and one cos/sin
            mask = None if plain else self._mask(seq.order, seq.order, seq.valid, seq.hidden.dtype,
                                                 self._key_bias(seq), query_index=self._positions(seq))
            st.built = (mask, *self._rotary(seq))
        st.seq = seq
        mask, cos, sin = st.built
        st.layer_shift[index] = st.dropped_before.gather(1, seq.src[:, -1:]).squeeze(1)
        if index in self.record_llm:
            self.records[("llm", index)] = (seq.hidden, cos, sin, (seq.order, seq.valid, self._key_bias(seq)), {})
        st.layer_keys[index] = (seq.valid, self._key_bias(seq), plain)
        return seq.hidden, mask, cos, sin

    def _decode_layer(self, index: int, hidden: torch.Tensor, args: tuple, kwargs: dict):
        st = self.state
        cache = find_cache(kwargs, args)
        if cache is None:
            raise VlmpruneError("decode steps after a pruned prefill need the KV cache (use_cache=True)")
        step = hidden.shape[1]
        prefix, prefix_bias, plain = st.layer_keys[index]
        cos, sin = required(kwargs, "position_embeddings", "a decoder layer's forward")
        if self.positions == "compact":
            cos, sin = self._compact_decode_rotary(index, hidden, kwargs)
        if plain and step == 1 and kwargs.get("attention_mask") is None:  # one new query sees every key
            return None, cos, sin
        past = cache.get_seq_length(index)
        generated = past - prefix.shape[1] + step
        device = hidden.device
        keys = torch.cat([prefix, torch.ones(prefix.shape[0], generated, dtype=torch.bool, device=device)], dim=1)
        key_order = torch.cat([torch.zeros_like(prefix, dtype=torch.long),
                               torch.arange(1, generated + 1, device=device).expand(prefix.shape[0], -1)], dim=1)
        query_order = torch.arange(generated - step + 1, generated + 1, device=device).expand(prefix.shape[0], -1)
        bias = None if prefix_bias is None else torch.cat([prefix_bias, prefix_bias.new_zeros(prefix.shape[0], generated)], 1)
        return self._mask(query_order, key_order, keys, hidden.dtype, bias), cos, sin

    @staticmethod
    def _mask(query_order, key_order, key_valid, dtype, key_bias=None, query_index=None) -> torch.Tensor:
        """(B, 1, Q, K) additive mask: a query sees valid keys of lower or equal order, and itself
        when ``query_index`` (B, Q) says which key it is; ``key_bias`` (B, K) is added where it sees."""
        allowed = (key_order[:, None, :] <= query_order[:, :, None]) & key_valid[:, None, :]
        if query_index is not None:
            keys = torch.arange(key_order.shape[1], device=allowed.device)
            allowed = allowed | (keys[None, None, :] == query_index[:, :, None])
        seen = torch.zeros((), dtype=dtype, device=allowed.device) if key_bias is None else key_bias[:, None, :]
        return torch.where(allowed, seen, torch.finfo(dtype).min)[:, None]

    @staticmethod
    def _positions(seq: _Sequence) -> torch.Tensor:
        """(B, N) 0..N-1: every token's own position in the current sequence."""
        return torch.arange(seq.src.shape[1], device=seq.src.device).expand(seq.src.shape[0], -1)

    @staticmethod
    def _key_bias(seq: _Sequence) -> torch.Tensor | None:
        """(B, N) log-size bias of merged visual tokens, or None when nothing was merged."""
        if seq.sizes is None:
            return None
        zeros = torch.zeros(seq.src.shape, dtype=seq.hidden.dtype, device=seq.hidden.device)
        return zeros.scatter(1, seq.visual, _size_bias(seq.sizes, seq.hidden.dtype))

    # -- positions ---------------------------------------------------------------------------
    def _rotary(self, seq: _Sequence):
        st = self.state
        if self.positions == "original":
            return _gather(st.full_cos, seq.src), _gather(st.full_sin, seq.src)
        shift = st.dropped_before.gather(1, seq.src)
        prompt = st.prompt_positions
        if prompt.dim() == 3:
            positions = prompt.gather(2, seq.src.expand(3, -1, -1)) - shift
        else:
            positions = prompt.expand(seq.src.shape[0], -1).gather(1, seq.src) - shift
        return self.adapter.llm_rotary(seq.hidden, positions)

    def _compact_decode_rotary(self, index: int, hidden: torch.Tensor, kwargs: dict):
        """Decode positions moved down by the prompt tokens this layer no longer holds."""
        st = self.state
        batch, step = hidden.shape[:2]
        shift = st.layer_shift[index]
        new = torch.arange(st.decoded - step, st.decoded, device=hidden.device)
        if st.prompt_positions.dim() == 3:  # mRoPE: text after the prompt advances all three axes together
            last = st.prompt_positions[..., -1:].amax(0)
            positions = (last + 1 + new - shift[:, None])[None].expand(3, -1, -1)
        else:
            positions = kwargs.get("position_ids")
            if positions is None:
                positions = st.prompt_length + new[None]
            positions = positions.expand(batch, -1) - shift[:, None]
        return self.adapter.llm_rotary(hidden, positions)

    # -- sequence surgery --------------------------------------------------------------------
    def _checked(self, reduction: Reduction, site: Site, n_current: int, batch: int):
        """Sorted keep indices (and matching merged states / sizes), after shape checks."""
        if not isinstance(reduction, Reduction) or reduction.keep.dim() != 2 or reduction.keep.shape[0] != batch:
            raise VlmpruneError(f"{self.method.name} at {site}: reduce() must return Reduction(keep=(B, k) indices)")
        if not 1 <= reduction.keep.shape[1] <= n_current:
            raise VlmpruneError(f"{self.method.name} at {site}: keeps {reduction.keep.shape[1]} of {n_current} "
                                "visual tokens; keep must be between 1 and the tokens present")
        keep, order = torch.sort(reduction.keep.long(), dim=1)
        merged = None if reduction.hidden is None else _gather(reduction.hidden, order)
        sizes = None if reduction.sizes is None else reduction.sizes.gather(1, order)
        return keep, merged, sizes

    def _keep_visual(self, seq: _Sequence, keep: torch.Tensor, merged, sizes) -> _Sequence:
        """Keep the visual tokens at (B, k) sorted indices into ``seq.visual``; text stays."""
        batch, n = seq.src.shape
        n_visual, k = seq.visual.shape[1], keep.shape[1]
        kept = (~seq.is_visual).scatter(1, seq.visual.gather(1, keep), True)
        index = _first_true(kept, n - n_visual + k)
        self.state.dropped_before = self._dropped_prompt(seq, index)
        is_visual = seq.is_visual.gather(1, index)
        visual = _first_true(is_visual, k)
        hidden = _gather(seq.hidden, index)
        if merged is not None:
            hidden = hidden.scatter(1, visual[..., None].expand(-1, -1, hidden.shape[-1]), merged.to(hidden.dtype))
        scoring = None
        if seq.scoring is not None:
            scoring = _first_true(index == seq.scoring[:, None], 1).squeeze(1)
        return _Sequence(hidden, seq.src.gather(1, index), seq.order.gather(1, index), seq.valid.gather(1, index),
                         is_visual, visual, seq.original.gather(1, keep), sizes, scoring)

    def _dropped_prompt(self, seq: _Sequence, index: torch.Tensor) -> torch.Tensor:
        """(B, L) number of prompt tokens dropped before each prompt token, after keeping ``index``."""
        st = self.state
        absent = torch.zeros(seq.src.shape[0], st.prompt_length, dtype=torch.bool, device=seq.src.device)
        src = seq.src.gather(1, index)
        real = seq.order.gather(1, index) % 2 == 0
        present = absent.scatter(1, torch.where(real, src, src[:, :1]), True)
        missing = (~present).long()
        return torch.cumsum(missing, dim=1) - missing

    def _insert_scoring(self, seq: _Sequence, embedding: torch.Tensor) -> _Sequence:
        """Put the scoring token right after the last visual token, at the first text token's
        position; masked as a key for everyone else unless the method makes it a real token."""
        batch, n = seq.src.shape
        device = seq.src.device
        at = seq.visual[:, -1] + 1                                           # (B,)
        slots = torch.arange(n + 1, device=device).expand(batch, -1)
        source = torch.where(slots < at[:, None], slots, slots - 1).clamp(max=n - 1)
        is_new = slots == at[:, None]
        hidden = _gather(seq.hidden, source)
        hidden = torch.where(is_new[..., None], embedding[:, None, :].to(hidden.dtype), hidden)
        first_text = seq.src.gather(1, at.clamp(max=n - 1)[:, None])                 # its rotary position
        src = torch.where(is_new, first_text, seq.src.gather(1, source))
        order = torch.where(is_new, seq.order.gather(1, (at - 1)[:, None]) + 1, seq.order.gather(1, source))
        valid = seq.valid.gather(1, source) & (~is_new | self.method.scoring_token_is_real())
        is_visual = seq.is_visual.gather(1, source) & ~is_new
        visual = _first_true(is_visual, seq.visual.shape[1])
        return _Sequence(hidden, src, order, valid, is_visual, visual, seq.original, seq.sizes, at)

    def _drop_scoring(self, seq: _Sequence) -> _Sequence:
        batch, n = seq.src.shape
        index = _first_true(torch.arange(n, device=seq.src.device)[None] != seq.scoring[:, None], n - 1)
        is_visual = seq.is_visual.gather(1, index)
        return _Sequence(_gather(seq.hidden, index), seq.src.gather(1, index), seq.order.gather(1, index),
                         seq.valid.gather(1, index), is_visual, _first_true(is_visual, seq.visual.shape[1]),
                         seq.original, seq.sizes, None)

    def _llm_site(self, site: Site, seq: _Sequence) -> _Sequence:
        st = self.state
        batch, n = seq.src.shape
        if seq.scoring is not None:
            query = seq.scoring
        else:  # the last real prompt token (text is never pruned)
            query = n - 1 - torch.argmax(seq.valid.flip(1).to(torch.int8), dim=1)
        ctx = self._context(site, seq.hidden, seq.visual, seq.original, st.vision.n_visual, cls=None, query=query,
                            sizes=seq.sizes, tower="llm", inputs=st.inputs, state=st.method_state)
        keep, merged, sizes = self._checked(self.method.reduce(ctx), site, seq.visual.shape[1], batch)
        if sizes is None and seq.sizes is not None:
            sizes = seq.sizes.gather(1, keep)
        self.records = {key: value for key, value in self.records.items() if key[0] != "llm"}
        return self._keep_visual(seq, keep, merged, sizes)

    # -- what a method reads -------------------------------------------------------------------
    def _context(self, site, hidden, visual, original, n_visual, cls, query, sizes, tower, inputs,
                 state) -> SiteContext:
        records = self.records

        def recorded(layer: int):
            if (tower, layer) not in records:
                raise VlmpruneError(f"{self.method.name}: {tower} layer {layer} was not recorded before {site}; "
                                    "list it in recorded_layers()")
            return records[(tower, layer)]

        @functools.cache  # attention and values of one layer share its heads
        @torch.no_grad()  # scores only choose tokens; a graph of them would outlive the step in training
        def heads(layer: int):
            record = recorded(layer)
            captured = record[-1]
            projected = tuple(captured[role] for role in "qkv") if len(captured) == 3 else None
            if tower == "vision":
                bias = None if sizes is None else _size_bias(sizes, record[0].dtype, cls=True)[:, None, None, :]
                return (*_detached(self.adapter.vision_qkv(layer, record[0], projected)), bias)
            return (*_detached(self.adapter.llm_qkv(layer, record[0], record[1], record[2], projected)), record[3])

        def attention(layer: int, rows: torch.Tensor | None = None) -> torch.Tensor:
            """Only the query ``rows`` are scored; an LLM layer's mask is built for those rows alone.
            A full map is scored in blocks of rows, so the per-head scores never exceed
            :data:`SCORE_BLOCK` floats (a 32-head map of 3000 tokens would be 1.2 GB at once). An LLM
            sequence is in causal order, so a block of a full map sees no key past its last row:
            those scores are not computed (half of a causal map's)."""
            q, k, _, _, scale, mask = heads(layer)
            batch, n_heads, n_keys = q.shape[0], q.shape[1], k.shape[2]
            if rows is not None:
                rows = rows.view(batch, -1)
                q = q.gather(2, rows[:, None, :, None].expand(-1, n_heads, -1, q.shape[-1]))
                return head_mean_probabilities(q, k, scale, mask, rows, n_keys)
            rows = torch.arange(q.shape[2], device=q.device).expand(batch, -1)
            block = max(1, SCORE_BLOCK // (batch * n_heads * n_keys))
            return torch.cat([head_mean_probabilities(q[:, :, start:start + block], k, scale, mask,
                                                      rows[:, start:start + block],
                                                      min(n_keys, start + block) if tower == "llm" else n_keys)
                              for start in range(0, rows.shape[1], block)], dim=1)

        def head_mean_probabilities(q, k, scale, mask, rows, seen):
            """Head-mean probabilities of these query rows over the first ``seen`` keys, zeros after."""
            n_keys = k.shape[2]
            if tower == "llm":
                order, valid, bias = mask
                k = k[:, :, :seen]
                mask = self._mask(order.gather(1, rows), order[:, :seen], valid[:, :seen], q.dtype,
                                  None if bias is None else bias[:, :seen], query_index=rows)
            # the scale folded into the query rows, then the float scores masked and normalised in
            # place (the fastest order measured on the CPU: heads x rows x N floats are the cost)
            scores = ((q * scale) @ k.transpose(-1, -2)).float()
            if mask is not None:
                scores.add_(mask)
            probabilities = torch.softmax(scores, dim=-1, out=scores).mean(dim=1)
            return probabilities if seen == n_keys else torch.nn.functional.pad(probabilities, (0, n_keys - seen))

        def flat(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.transpose(1, 2).flatten(2)

        return SiteContext(site=site, hidden=hidden, visual=visual, original=original, n_visual=n_visual,
                           cls=cls, query=query, attention=attention, values=lambda layer: flat(heads(layer)[2]),
                           keys=lambda layer: flat(heads(layer)[3]), inputs=inputs, state=state,
                           sizes=sizes, adapter=self.adapter)
