"""Model configs of the toy world: the CLIP model, the large and small LVLMs, and a micro one for tests.

The LVLMs are real ``LlavaConfig`` objects (CLIP vision tower, 2-layer GELU projector, Llama decoder),
set up as LLaVA-1.5 is: the LLM reads the penultimate vision layer and drops [CLS].
"""
from __future__ import annotations

from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig, LlamaConfig, LlavaConfig

from ..errors import VlmpruneError
from .scenes import IMAGE_SIZE, PATCH_SIZE

# name -> (vision tower, CLIP text encoder, LLM decoder) sizes
SIZES = {
    "toy-large": {"vision": (128, 6, 4, 256), "clip_text": (96, 3, 4, 192), "llm": (128, 8, 4, 320)},
    "toy-small": {"vision": (128, 6, 4, 256), "clip_text": (96, 3, 4, 192), "llm": (128, 2, 4, 320)},
    "micro": {"vision": (32, 2, 2, 64), "clip_text": (32, 2, 2, 64), "llm": (32, 2, 2, 64)},
}
PROJECTION_DIM = {"toy-large": 96, "toy-small": 96, "micro": 16}
MAX_TEXT_POSITIONS = 96
LLM_MAX_POSITIONS = 512


def _check(name: str) -> dict:
    if name not in SIZES:
        raise VlmpruneError(f"unknown toy config {name!r}; choose from {', '.join(SIZES)}")
    return SIZES[name]


def vision_config(name: str) -> CLIPVisionConfig:
    hidden, layers, heads, mlp = _check(name)["vision"]
    return CLIPVisionConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=mlp,
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=PROJECTION_DIM[name], hidden_act="gelu",
    )


def clip_config(name: str, clip_tokenizer) -> CLIPConfig:
    hidden, layers, heads, mlp = _check(name)["clip_text"]
    text = CLIPTextConfig(
        vocab_size=len(clip_tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=mlp, max_position_embeddings=MAX_TEXT_POSITIONS, projection_dim=PROJECTION_DIM[name],
        pad_token_id=clip_tokenizer.pad_token_id, bos_token_id=clip_tokenizer.bos_token_id,
        eos_token_id=clip_tokenizer.eos_token_id, hidden_act="gelu",
    )
    return CLIPConfig(
        text_config=text.to_dict(), vision_config=vision_config(name).to_dict(),
        projection_dim=PROJECTION_DIM[name],
    )


def llava_config(name: str, llm_tokenizer) -> LlavaConfig:
    hidden, layers, heads, mlp = _check(name)["llm"]
    text = LlamaConfig(
        vocab_size=len(llm_tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, intermediate_size=mlp, max_position_embeddings=LLM_MAX_POSITIONS,
        rms_norm_eps=1e-5, tie_word_embeddings=False, pad_token_id=llm_tokenizer.pad_token_id,
        bos_token_id=llm_tokenizer.bos_token_id, eos_token_id=llm_tokenizer.eos_token_id,
    )
    return LlavaConfig(
        vision_config=vision_config(name), text_config=text,
        image_token_id=llm_tokenizer.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
    )
