"""Text companions: the CLIP-family model whose text encoder matches each family's vision tower.

Text relevance (IVTP Eq. 6) compares the instruction with the image in the embedding space the tower
was trained in, so the companion is the tower's own contrastive model, not any CLIP.
"""
from __future__ import annotations

import functools
from typing import Any

from ..errors import VlmpruneError

# family -> hub id (or local directory) loaded with ``from_pretrained``; None: no matching text encoder.
TEXT_COMPANIONS: dict[str, str | None] = {
    "llava": "openai/clip-vit-large-patch14-336",
    "llava_next": "openai/clip-vit-large-patch14-336",
    "llava_onevision": "google/siglip-so400m-patch14-384",
    "qwen2_vl": None,
    "qwen2_5_vl": None,
}


def text_companion(family: str, dtype: Any = None) -> tuple[Any, Any] | None:
    """(CLIPModel or SiglipModel, its tokenizer) for ``family`` in eval mode, in ``dtype`` (default
    float32; IVTP asks for its tower's, so a bfloat16 model does not score in float32), loaded once
    per process and dtype; None for a family whose tower has no matching text encoder."""
    import torch

    name = TEXT_COMPANIONS[family]
    return None if name is None else _load(name, dtype or torch.float32)


@functools.lru_cache(maxsize=None)
def _load(name: str, dtype: Any) -> tuple[Any, Any]:
    from transformers import AutoModel, AutoTokenizer

    try:
        model = AutoModel.from_pretrained(name, dtype=dtype).eval()
        tokenizer = AutoTokenizer.from_pretrained(name)
    except OSError:
        raise VlmpruneError(f"the text encoder {name} is not in the local Hugging Face cache: "
                            f"download it (huggingface-cli download {name})") from None
    return model, tokenizer
