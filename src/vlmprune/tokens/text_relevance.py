"""CLIP text relevance (IVTP Eq. 6): how much each instruction token is about the image.

``c_i = cos(CLIP image embedding, text_projection(final hidden state of text token i))``. Scores come
with character offsets so a caller can align CLIP's subword tokens with another tokenizer's tokens.

SigLIP is scored by its own similarity, ``sigmoid(exp(logit_scale) * cos + logit_bias)``, since its
learnt scale and bias are what calibrate a match. Its text tower has no per-token projection (only the
last position goes through ``text_model.head``), so each token's final hidden state goes through that
same ``head``: the nearest per-token analogue of CLIP's ``text_projection``. A SigLIP score is a match
probability in (0, 1), not a cosine, so a threshold on it is too: 0.5 ("as likely matched as not")
takes the place of CLIP's tau = 0.2 (untested on real weights).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import SiglipModel

from ..errors import VlmpruneError


@torch.no_grad()
def clip_token_relevance(clip_model, clip_tokenizer, pixel_values_or_image_embeds: torch.Tensor,
                         texts: list[str]) -> list[tuple[list[tuple[int, int]], torch.Tensor]]:
    """Per text: (character offsets of its real tokens, their relevance scores), special tokens left out.

    ``pixel_values_or_image_embeds`` is either pixel values ``(B, 3, H, W)`` or image embeddings
    ``(B, D)`` (already projected); B is 1 (shared by every text) or ``len(texts)``.
    """
    return [(offsets, scores) for offsets, _, scores in
            clip_token_embeddings(clip_model, clip_tokenizer, pixel_values_or_image_embeds, texts)]


@torch.no_grad()
def clip_token_embeddings(clip_model, clip_tokenizer, pixel_values_or_image_embeds: torch.Tensor,
                          texts: list[str]) -> list[tuple[list[tuple[int, int]], torch.Tensor, torch.Tensor]]:
    """:func:`clip_token_relevance` plus, per text, the projected CLIP embedding (S, P) of each real
    token (IVTP's ``pcls=clip`` averages them). No gradients: the scores only select tokens."""
    siglip = isinstance(clip_model, SiglipModel)
    images = pixel_values_or_image_embeds
    if images.dim() == 4:
        pooled = clip_model.vision_model(pixel_values=images.to(clip_model.dtype)).pooler_output
        image_embeds = pooled if siglip else clip_model.visual_projection(pooled)
    elif images.dim() == 2:
        image_embeds = images.to(clip_model.dtype)
    else:
        raise VlmpruneError("pass pixel values (B, 3, H, W) or image embeddings (B, D) to clip_token_relevance")
    if image_embeds.shape[0] not in (1, len(texts)):
        raise VlmpruneError(f"got {image_embeds.shape[0]} images for {len(texts)} texts; pass one or one per text")
    max_length = clip_model.config.text_config.max_position_embeddings
    # SigLIP was trained on max-length padding that every token attends to
    enc = clip_tokenizer(list(texts), padding="max_length" if siglip else True, truncation=True,
                         max_length=max_length, return_tensors="pt", return_offsets_mapping=True,
                         return_attention_mask=True)
    device = image_embeds.device
    hidden = clip_model.text_model(input_ids=enc["input_ids"].to(device),
                                   attention_mask=None if siglip else enc["attention_mask"].to(device)).last_hidden_state
    token_embeds = (clip_model.text_model.head if siglip else clip_model.text_projection)(hidden)
    scores = F.cosine_similarity(token_embeds, image_embeds[:, None, :].expand_as(token_embeds), dim=-1)
    if siglip:
        scores = torch.sigmoid(clip_model.logit_scale.exp() * scores + clip_model.logit_bias)
    results = []
    for row, offsets in enumerate(enc["offset_mapping"].tolist()):
        keep = [j for j, (start, end) in enumerate(offsets) if end > start and enc["attention_mask"][row, j]]
        results.append(([tuple(offsets[j]) for j in keep], token_embeds[row, keep], scores[row, keep].float()))
    return results
