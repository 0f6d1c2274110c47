"""FLOPs of one prefill by part (vision, projector, llm, extra, total), two ways.

Convention (METHODS.md section 4): 2 FLOPs per multiply-add, every matmul, attention scores and
mixing counted in full (L x L, causal masking not discounted), SwiGLU as three matrices. Norms,
activations, softmax and embedding look-ups are not counted. The LM head counts, over every prompt
position a forward scores (a plain forward returns logits for all of them): with it, LLaVA-1.5-13B at
576 visual + 128 text tokens comes to 18.9e12, 2.5% under IVTP's 19.4e12 (18.7e12 without it).

* :func:`analytic_flops` prices a :class:`TokenSchedule` (the sequence length at every layer) with
  closed formulas per family.
* :func:`count_flops` runs the real ``transformers`` model on the ``meta`` device (no weights) under
  ``torch.utils.flop_counter.FlopCounterMode`` and attributes the counted FLOPs to parts by hooks on
  the part modules (the model adapter says which module is which; see :class:`_PartMeter`). With a token method attached, the schedule is read
  from the shapes the layers actually receive, so savings are measured, not assumed.

``extra`` is the cost of scoring. Counted: every FLOP spent inside the method's ``reduce`` (and its
scoring token), taken out of the part it ran in. Analytic: the engine's attention reads the method
made (noted during the counted forward): each read recomputes the q/k/v projections of the read
layer's sequence, and an attention read adds the scores of the rows it asks for; work a method adds
on top (rollout products, similarity matrices, merging) shows only in the counted value.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..models import get_adapter
from ..models.forward_args import layer_hidden
from ..models.presets import Preset
from ..tokens.base import SiteContext, TokenMethod
from .latency import last_logits_only
from .meta import ShapeOnlyMode, build_meta_model, counting_inputs

PARTS = ("vision", "projector", "llm", "extra", "total")


@dataclass
class Flops:
    """FLOPs by part; ``total`` is their sum."""

    vision: int = 0
    projector: int = 0
    llm: int = 0
    extra: int = 0

    @property
    def total(self) -> int:
        return self.vision + self.projector + self.llm + self.extra

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


@dataclass
class ScoringStep:
    """One read of a recorded layer by a pruning site: its tower, the layer's sequence length (per
    crop), and the query rows scored (``None``: all rows; 0: keys or values only)."""

    tower: str
    length: int
    rows: int | None


@dataclass
class TokenSchedule:
    """Sequence lengths one prefill runs at: what a token method changes.

    ``vision``: tower length per crop at the input of each vision layer; ``crops``: images encoded;
    ``projector``: feature rows entering the projector (Qwen: patches before the 2x2 merge);
    ``llm``: sequence length at the input of each decoder layer; ``head``: positions the LM head
    scores; ``scoring``: the attention reads of the pruning sites.
    """

    vision: list[int]
    crops: int
    projector: int
    llm: list[int]
    head: int
    scoring: list[ScoringStep] = field(default_factory=list)


def dense_schedule(preset: Preset, text_tokens: int) -> TokenSchedule:
    """The schedule with no token method: every layer sees every token."""
    config, geometry = preset.config, preset.geometry
    sequence = geometry.llm_tokens + text_tokens
    return TokenSchedule(vision=[geometry.tower_tokens] * _vision_depth(config), crops=geometry.crops,
                         projector=geometry.projector_tokens,
                         llm=[sequence] * config.text_config.num_hidden_layers, head=sequence)


def _vision_depth(config) -> int:
    vision = config.vision_config
    return vision.depth if config.model_type in ("qwen2_vl", "qwen2_5_vl") else vision.num_hidden_layers


# -- analytic -----------------------------------------------------------------------------------

def analytic_flops(preset: Preset, text_tokens: int, schedule: TokenSchedule | None = None) -> Flops:
    """Closed-form FLOPs of one prefill at ``schedule`` (dense when ``None``)."""
    schedule = schedule or dense_schedule(preset, text_tokens)
    config = preset.config
    text = config.text_config
    qwen = config.model_type in ("qwen2_vl", "qwen2_5_vl")
    vision = _qwen_vision(preset, schedule) if qwen else _clip_vision(config, schedule)
    return Flops(vision=vision, projector=_projector(config, schedule.projector),
                 llm=sum(_decoder_layer(text, n) for n in schedule.llm)
                 + 2 * schedule.head * text.hidden_size * text.vocab_size,
                 extra=sum(_scoring(config, step) for step in schedule.scoring))


def attention_widths(text) -> tuple[int, int, int]:
    """(model width, query width H*d, key/value width KV*d) of a decoder's attention."""
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = text.num_key_value_heads or text.num_attention_heads
    return text.hidden_size, text.num_attention_heads * head_dim, kv_heads * head_dim


