"""CDPruner (Zhang et al., NeurIPS 2025): keep the visual tokens that maximise conditional diversity.

Before the LLM, the projector outputs give a cosine similarity kernel ``S``; each visual token's
relevance ``r`` to the instruction scales it into the conditional kernel ``L = diag(r) S diag(r)``,
and the greedy MAP of a DPP on ``L`` (Chen et al. 2018, incremental Cholesky) picks the kept tokens:
relevant ones, but no two alike.

Relevance, as in the authors' code (Theia-4869/CDPruner, ``llava_arch.py``): the patch features at
the layer the LLM reads, through CLIP's ``post_layernorm`` and ``visual_projection``, against the
CLIP text embedding of the instruction; ``r = -cos`` (``negate=true``: the reference code negates it,
an empirical property the authors report for LLaVA's CLIP, CDPruner issue #14), min-max normalised, ``r = (r - min + 1e-6) / (max - min)``. ``theta`` (off by default, as in their code)
sharpens it: ``r <- exp(theta / (2 (1 - theta)) r)``.

Decisions: the min and max are taken per sample (the reference code takes them over the batch, so a
sample's choice would depend on its batch-mates); the instruction is the text after the image with
the chat template's "ASSISTANT:" left out (the reference passes the question alone); an instruction
longer than CLIP's context is truncated (the reference averages the embeddings of 77-token chunks).
The patch features are read at a vision site on the feature layer's output that keeps every token,
so ``text=clip`` needs a CLIP tower with [CLS] (LLaVA-1.5, the toy models). ``text=llm`` works on
every family: ``r`` is the mean cosine between each projector output and the LLM input embeddings of
the instruction tokens (not in the paper).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ...errors import VlmpruneError
from ..base import ModelPlan, Reduction, Site, SiteContext
from ..kinds import BudgetMethod
from .. import scorers
from .ivtp import instruction_ids, llm_tokenizer, tower_clip

TEXT_SOURCES = ("clip", "llm")


def min_max(relevance: torch.Tensor) -> torch.Tensor:
    """(B, V) -> per-sample ``(r - min + 1e-6) / (max - min)``, as in the reference code."""
    low, high = relevance.amin(-1, keepdim=True), relevance.amax(-1, keepdim=True)
    return (relevance - low + 1e-6) / (high - low).clamp_min(1e-6)


def conditional_kernel(features: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """(B, V, D) token features and (B, V) relevance -> (B, V, V) ``L_ij = r_i cos(x_i, x_j) r_j``."""
    normed = F.normalize(features.float(), dim=-1)
    return relevance[:, :, None] * (normed @ normed.transpose(1, 2)) * relevance[:, None, :]


def greedy_dpp(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """(B, V, V) PSD kernel -> (B, k) indices in pick order: each pick maximises ``log det L_Y`` of the
    picked set ``Y`` (fast greedy MAP, Chen et al. 2018: the squared residual ``d_j^2`` of every
    candidate is updated with one new Cholesky row per pick; ties go to the lower index)."""
    batch, n, _ = kernel.shape
    residual = kernel.diagonal(dim1=1, dim2=2).float()                  # d_j^2 = L_jj - |c_j|^2
    rows: list[torch.Tensor] = []                                         # Cholesky rows, each (B, V)
    picks = []
    for _ in range(k):
        pick = residual.argmax(-1)
        picks.append(pick)
        column = kernel.gather(1, pick.view(batch, 1, 1).expand(-1, 1, n)).squeeze(1).float()   # L[pick, :]
        if rows:
            factors = torch.stack(rows)                                   # (t, B, V)
            at_pick = factors.gather(2, pick.view(1, batch, 1).expand(len(rows), -1, 1)).squeeze(2)  # (t, B)
            column = column - torch.einsum("tb,tbn->bn", at_pick, factors)       # a matmul: counted in FLOPs
        scale = residual.gather(1, pick[:, None]).clamp_min(1e-12).sqrt()  # a spent kernel adds nothing
        row = column / scale
        rows.append(row)
        residual = (residual - row.square()).scatter(1, pick[:, None], -float("inf"))
    return torch.stack(picks, 1)


class CDPruner(BudgetMethod):
    """``cdpruner:keep=0.11``. Settings, with their defaults: ``text=clip`` (relevance from the CLIP
    text embedding of the instruction; ``llm``: from its LLM input embeddings, for towers without
    [CLS]); ``negate=true`` (relevance is minus the cosine, as in the reference code); ``theta=none``
    (or a value in (0, 1): ``r <- exp(theta / (2 (1 - theta)) r)``); ``assistant=false`` (the trailing
    "ASSISTANT:" is not part of the instruction). ``clip``, ``clip_tokenizer``, ``tokenizer``: the CLIP
    model and tokenizer and the LLM tokenizer (found as IVTP finds them when not given)."""

    name = "cdpruner"

    def __init__(self, keep: int | float = 0.11, text: str = "clip", negate: bool = True,
                 theta: float | None = None, assistant: bool = False,
                 clip: Any = None, clip_tokenizer: Any = None, tokenizer: Any = None):
        super().__init__(keep)
        if text not in TEXT_SOURCES:
            raise VlmpruneError(f"cdpruner text={text!r}; choose one of: {', '.join(TEXT_SOURCES)}")
        if not isinstance(negate, bool) or not isinstance(assistant, bool):
            raise VlmpruneError("cdpruner negate and assistant must be true or false")
        if theta is not None and not (isinstance(theta, float) and 0 < theta < 1):
            raise VlmpruneError(f"cdpruner theta={theta!r} must be none or a number in (0, 1)")
        self.text, self.negate, self.theta, self.assistant = text, negate, theta, assistant
        self._clip, self._clip_tokenizer, self._tokenizer = clip, clip_tokenizer, tokenizer

    def sites(self, plan: ModelPlan) -> list[Site]:
        if self.text == "llm":
            return [Site("llm", 0)]
        if plan.n_vision_layers == 0 or not plan.has_cls:
            raise VlmpruneError(f"cdpruner text=clip reads CLIP patch embeddings from a tower with [CLS], which "
                                f"{plan.family} lacks: use text=llm")
        return [Site("vision", plan.vision_feature_layer + 1), Site("llm", 0)]

    def reduce(self, ctx: SiteContext) -> Reduction:
        every = torch.arange(ctx.visual.shape[1], device=ctx.visual.device).expand_as(ctx.visual)
        if ctx.site.where == "vision":  # prunes nothing: notes the patches' CLIP image embeddings
            ctx.state["image_embeds"] = self._patch_embeddings(ctx)
            return Reduction(keep=every)
        count = scorers.resolve_keep(self.keep, ctx.n_visual)
        features = scorers.gather_tokens(ctx.hidden, ctx.visual)
        kernel = conditional_kernel(features, self._relevance(ctx, features))
        return Reduction(keep=greedy_dpp(kernel, count))

    # -- relevance ---------------------------------------------------------------------------------
    def _relevance(self, ctx: SiteContext, features: torch.Tensor) -> torch.Tensor:
        """(B, V) relevance of each visual token to its sample's instruction, min-max normalised."""
        model = ctx.adapter.model
        tokenizer = None if self.assistant else self._llm_tokenizer(model)
        texts = instruction_ids(ctx.adapter, ctx.inputs["input_ids"], ctx.inputs.get("attention_mask"), tokenizer)
        if self.text == "clip":
            image = ctx.state.pop("image_embeds")
            text = self._text_embeddings(model, texts).to(image.device)
            cosine = (image @ text[:, :, None]).squeeze(-1)
        else:
            embed = model.get_input_embeddings()
            normed = F.normalize(features.float(), dim=-1)
            cosine = torch.stack([(normed[b] @ F.normalize(embed(ids).float(), dim=-1).T).mean(-1)
                                  for b, ids in enumerate(texts)])
        relevance = min_max(-cosine if self.negate else cosine)
        if self.theta is not None:
            relevance = torch.exp(self.theta / (2 * (1 - self.theta)) * relevance)
        return relevance

    @torch.no_grad()
    def _patch_embeddings(self, ctx: SiteContext) -> torch.Tensor:
        """(B, V, P) unit CLIP image embeddings of the patches at the output of the layer the LLM reads."""
        clip, _ = self._companions(ctx.adapter.model)
        patches = scorers.gather_tokens(ctx.hidden, ctx.visual).to(clip.visual_projection.weight.dtype)
        return F.normalize(clip.visual_projection(clip.vision_model.post_layernorm(patches)).float(), dim=-1)

    @torch.no_grad()
    def _text_embeddings(self, model: Any, texts: list[torch.Tensor]) -> torch.Tensor:
        """(B, P) unit CLIP text embeddings of the decoded instructions."""
        clip, clip_tokenizer = self._companions(model)
        tokenizer = self._llm_tokenizer(model)
        decoded = [tokenizer.decode(ids.tolist(), skip_special_tokens=True) for ids in texts]
        enc = clip_tokenizer(decoded, padding=True, truncation=True, return_tensors="pt",
                             max_length=clip.config.text_config.max_position_embeddings)
        device = clip.text_projection.weight.device
        pooled = clip.text_model(input_ids=enc["input_ids"].to(device),
                                 attention_mask=enc["attention_mask"].to(device)).pooler_output
        return F.normalize(clip.text_projection(pooled).float(), dim=-1)

    def _companions(self, model: Any) -> tuple[Any, Any]:
        if self._clip is None or self._clip_tokenizer is None:
            self._clip, self._clip_tokenizer = tower_clip(model, self.name, "text=llm")
        return self._clip, self._clip_tokenizer

    def _llm_tokenizer(self, model: Any) -> Any:
        if self._tokenizer is None:
            self._tokenizer = llm_tokenizer(model, self.name)
        return self._tokenizer
