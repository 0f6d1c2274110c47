"""CLIP text relevance (IVTP Eq. 6): how much each instruction token is about the image.

``c_i = cos(CLIP image embedding, text_projection(final hidden state of text token i))``. Scores come
with character offsets so a caller can align CLIP's subword tokens with another tokenizer's tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

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
    images = pixel_values_or_image_embeds
    if images.dim() == 4:
        vision = clip_model.vision_model(pixel_values=images.to(clip_model.dtype))
        image_embeds = clip_model.visual_projection(vision.pooler_output)
    elif images.dim() == 2:
        image_embeds = images.to(clip_model.dtype)
    else:
        raise VlmpruneError("pass pixel values (B, 3, H, W) or image embeddings (B, D) to clip_token_relevance")
    if image_embeds.shape[0] not in (1, len(texts)):
        raise VlmpruneError(f"got {image_embeds.shape[0]} images for {len(texts)} texts; pass one or one per text")
    max_length = clip_model.config.text_config.max_position_embeddings
    enc = clip_tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                         return_tensors="pt", return_offsets_mapping=True)
    device = image_embeds.device
    hidden = clip_model.text_model(input_ids=enc["input_ids"].to(device),
                                   attention_mask=enc["attention_mask"].to(device)).last_hidden_state
    token_embeds = clip_model.text_projection(hidden)
    scores = F.cosine_similarity(token_embeds, image_embeds[:, None, :].expand_as(token_embeds), dim=-1)
    results = []
    for row, offsets in enumerate(enc["offset_mapping"].tolist()):
        keep = [j for j, (start, end) in enumerate(offsets) if end > start and enc["attention_mask"][row, j]]
        results.append(([tuple(offsets[j]) for j in keep], token_embeds[row, keep], scores[row, keep].float()))
    return results