def _decoder_layer(text, n: int) -> int:
    """Llama/Qwen2 block: q, k, v, o projections, L x L scores and mixing, SwiGLU (three matrices)."""
    width, q_width, kv_width = attention_widths(text)
    projections = 2 * n * width * (2 * q_width + 2 * kv_width)
    attention = 4 * n * n * q_width
    return projections + attention + 6 * n * width * text.intermediate_size


def _encoder_layer(n: int, width: int, mlp: int, mlp_matrices: int = 2, attention_pairs: int | None = None) -> int:
    """ViT block: four width x width projections, scores and mixing over ``attention_pairs`` query-key
    pairs (n * n for full attention), and an MLP of ``mlp_matrices`` width x mlp matrices."""
    pairs = n * n if attention_pairs is None else attention_pairs
    return 8 * n * width * width + 4 * pairs * width + 2 * mlp_matrices * n * width * mlp


def _clip_vision(config, schedule: TokenSchedule) -> int:
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    embed = 2 * patches * vision.hidden_size * vision.num_channels * vision.patch_size ** 2
    layers = sum(_encoder_layer(n, vision.hidden_size, vision.intermediate_size) for n in schedule.vision)
    head = _siglip_pooling_head(vision, schedule.vision[-1]) if getattr(vision, "vision_use_head", False) else 0
    return schedule.crops * (embed + layers + head)


def _siglip_pooling_head(vision, n: int) -> int:
    """SigLIP's attention-pooling head (when enabled): one probe query over ``n`` keys, then an MLP."""
    width = vision.hidden_size
    projections = 2 * width * width * (1 + 2 * n + 1)   # probe query, keys and values, output
    return projections + 4 * n * width + 4 * width * vision.intermediate_size


def _qwen_vision(preset: Preset, schedule: TokenSchedule) -> int:
    config = preset.config
    vision = config.vision_config
    width = vision.embed_dim if config.model_type == "qwen2_vl" else vision.hidden_size
    patches = schedule.vision[0]
    embed = 2 * patches * width * vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    if config.model_type == "qwen2_vl":
        layers = sum(_encoder_layer(n, width, vision.mlp_ratio * width) for n in schedule.vision)
        return embed + layers
    windowed = _window_pairs(vision, preset.geometry.patch_grid)
    layers = sum(_encoder_layer(n, width, vision.intermediate_size, mlp_matrices=3,
                                attention_pairs=None if index in vision.fullatt_block_indexes else windowed)
                 for index, n in enumerate(schedule.vision))
    return embed + layers


def _window_pairs(vision, grid: tuple[int, int]) -> int:
    """Query-key pairs of Qwen2.5-VL's windowed attention: square windows of merged 2x2 units,
    tiled from the top-left corner; edge windows are cut short."""
    merge = vision.spatial_merge_size
    side = vision.window_size // merge // vision.patch_size
    rows, cols = grid[0] // merge, grid[1] // merge
    pairs = 0
    for top in range(0, rows, side):
        for left in range(0, cols, side):
            tokens = min(side, rows - top) * min(side, cols - left) * merge * merge
            pairs += tokens * tokens
    return pairs


def _projector(config, rows: int) -> int:
    """LLaVA's two-layer MLP projector, or Qwen's merger (a two-layer MLP on 2x2-merged patches)."""
    text_width = config.text_config.hidden_size
    vision = config.vision_config
    if config.model_type in ("qwen2_vl", "qwen2_5_vl"):
        width = vision.embed_dim if config.model_type == "qwen2_vl" else vision.hidden_size
        out = vision.hidden_size if config.model_type == "qwen2_vl" else vision.out_hidden_size
        merged_width = width * vision.spatial_merge_size ** 2
        merged = rows // vision.spatial_merge_size ** 2
        return 2 * merged * merged_width * (merged_width + out)
    return 2 * rows * (vision.hidden_size * text_width + text_width * text_width)


