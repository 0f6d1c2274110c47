"""IVTP: group-wise token pruning (GTP) in the vision encoder, then instruction-guided GTP in the LLM.

Vision stage: after every ``group`` encoder layers up to the one the LLM reads, the [CLS] row of the
group's combined attention (residual rollout by default) times each patch's value norm ranks the
patches (ATS significance); [CLS] is never pruned.

LLM stage: a pseudo-[CLS] (the mean LLM input embedding of the instruction tokens that CLIP finds
visually relevant) is inserted after the visual tokens as a scoring-only token; in the first
``llm_layers`` LLM layers, in groups of ``llm_group``, its rollout row ranks the visual tokens.

Budget (2n rule): for a final ``n`` below ``threshold`` the ViT goes to ``2n`` and the LLM to ``n``;
otherwise every step removes the same number. LLaVA-1.5's numbers (128 of 576 tokens, 12 of 32
layers) are scaled with the model by default.

Decisions: the image embedding ``x_cls^V`` of Eq. 6 is the [CLS] the (pruned) tower produces, run
through the CLIP vision layers after the feature layer, ``post_layernorm`` and ``visual_projection``;
so the CLIP model must be the tower's CLIP: unless one is given, the family's text companion
(:mod:`vlmprune.models.companions`) is loaded. The pseudo-[CLS] is written into the tensor
:meth:`scoring_token` returned once both the instruction and the last vision site have been seen
(the engine inserts it at the first LLM layer, after both). ``ott+rt`` (no CLIP text encoder) scores each text token by
the cosine of its LLM input embedding to the projected visual [CLS]. ``pcls=clip`` maps the mean
projected CLIP text embedding back to the tower width by the pseudo-inverse of
``visual_projection`` and through the LLaVA projector. Towers without [CLS] (SigLIP, Qwen2-VL) or
without in-encoder sites get no vision stage; the whole budget goes to the LLM stage and the
pseudo-[CLS] is the mean of all instruction tokens (OTT, with a notice), as there is no visual [CLS]
to score by.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F

from ...errors import VlmpruneError
from ..base import ModelPlan, Reduction, Site, SiteContext, TokenMethod
from .. import scorers
from ..text_relevance import clip_token_embeddings

INSTRUCTIONS = ("ott", "ott+rt", "ott+te+rt")
PSEUDO_CLS = ("llm", "clip", "hybrid", "visual")
BUDGETS = ("2n", "equal")
# what a chat template's generation prompt decodes to, whitespace removed, lower case (LLaVA, Qwen)
ASSISTANT_MARKERS = ("assistant:", "assistant")
# LLaVA-1.5's settings, scaled with the model: 128 of 576 visual tokens, 12 of 32 LLM layers.
LLAVA_THRESHOLD = 128 / 576
LLAVA_LLM_DEPTH = 12 / 32
TAU_CLIP = 0.2  # the paper's threshold for real CLIP
TAU_TOY_CLIP = -0.11  # calibrated on the toy CLIP (benchmarks/token_results.py --part calibrate): see docs/results/tokens.md
TAU_NO_TEXT_ENCODER = 0.0


class IVTP(TokenMethod):
    """``ivtp:keep=16``. Settings, with their defaults:

    * ``group=3``: vision layers per pruning group (an int or ``all``); ``rollout=residual`` (also
      layer, group-mean, mean, max, multiply).
    * ``budget=2n``: how the visual tokens are shared between the stages. ``2n``: below ``threshold``
      (default 128/576 of the visual tokens) the ViT goes to 2n and the LLM to n, else equal steps;
      ``equal``: every pruning step of both stages removes the same number (on toy-large at 11%:
      ``2n`` is 100 -> 61 -> 22 in the ViT, 22 -> 11 in the LLM; ``equal`` is 100 -> 70 -> 40 -> 11).
    * ``llm_layers`` (default: 12/32 of the LLM's layers, at least ``llm_group``; 3 on toy-large) and
      ``llm_group=3``: the instruction stage prunes at the input of layers ``llm_group, 2 llm_group,
      ...`` up to ``llm_layers``; with one group, ``llm_layers`` is the one layer it prunes at.
    * ``instruction=ott+te+rt`` (also ott, ott+rt): which text tokens make the pseudo-[CLS]; ``tau``
      (default 0.2 for real CLIP, -0.11 for the toy CLIP, 0 for ott+rt): their relevance threshold.
    * ``pcls=llm``: the pseudo-[CLS] source: the LLM input embeddings of the relevant tokens (llm), the
      mean projected CLIP text embedding mapped into the LLM space (clip), the mean of llm and the
      projected visual [CLS] (hybrid), or the projected visual [CLS] alone (visual).
    * ``assistant=true``: the chat template's trailing generation prompt ("ASSISTANT:") counts as part
      of the instruction; ``false`` leaves it out (it needs the LLM tokenizer to recognise it).
    * ``real_pcls=false``: true keeps the pseudo-[CLS] as a token the text sees (the paper's "w/ pseudo
      CLS"); ``llm=true``: false is IVTP-V, the vision stage alone.
    * ``clip``, ``clip_tokenizer``, ``tokenizer``: the CLIP model and tokenizer and the LLM tokenizer
      (by default the toy CLIP for toy models, else the family's text companion).
    """

    name = "ivtp"

    def __init__(self, keep: int | float = 0.11, group: int | str = 3, rollout: str = "residual",
                 llm_group: int = 3, llm_layers: int | None = None, instruction: str = "ott+te+rt",
                 pcls: str = "llm", real_pcls: bool = False, tau: float | None = None, llm: bool = True,
                 threshold: float | None = None, budget: str = "2n", assistant: bool = True,
                 clip: Any = None, clip_tokenizer: Any = None, tokenizer: Any = None):
        scorers.resolve_keep(keep, 10**9)
        if group != "all" and (not isinstance(group, int) or group < 1):
            raise VlmpruneError(f"ivtp group={group!r} must be a layer count >= 1 or 'all'")
        if rollout not in scorers.ROLLOUTS:
            raise VlmpruneError(f"ivtp rollout={rollout!r}; choose one of: {', '.join(scorers.ROLLOUTS)}")
        if instruction not in INSTRUCTIONS:
            raise VlmpruneError(f"ivtp instruction={instruction!r}; choose one of: {', '.join(INSTRUCTIONS)}")
        if pcls not in PSEUDO_CLS:
            raise VlmpruneError(f"ivtp pcls={pcls!r}; choose one of: {', '.join(PSEUDO_CLS)}")
        if pcls == "clip" and instruction != "ott+te+rt":
            raise VlmpruneError("ivtp pcls=clip needs the CLIP text encoder: use instruction=ott+te+rt")
        if not isinstance(real_pcls, bool) or (real_pcls and not llm):
            raise VlmpruneError(f"ivtp real_pcls={real_pcls!r} must be true or false, and true needs the LLM stage")
        if not isinstance(llm_group, int) or llm_group < 1:
            raise VlmpruneError(f"ivtp llm_group={llm_group!r} must be a layer count >= 1")
        if budget not in BUDGETS:
            raise VlmpruneError(f"ivtp budget={budget!r}; choose one of: {', '.join(BUDGETS)}")
        if not isinstance(assistant, bool):
            raise VlmpruneError(f"ivtp assistant={assistant!r} must be true or false")
        self.keep, self.group, self.rollout = keep, group, rollout
        self.llm_group, self.llm_layers, self.instruction = llm_group, llm_layers, instruction
        self.pcls, self.real_pcls, self.tau, self.llm, self.threshold = pcls, real_pcls, tau, llm, threshold
        self.budget, self.assistant = budget, assistant
        self._clip, self._clip_tokenizer, self._tokenizer = clip, clip_tokenizer, tokenizer
        self._vit_sites: list[Site] = []
        self._llm_sites: list[Site] = []
        self._pending: dict[str, Any] | None = None

    # -- where ------------------------------------------------------------------------------
    def sites(self, plan: ModelPlan) -> list[Site]:
        self._vit_sites = []
        if plan.n_vision_layers > 0 and plan.has_cls:
            last = plan.vision_feature_layer + 1
            self._vit_sites = [Site("vision", layer)
                               for layer in scorers.group_ends(last, last if self.group == "all" else self.group)]
        self._llm_sites = []
        if self.llm:
            depth = self.llm_layers or max(self.llm_group, round(LLAVA_LLM_DEPTH * plan.n_llm_layers))
            if not 1 <= depth < plan.n_llm_layers:
                raise VlmpruneError(f"ivtp llm_layers={depth} must be between 1 and {plan.n_llm_layers - 1}")
            self._llm_sites = [Site("llm", layer) for layer in scorers.group_ends(depth, self.llm_group)]
        if not self._vit_sites and not self._llm_sites:
            raise VlmpruneError(f"ivtp with llm=false needs a vision tower with [CLS], which {plan.family} lacks")
        if not self._vit_sites and self.instruction != "ott":
            warnings.warn(f"ivtp: {plan.family}'s tower has no [CLS] to rank the instruction by: "
                          f"instruction={self.instruction} falls back to ott (the mean of all instruction tokens)")
        return self._vit_sites + self._llm_sites

    def recorded_layers(self, site: Site, plan: ModelPlan) -> list[int]:
        stage = self._vit_sites if site.where == "vision" else self._llm_sites
        index = stage.index(site)
        start = stage[index - 1].layer if index else 0
        return list(range(start, site.layer))

    # -- what ------------------------------------------------------------------------------
    def reduce(self, ctx: SiteContext) -> Reduction:
        target = scorers.resolve_keep(self.keep, ctx.n_visual)
        threshold = self.threshold if self.threshold is not None else LLAVA_THRESHOLD * ctx.n_visual
        if self.budget == "equal":
            threshold = 0
        vit, llm = scorers.ivtp_schedule(ctx.n_visual, target, len(self._vit_sites), len(self._llm_sites), threshold)
        vision = ctx.site.where == "vision"
        count = (vit if vision else llm)[(self._vit_sites if vision else self._llm_sites).index(ctx.site)]
        score = self.significance(ctx, self.recorded_layers(ctx.site, None))
        keep = self.select(ctx, score, min(count, ctx.visual.shape[1]))
        if vision and ctx.site == self._vit_sites[-1] and self._llm_sites:
            kept = scorers.gather_tokens(ctx.hidden, ctx.visual.gather(1, keep))
            self._meet(sequence=torch.cat([ctx.hidden[:, ctx.cls : ctx.cls + 1], kept], dim=1))
        return Reduction(keep=keep)

    def significance(self, ctx: SiteContext, layers: list[int]) -> torch.Tensor:
        """(B, V) Eq. 4 at this site: the rollout row over ``layers`` of [CLS] (vision) or of the
        scoring query (LLM), weighted by the value norms of the group's last layer."""
        query = torch.full_like(ctx.visual[:, 0], ctx.cls) if ctx.site.where == "vision" else ctx.query
        row = scorers.grouped_rollout_row(ctx.attention, layers, query, self.rollout)
        return scorers.significance(row, ctx.values(layers[-1]), ctx.visual)

    def select(self, ctx: SiteContext, score: torch.Tensor, count: int) -> torch.Tensor:
        """(B, count) indices into the current visual tokens: IVTP keeps the most significant."""
        return scorers.top_indices(score, count)

    # -- the pseudo-[CLS] ------------------------------------------------------------------------
    def scoring_token_is_real(self) -> bool:
        return self.real_pcls

    def scoring_token(self, model: Any, inputs: dict[str, Any]) -> torch.Tensor | None:
        """A (B, D) tensor the engine inserts after the visual tokens.

        It needs the instruction (known here) and the tower's [CLS] and kept tokens (known at the
        last vision site). A plain forward asks for it before the vision tower runs, ``generate``
        after encoding the image; whichever of the two comes second fills it in."""
        if not self._llm_sites:
            return None
        from ...models import get_adapter
        adapter = get_adapter(model)
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        embed = model.get_input_embeddings()
        tokenizer = None if self.assistant else self._llm_tokenizer(model)
        instructions = [(text_ids, embed(text_ids)) for text_ids in instruction_ids(adapter, ids, mask, tokenizer)]
        slot = torch.zeros(ids.shape[0], embed.embedding_dim, dtype=embed.weight.dtype, device=embed.weight.device)
        if not self._vit_sites:
            for b, (_, embeds) in enumerate(instructions):
                slot[b] = embeds.mean(0)
            return slot
        self._meet(text={"slot": slot, "instructions": instructions, "model": model, "adapter": adapter})
        return slot

    def _meet(self, text: dict | None = None, sequence: torch.Tensor | None = None) -> None:
        """Keep whichever half of one forward's pseudo-[CLS] inputs comes first; fill on the second."""
        self._pending = {**(self._pending or {}), **({"text": text} if text else {}),
                         **({"sequence": sequence} if sequence is not None else {})}
        if "text" in self._pending and "sequence" in self._pending:
            pending, self._pending = self._pending, None
            self._fill_pseudo_cls(pending["sequence"], **pending["text"])

    def _fill_pseudo_cls(self, sequence: torch.Tensor, slot: torch.Tensor, instructions: list, model: Any,
                         adapter: Any) -> None:
        """Eqs. 6-8 for every sample, written into ``slot``. ``sequence``: (B, 1 + k, D_vision) the
        [CLS] and kept tokens at the output of the layer the LLM reads."""
        visual_cls = adapter.projector(sequence[:, 0])                              # (B, D) LLM space
        if self.instruction == "ott+te+rt":   # one text-encoder pass for the whole batch
            relevances = self._text_relevance(model, [ids for ids, _ in instructions],
                                              self._image_embedding(model, sequence))
        for b, (text_ids, embeds) in enumerate(instructions):
            if self.instruction == "ott":
                passing = torch.ones(len(text_ids), dtype=torch.bool, device=embeds.device)
            elif self.instruction == "ott+rt":
                relevance = F.cosine_similarity(embeds.float(), visual_cls[b].float()[None], dim=-1)
                passing = relevance >= self._tau(model)
            else:
                relevance, token_embeds, clip_passing = relevances[b]
                passing = relevance >= self._tau(model)
            text = _masked_mean(embeds, passing)
            if self.pcls == "clip":
                text = self._clip_to_llm(adapter, _masked_mean(token_embeds, clip_passing))
            elif self.pcls == "hybrid":
                text = 0.5 * (text + visual_cls[b])
            # value-free branching (no reads into Python), so a shape-only meta forward runs it too
            value = visual_cls[b] if self.pcls == "visual" else torch.where(passing.any(), text, visual_cls[b])
            slot[b] = value.to(slot.dtype)

    def _tau(self, model: Any) -> float:
        if self.tau is not None:
            return self.tau
        if self.instruction == "ott+rt":
            return TAU_NO_TEXT_ENCODER
        return TAU_TOY_CLIP if _is_toy(model) else TAU_CLIP

    # -- CLIP --------------------------------------------------------------------------------
    def _companions(self, model: Any):
        if self._clip is None or self._clip_tokenizer is None:
            self._clip, self._clip_tokenizer = tower_clip(model, self.name, "instruction=ott+rt")
        return self._clip, self._clip_tokenizer, self._llm_tokenizer(model)

    def _llm_tokenizer(self, model: Any):
        if self._tokenizer is None:
            self._tokenizer = llm_tokenizer(model, self.name)
        return self._tokenizer

    @torch.no_grad()
    def _image_embedding(self, model: Any, sequence: torch.Tensor) -> torch.Tensor:
        """CLIP image embeddings (B, P) from the [CLS] + kept tokens at the feature layer's output
        (no gradients: they only score the instruction tokens)."""
        clip, _, _ = self._companions(model)
        vision = clip.vision_model
        hidden = sequence.to(vision.post_layernorm.weight.dtype)
        start = len(self._vit_sites) and self._vit_sites[-1].layer
        for layer in vision.encoder.layers[start:]:
            out = layer(hidden, None)
            hidden = out[0] if isinstance(out, tuple) else out
        return clip.visual_projection(vision.post_layernorm(hidden[:, 0]))

    def _text_relevance(self, model: Any, text_ids: list[torch.Tensor], image_embeds: torch.Tensor) -> list:
        """Eqs. 6-7 per sample (``image_embeds``: (B, P)): CLIP relevance of each CLIP token, mean
        over the CLIP tokens that overlap each LLM token's characters (LLM tokens that overlap none
        get -inf: never relevant). Also the CLIP tokens' projected embeddings and which of them pass
        ``tau`` (for ``pcls=clip``). The batch's texts go through the text encoder together."""
        clip, clip_tokenizer, tokenizer = self._companions(model)
        spans, texts = zip(*(llm_token_spans(tokenizer, ids.tolist()) for ids in text_ids))
        results = []
        for spans_b, (offsets, token_embeds, clip_relevance) in zip(
                spans, clip_token_embeddings(clip, clip_tokenizer, image_embeds, list(texts))):
            overlap = torch.tensor([[float(cs < e and ce > s) for cs, ce in offsets] for s, e in spans_b],
                                   device=image_embeds.device).view(len(spans_b), len(offsets))   # (T, S)
            counts = overlap.sum(-1)
            relevance = (overlap @ clip_relevance.to(overlap.device)) / counts.clamp_min(1)
            relevance = relevance.masked_fill(counts == 0, -float("inf"))
            results.append((relevance, token_embeds, clip_relevance >= self._tau(model)))
        return results

    def _clip_to_llm(self, adapter: Any, mean: torch.Tensor) -> torch.Tensor:
        """``pcls=clip``: a mean projected CLIP text embedding, back to the tower width and projected."""
        back = torch.linalg.pinv(self._clip.visual_projection.weight.float()) @ mean.float()
        return adapter.projector(back.to(next(adapter.projector.parameters()).dtype))


def _masked_mean(rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``rows`` (T, D) where ``mask`` (T,) holds; zeros when it holds nowhere."""
    weights = mask.to(rows.dtype)
    return (weights @ rows) / weights.sum().clamp_min(1)


def llm_token_spans(tokenizer: Any, ids: list[int]) -> tuple[list[tuple[int, int]], str]:
    """Character span of each LLM token in the decoded text, by decoding growing prefixes (works for
    any tokenizer whose decoding of a prefix is a prefix of the decoding). Special tokens (the chat
    template's BOS/EOS, padding) decode to nothing: empty spans, so never relevant."""
    spans, before = [], 0
    for k in range(len(ids)):
        length = len(tokenizer.decode(ids[: k + 1], skip_special_tokens=True))
        spans.append((before, length))
        before = length
    return spans, tokenizer.decode(ids, skip_special_tokens=True)


def instruction_ids(adapter: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    tokenizer: Any = None) -> list[torch.Tensor]:
    """Each sample's instruction: its real (unpadded) token ids after the image. With a ``tokenizer``,
    a trailing generation prompt ("ASSISTANT:", :data:`ASSISTANT_MARKERS`) is left out."""
    rows = []
    for b, row in enumerate(input_ids):
        after = adapter.image_token_mask(row[None])[0].nonzero().max() + 1
        valid = torch.ones_like(row, dtype=torch.bool) if attention_mask is None else attention_mask[b].bool()
        text_ids = row[after:][valid[after:]]
        rows.append(text_ids if tokenizer is None else text_ids[: len(text_ids) - _assistant_length(tokenizer, text_ids)])
    return rows


def _assistant_length(tokenizer: Any, ids: torch.Tensor) -> int:
    """How many trailing tokens of ``ids`` decode to a generation prompt (the shortest run; 0 if none)."""
    for count in range(1, len(ids)):
        tail = "".join(tokenizer.decode(ids[-count:].tolist(), skip_special_tokens=True).split()).lower()
        if tail in ASSISTANT_MARKERS:
            return count
    return 0


def llm_tokenizer(model: Any, method: str) -> Any:
    """The LLM tokenizer saved beside the model (a method that decodes the instruction needs it)."""
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(model.config._name_or_path)
    except (OSError, ValueError):
        raise VlmpruneError(f"{method} needs the LLM tokenizer: pass tokenizer=... or load the model from a "
                            "directory that holds one") from None


def tower_clip(model: Any, method: str, alternative: str) -> tuple[Any, Any]:
    """The tower's CLIP and its tokenizer: the toy CLIP for a toy checkpoint, else the family's text
    companion (:mod:`vlmprune.models.companions`), on the tower's device and in its dtype."""
    if _is_toy(model):
        from ...toyworld import load_clip
        return load_clip()
    from ...models import get_adapter
    from ...models.companions import text_companion
    adapter = get_adapter(model)
    weight = next(adapter.vision_tower.parameters())
    try:
        clip, clip_tokenizer = text_companion(adapter.family, weight.dtype)
    except VlmpruneError as error:
        raise VlmpruneError(f"{method}: {error}, or use {alternative}") from None
    device = weight.device
    # a shape-only (meta) count runs the CPU copy on meta inputs; moving the shared copy there would empty it
    return (clip if device.type == "meta" else clip.to(device)), clip_tokenizer


def _is_toy(model: Any) -> bool:
    """A shipped toy checkpoint, or a pruned copy of one (its saved record names the source), whose tower
    is the toy CLIP's."""
    from pathlib import Path
    from ...toyworld import CHECKPOINTS, MODELS
    from ...weights.saving import CONFIG_KEY
    record = getattr(getattr(model, "config", None), CONFIG_KEY, None)
    if isinstance(record, dict) and record.get("source") in MODELS:
        return True
    path = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    return bool(path) and Path(path).resolve().parent == CHECKPOINTS.resolve()