def _scoring(config, step: ScoringStep) -> int:
    """The engine's attention read at one recorded layer (see the module docstring)."""
    n = step.length
    if step.tower == "vision":
        width = config.vision_config.hidden_size
        return 6 * n * width * width + 2 * n * (n if step.rows is None else step.rows) * width
    width, q_width, kv_width = attention_widths(config.text_config)
    rows = n if step.rows is None else step.rows
    return 2 * n * width * (q_width + 2 * kv_width) + 2 * rows * n * q_width


# -- counted ------------------------------------------------------------------------------------

@dataclass
class CountedFlops:
    """FLOPs counted on the meta-device model, and the token schedule that forward ran at."""

    flops: Flops
    schedule: TokenSchedule


def count_flops(preset: Preset, text_tokens: int, method: TokenMethod | None = None,
                last_logits: bool = False) -> CountedFlops:
    """Run one prefill of ``preset`` on the meta device under ``FlopCounterMode``, with ``method``
    attached through ``vlmprune.tokens.apply``, and split the count by part. ``last_logits``: the
    forward scores the last position only, as ``generate``'s prefill and
    :func:`vlmprune.measure.latency.prefill_ms` do (the LM head then counts one position)."""
    from .. import tokens  # the engine imports the adapters; kept lazy so analytic use stays light

    model = build_meta_model(preset)
    adapter = get_adapter(model)
    handle = tokens.apply(model, method) if method is not None else None
    recorder = _ScheduleRecorder(model, adapter)  # after the engine's hooks: it sees pruned inputs
    meter = _ScoringMeter(method) if method is not None else None
    inputs = counting_inputs(preset, text_tokens)
    counter = FlopCounterMode(display=False)
    part_meter = _PartMeter(counter, adapter)
    try:
        with counter, ShapeOnlyMode(), torch.no_grad():
            if meter is not None:
                meter.attach(part_meter.counts)
            model(**inputs, **(last_logits_only(model) if last_logits else {}))
    finally:
        recorder.remove()
        part_meter.remove()
        if handle is not None:
            handle.remove()
        if meter is not None:
            meter.detach()
    parts = part_meter.counts()
    spent = meter.spent if meter is not None else {}
    # work outside the three part modules (none in a dense forward) is pruning overhead: extra
    flops = Flops(vision=parts["vision"] - spent.get("vision", 0),
                  projector=parts["projector"] - spent.get("projector", 0),
                  llm=parts["llm"] - spent.get("llm", 0),
                  extra=spent.get("global", 0) - spent.get("outside", 0) + parts["outside"])
    schedule = recorder.schedule(preset, meter.steps(recorder) if meter is not None else [])
    return CountedFlops(flops, schedule)


class _PartMeter:
    """FLOPs by part from the counter's running total (``get_total_flops``), read when each part module
    of the model is entered and left. Attribution by module *name* (the counter's own) breaks when
    another model with the same class and module names runs inside the forward (a small guide model):
    its modules' exits drop the large model's names from the counter's stack. Hooks on the module
    objects themselves cannot be confused. A part nested in another (a projector inside the vision
    tower) counts for itself only."""

    def __init__(self, counter: FlopCounterMode, adapter):
        self._total = counter.get_total_flops
        modules = {"vision": adapter.vision_tower, "projector": adapter.projector, "llm": adapter.llm,
                   "head": adapter.lm_head}
        self._done = dict.fromkeys(modules, 0)
        self._open: list[list] = []          # [part, total at entry, FLOPs of finished nested parts]
        self._hooks = []
        for part, module in modules.items():
            self._hooks.append(module.register_forward_pre_hook(lambda *_, part=part: self._enter(part)))
            self._hooks.append(module.register_forward_hook(lambda *_: self._leave()))

    def _enter(self, part: str) -> None:
        self._open.append([part, self._total(), 0])

    def _leave(self) -> None:
        part, entry, nested = self._open.pop()
        elapsed = self._total() - entry
        self._done[part] += elapsed - nested
        if self._open:
            self._open[-1][2] += elapsed

    def counts(self) -> dict[str, int]:
        """Counted FLOPs so far per part (open parts included up to now), ``global`` and ``outside``."""
        now = self._total()
        done = dict(self._done)
        for i, (part, entry, nested) in enumerate(self._open):
            inner = now - self._open[i + 1][1] if i + 1 < len(self._open) else 0
            done[part] += now - entry - nested - inner
        parts = {"vision": done["vision"], "projector": done["projector"], "llm": done["llm"] + done["head"],
                 "global": int(now)}
        parts["outside"] = parts["global"] - parts["vision"] - parts["projector"] - parts["llm"]
        return parts

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


class _ScheduleRecorder:
    """Forward pre-hooks that note the sequence length each layer, the projector and the LM head receive."""

    def __init__(self, model: nn.Module, adapter):
        self.vision: list[tuple[int, int]] = []     # (crops, length) per vision layer call
        self.llm: list[int] = []
        self.projector = 0
        self.head = 0
        self._hooks = [layer.register_forward_pre_hook(self._on_llm, with_kwargs=True) for layer in adapter.llm_layers]
        for layer in adapter.vision_layers or []:
            self._hooks.append(layer.register_forward_pre_hook(self._on_vision, with_kwargs=True))
        self._hooks.append(adapter.projector.register_forward_pre_hook(self._on_projector, with_kwargs=True))
        self._hooks.append(adapter.lm_head.register_forward_pre_hook(self._on_head, with_kwargs=True))

    def _on_llm(self, module, args, kwargs):
        self.llm.append(layer_hidden(args, kwargs).shape[1])

    def _on_vision(self, module, args, kwargs):
        hidden = layer_hidden(args, kwargs)
        self.vision.append((hidden.shape[0], hidden.shape[1]))

    def _on_projector(self, module, args, kwargs):
        self.projector += layer_hidden(args, kwargs).shape[:-1].numel()

    def _on_head(self, module, args, kwargs):
        self.head += layer_hidden(args, kwargs).shape[1]

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()

    def schedule(self, preset: Preset, scoring: list[ScoringStep]) -> TokenSchedule:
        dense = dense_schedule(preset, 1)
        if self.vision:
            crops = self.vision[0][0]
            vision = [length for _, length in self.vision]
        else:  # towers without in-encoder sites always run every patch
            crops, vision = dense.crops, dense.vision
        return TokenSchedule(vision=vision, crops=crops, projector=self.projector, llm=list(self.llm),
                             head=self.head, scoring=scoring)


class _ScoringMeter:
    """Wraps the method's ``reduce`` and ``scoring_token`` to measure the FLOPs spent scoring, by part,
    and notes every attention, key and value read a site makes (the analytic price of scoring)."""

    _wrapped = ("reduce", "scoring_token")

    def __init__(self, method: TokenMethod):
        self.method = method
        self.spent: dict[str, int] = {}
        self.reads: list[tuple[str, int, int | None]] = []    # (tower, layer, query rows or None)

    def attach(self, snapshot) -> None:
        for name in self._wrapped:
            setattr(self.method, name, self._metered(getattr(self.method, name), snapshot))

    def _metered(self, original, snapshot):
        def metered(*args, **kwargs):
            if args and isinstance(args[0], SiteContext):
                self._watch_reads(args[0])
            before = snapshot()
            result = original(*args, **kwargs)
            after = snapshot()
            for part, value in after.items():
                self.spent[part] = self.spent.get(part, 0) + value - before[part]
            return result
        return metered

    def _watch_reads(self, ctx: SiteContext) -> None:
        tower = ctx.site.where
        attention, values, keys = ctx.attention, ctx.values, ctx.keys

        def read_attention(layer, rows=None):
            self.reads.append((tower, layer, None if rows is None else rows.numel() // rows.shape[0]))
            return attention(layer, rows)

        def read(getter):
            def reader(layer):
                self.reads.append((tower, layer, 0))
                return getter(layer)
            return reader

        ctx.attention, ctx.values, ctx.keys = read_attention, read(values), read(keys)

    def detach(self) -> None:
        for name in self._wrapped:
            self.method.__dict__.pop(name, None)

    def steps(self, recorder: _ScheduleRecorder) -> list[ScoringStep]:
        """The reads priced at the recorded layers' sequence lengths."""
        return [ScoringStep(tower, recorder.vision[layer][1] if tower == "vision" else recorder.llm[layer], rows)
                for tower, layer, rows in self.reads]
